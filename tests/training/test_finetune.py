"""rs-train finetune / evaluate on real local annotations (SpaceNet Atlanta sample: 43 buildings, 1-band uint16),
as an analyst runs them: the model it writes loads in rs-engine segment; an interrupted run resumes."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

SPACENET = Path(__file__).resolve().parents[3] / "shared" / "data" / "spacenet_samples"
RASTER, LABELS = SPACENET / "sample_geotiff.tif", SPACENET / "geotiff_labels.geojson"
pytestmark = pytest.mark.skipif(not RASTER.exists(), reason="../shared/data (SpaceNet sample) not present")
ENV = dict(os.environ)


def _cmd(module: str, *args: object) -> list[str]:
    return [sys.executable, "-m", module, *map(str, args)]


def _finetune_args(out: Path, epochs: int = 6) -> list[object]:
    return ["finetune", "--raster", RASTER, "--labels", LABELS, "--class-field", "building", "--base-model", "nwpu10",
            "--out", out, "--chip-size", "128", "--chips-per-epoch", "6", "--batch-size", "2", "--epochs", epochs,
            "--warmup-steps", "2", "--lr", "3e-4", "--workers", "0", "--val-fraction", "0.2"]


@pytest.mark.timeout(1500)  # fine-tune, segment and evaluate: over 600 s on a loaded 2-core machine
def test_finetune_lowers_loss_and_segments(tmp_path) -> None:
    from rs_engine.checkpoint import read_card

    out = tmp_path / "buildings.safetensors"
    r = subprocess.run(_cmd("training.cli", *_finetune_args(out), "--progress", "jsonl"), capture_output=True,
                       text=True, env=ENV, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    events = [json.loads(line) for line in r.stdout.splitlines()]
    epochs = [e for e in events if e["event"] == "epoch"]
    assert len(epochs) == 6 and all(e["mask_ap"] is not None for e in epochs)  # validated every epoch
    with open(out.with_suffix(".log.csv"), newline="") as fh:
        losses = [float(row["loss"]) for row in csv.DictReader(fh)]
    assert sum(losses[-2:]) < sum(losses[:2]), losses
    card = read_card(out)
    assert card.class_names == ["yes"] and card.bands == 1 and card.gsd == pytest.approx(0.5)
    assert card.provenance["init"]["adapted"] == ["backbone.body.conv_stem.weight"]  # pan into nwpu10 (RGB hybrid)
    assert card.provenance["base_model"].startswith("nwpu10")

    gpkg = tmp_path / "pred.gpkg"
    r = subprocess.run(_cmd("rs_engine.cli", "segment", RASTER, "-o", gpkg, "--model", out, "--progress", "none",
                            "--score-threshold", "0.05"), capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr
    import pyogrio

    info = pyogrio.read_info(gpkg, layer="instances")
    assert "32616" in info["crs"]

    r = subprocess.run(_cmd("training.cli", "evaluate", "--model", out, "--raster", RASTER, "--labels", LABELS,
                            "--class-field", "building", "--json", tmp_path / "m.json"),
                       capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["objects"] == 43 and m["classes"] == ["yes"]
    assert 0 <= m["segm"]["AP50"] <= 100 and 0 <= m["f1@0.5"]["f1"] <= 1


def test_interrupted_finetune_resumes(tmp_path) -> None:
    out = tmp_path / "b.safetensors"
    args = _finetune_args(out, epochs=2)
    p = subprocess.Popen(_cmd("training.cli", *args, "--progress", "jsonl"), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=ENV)
    for line in p.stdout:  # wait for the first training step, then cancel as the QGIS plugin does
        if json.loads(line)["event"] == "progress":
            p.send_signal(signal.SIGTERM)
            break
    rest = [json.loads(line) for line in p.stdout]
    assert p.wait(timeout=300) == 130
    assert rest[-1] == {"event": "cancelled"}  # the same cancel report as rs-engine's
    assert not out.exists()
    from safetensors import safe_open

    with safe_open(str(out.with_suffix(".resume.safetensors")), framework="pt") as f:
        step = json.loads(f.metadata()["state"])["step"]
    assert step >= 1
    r = subprocess.run(_cmd("training.cli", *args, "--progress", "jsonl"), capture_output=True, text=True, env=ENV,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    first = next(json.loads(line) for line in r.stdout.splitlines() if '"progress"' in line)
    assert (first["epoch"] - 1) * first["total"] + first["done"] == step + 1  # continues after the saved step
    assert out.exists()


def test_finetune_bad_inputs(tmp_path) -> None:
    r = subprocess.run(_cmd("training.cli", "finetune", "--raster", RASTER, "--labels", LABELS, "--class-field",
                            "no_such_field", "--out", tmp_path / "m.safetensors"), capture_output=True, text=True,
                       env=ENV, timeout=300)
    assert r.returncode == 2 and "no_such_field" in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "m.safetensors").exists()


def test_finetune_drops_a_stale_prompt_head(tmp_path) -> None:
    """A base model with a prompt head (issue 16): the head was trained on the base's features, so the fine-tuned
    model does not carry it (a warning says so) and loads without one."""
    import copy

    from rs_engine.checkpoint import load_model, read_card, save_model
    from rs_engine.models.prompt_head import PromptHeadConfig, attach_prompt_head

    model, card = load_model("nwpu10")
    head = PromptHeadConfig(fpn_channels=card.architecture.get("fpn_channels", 128)).to_dict()
    attach_prompt_head(model, head)
    card = copy.deepcopy(card)
    card.architecture.setdefault("extra", {})["prompt_head"] = head
    base = save_model(tmp_path / "with-head.safetensors", model, card)
    assert hasattr(load_model(base)[0], "prompt_head")
    out = tmp_path / "ft.safetensors"
    args = [a if a != "nwpu10" else base for a in _finetune_args(out, epochs=1)]
    r = subprocess.run(_cmd("training.cli", *args, "--progress", "none"), capture_output=True, text=True, env=ENV,
                       timeout=900)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "has a prompt head; it is not carried over" in r.stderr
    assert "prompt_head" not in read_card(out).architecture.get("extra", {})
    assert not hasattr(load_model(out)[0], "prompt_head")
