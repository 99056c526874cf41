"""rs-train on a few real SSDD images: trains, writes a loadable model file with its card, resumes, evaluates."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SSDD = Path(__file__).resolve().parents[3] / "shared" / "data" / "ssdd"
pytestmark = pytest.mark.skipif(not SSDD.is_dir(), reason="../shared/data (SSDD) not present")


def rs_train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "training.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


def test_train_resume_evaluate(tmp_path, ssdd_subset) -> None:
    from rs_engine.checkpoint import load_model

    ann, out = ssdd_subset(), tmp_path / "m.safetensors"
    common = ["train", "--coco", ann, "--images", SSDD / "images", "--bands", "1", "--chip-size", "128",
              "--batch-size", "2", "--warmup-steps", "2", "--workers", "0", "--out", out]
    r = rs_train(*common, "--epochs", "1")
    assert r.returncode == 0, r.stderr
    model, card = load_model(out)
    assert card.class_names == ["ship"] and card.bands == 1 and card.provenance["epochs"] == 1
    assert out.with_suffix(".resume.safetensors").exists()
    r = rs_train(*common, "--epochs", "2")  # same command, more epochs: resumes at epoch 1
    assert r.returncode == 0, r.stderr
    rows = out.with_suffix(".log.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows[1:]] == ["1", "2"]
    r = rs_train("evaluate", "--model", out, "--coco", ann, "--images", SSDD / "images", "--record", "train4")
    assert r.returncode == 0, r.stderr
    metrics = json.loads(r.stdout)
    assert 0 <= metrics["segm"]["AP"] <= 100  # never -100: "no object of that size" is -1, and only per size range
    assert all(v == -1 or 0 <= v <= 100 for kind in ("segm", "bbox") for v in metrics[kind].values())
    assert "train4" in load_model(out)[1].provenance["metrics"]
