"""``rs_engine``'s public API: the README's Python example runs as written, and ``import rs_engine`` stays light."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pyogrio

ROOT = Path(__file__).resolve().parents[1]


def test_readme_python_example_runs(tmp_path, monkeypatch) -> None:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```python\n(import rs_engine\n.*?)```", readme, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    code = block.replace('"examples/', f'"{ROOT}/examples/')
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 (our own README)
    assert scope["result"].features >= 10  # the example's ships (tests/test_bundled.py checks them one by one)
    assert pyogrio.read_info(tmp_path / "ships.gpkg", layer="instances")["features"] == scope["result"].features
    image, valid = scope["image"], scope["valid"]
    assert image.shape[0] == scope["card"].bands and image.shape[1:] == valid.shape and valid.all()
    assert abs(float(image.mean())) < 3  # normalised, not raw 0-255


def test_api_names_are_not_shadowed_by_modules() -> None:
    """``rs_engine.segment`` stays the function whatever was imported before (the pipeline module has its own
    name, so importing it cannot replace the package attribute)."""
    import rs_engine
    import rs_engine.checkpoint
    import rs_engine.pipeline
    import rs_engine.raster

    assert rs_engine.segment is rs_engine.pipeline.segment and callable(rs_engine.segment)
    assert rs_engine.load_model is rs_engine.checkpoint.load_model
    assert rs_engine.RasterSource is rs_engine.raster.RasterSource
    import rs_engine.outlining

    assert rs_engine.outline is rs_engine.outlining.outline and callable(rs_engine.outline)


def test_import_is_light_and_names_the_api() -> None:
    code = ("import sys, rs_engine; assert 'torch' not in sys.modules, 'torch imported eagerly'; "
            "print(sorted(n for n in rs_engine.__all__ if n != '__version__'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(sorted(["segment", "SegmentOptions", "SegmentResult", "load_predictor", "load_model",
                                      "ModelCard", "outline", "OutlineOptions", "Outliner",
                                      "RasterSource", "InputError"]))
