"""The light engine on a fresh machine (issue 15): ``pip install delineate`` without PyTorch segments the examples
with the bundled ONNX models and finds what the PyTorch path finds.

The environment is made as a user gets it: a new venv from Debian's Python, no system site-packages, the wheel
of this checkout and its light dependencies installed from a wheel folder (:mod:`light_env`). Its size and install
time are printed (``pytest -s``) and bounded; the size target of the issue is 600 MB.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyogrio
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from light_env import light_venv, wheel_folder  # noqa: E402

from rs_engine import SegmentOptions, segment  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CASES = [("ssdd_001111.jpg", "ssdd-ship", "1"), ("nwpu_021.jpg", "nwpu10", None)]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("light")
    venv = light_venv(root / "venv", wheel_folder(root / "wheels"))
    print(f"\nlight engine: {venv.size_mb:.0f} MB installed in {venv.install_seconds:.1f} s")
    return venv


def test_light_environment_is_small_and_has_no_torch(env):
    assert env.size_mb < 600, f"{env.size_mb:.0f} MB"
    import subprocess

    probe = "import importlib.util as u, rs_engine; print(u.find_spec('torch'), rs_engine.__file__)"
    r = subprocess.run([str(env.python), "-c", probe], capture_output=True, text=True, check=True, cwd=env.path)
    spec, where = r.stdout.split()
    assert spec == "None" and where.startswith(str(env.path)), r.stdout  # the wheel's code, not the checkout's
    doctor = env.run("doctor", "--json")
    assert doctor.returncode == 0, doctor.stderr
    facts = json.loads(doctor.stdout)
    assert facts["runtimes"] == ["onnx"] and facts["torch"] is None
    assert facts["bundled_onnx"] == ["nwpu10", "ssdd-ship"]


def test_light_engine_explains_what_needs_torch(env, tmp_path):
    r = env.run("segment", str(EXAMPLES / "ssdd_001111.jpg"), "-o", str(tmp_path / "o.gpkg"), "--model", "ssdd-ship",
                "--runtime", "torch")
    assert r.returncode == 2
    assert r.stderr.strip() == "rs-engine: error: --runtime torch: PyTorch is not installed " \
        "(pip install 'delineate[torch]')"
    assert not (tmp_path / "o.gpkg").exists()
    e = env.run("export", "ssdd-ship", "-o", str(tmp_path / "m.onnx"))
    assert e.returncode == 2 and "export needs PyTorch" in e.stderr
    import subprocess

    t = subprocess.run([str(env.path / "bin" / "rs-train"), "evaluate", "--model", "ssdd-ship", "--coco", "x.json",
                        "--images", "."], capture_output=True, text=True, cwd=env.path)  # fmt: skip
    assert t.returncode == 2 and len(t.stderr.strip().splitlines()) == 1, t.stderr
    assert "rs-train needs the full engine (torch, torchvision, pycocotools, geopandas not installed)" in t.stderr


@pytest.mark.parametrize(("image", "model", "bands"), CASES)
def test_light_engine_finds_what_the_torch_path_finds(env, tmp_path, image, model, bands):
    """Same instance count, and each PyTorch instance matched by an ONNX one of the same class at mask IoU >= 0.99,
    or, for a small ship where one pixel is more than 1% of it, outlines that differ by at most 2 pixels (the
    example's frame is pixels: a mask probability within 1e-3 of the threshold can fall either way). Instances
    scored below 0.8 need IoU >= 0.9 only: their masks hold more pixels near the threshold (seen: nwpu10 0.7's
    false storage tank at 0.71 on the NWPU example's left edge, IoU 0.93 between the two runtimes)."""
    light = tmp_path / "light.gpkg"
    args = ["segment", str(EXAMPLES / image), "-o", str(light), "--model", model, "--progress", "none"]
    r = env.run(*args, *(["--bands", bands] if bands else []))
    assert r.returncode == 0, r.stderr
    full = tmp_path / "torch.gpkg"
    segment([EXAMPLES / image], full, SegmentOptions(model=model, runtime="torch",
                                                     bands=[int(bands)] if bands else None))  # fmt: skip
    a, b = pyogrio.read_dataframe(full), pyogrio.read_dataframe(light)
    assert len(a) == len(b) > 0
    for geom, cls, score in zip(a.geometry, a.class_id, a.score, strict=True):
        same = b[b.class_id == cls]
        best = max(same.geometry, key=lambda g: geom.intersection(g).area / geom.union(g).area)
        iou = geom.intersection(best).area / geom.union(best).area
        strict = iou >= 0.99 or geom.symmetric_difference(best).area <= 2
        assert strict or (score < 0.8 and iou >= 0.9), (cls, score, iou, geom.area)
    assert set(b.model) == set(a.model)
