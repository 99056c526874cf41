"""Box-prompted masks (training/prompted.py): the bundled nwpu10's mask head, prompted by the truth boxes of the
NWPU example (test image 021: 14 airplanes, 12 storage tanks), outlines the objects better than the boxes do
(mean IoU 0.70, the boxes themselves 0.47)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

NWPU = Path(__file__).resolve().parents[3] / "shared" / "data" / "nwpu_vhr10"
pytestmark = pytest.mark.skipif(not (NWPU / "annotations/instances_test.json").is_file(),
                                reason="../shared/data (NWPU VHR-10) not present")


@pytest.fixture
def example_coco(tmp_path: Path) -> Path:
    coco = json.loads((NWPU / "annotations/instances_test.json").read_text())
    coco["images"] = [i for i in coco["images"] if i["file_name"] == "021.jpg"]
    ids = {i["id"] for i in coco["images"]}
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in ids]
    path = tmp_path / "example.json"
    path.write_text(json.dumps(coco))
    return path


def test_box_prompts_outline_better_than_the_box(example_coco: Path) -> None:
    from rs_engine.checkpoint import load_model
    from training.coco import ChipSpec, CocoChips
    from training.prompted import evaluate_box_prompts

    model, card = load_model("nwpu10", "cpu")
    ds = CocoChips(example_coco, NWPU / "images", ChipSpec(card.tile_size, [0, 1, 2], card.mean, card.std), False)
    got = evaluate_box_prompts(model, ds)
    assert got["objects"] == 26 and set(got["per_class"]) == {"airplane", "storage tank"}
    # The trivial outline of a box prompt is the box itself: its IoU with the truth, per object.
    image_id = ds.ids[0]
    truth, _ = ds.instances(image_id, *ds.load_image(image_id).shape[-2:])
    fill = []
    for m in truth.astype(bool):
        ys, xs = np.nonzero(m)
        fill.append(m.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)))
    assert got["mean_iou"] > np.mean(fill) + 0.15, (got, np.mean(fill))
    oracle = evaluate_box_prompts(model, ds, class_source="truth")
    assert oracle["mean_iou"] >= got["mean_iou"] - 0.02, (oracle, got)


def test_box_prompts_need_a_coco_dataset(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "training.cli", "evaluate", "--model", "nwpu10", "--raster",
                        str(tmp_path / "x.tif"), "--labels", str(tmp_path / "y.gpkg"), "--class-field", "c",
                        "--box-prompts", "truth"], capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 2 and r.stderr.strip().endswith("--box-prompts needs --coco ANN.json --images DIR"), r
