"""Shared fixtures of the training tests."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

SSDD = Path(__file__).resolve().parents[3] / "shared" / "data" / "ssdd"


@pytest.fixture
def ssdd_subset(tmp_path: Path) -> Callable[[int], Path]:
    """``ssdd_subset(n=4)``: a COCO file of the first ``n`` SSDD training images (images stay in ../shared)."""

    def make(n: int = 4) -> Path:
        coco = json.loads((SSDD / "annotations/instances_train.json").read_text())
        images = coco["images"][:n]
        ids = {i["id"] for i in images}
        coco["images"], coco["annotations"] = images, [a for a in coco["annotations"] if a["image_id"] in ids]
        path = tmp_path / f"ssdd{n}.json"
        path.write_text(json.dumps(coco))
        return path

    return make
