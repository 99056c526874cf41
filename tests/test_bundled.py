"""The bundled models: valid cards, loadable weights, and real detections on the bundled example images."""

from __future__ import annotations

from pathlib import Path

import pyogrio
import pytest

from rs_engine.checkpoint import bundled_models, load_model, read_card
from rs_engine.models import ModelConfig
from rs_engine.segment import SegmentOptions, segment

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("name,bands,classes", [("nwpu10", 3, 10), ("ssdd-ship", 1, 1)])
def test_bundled_card_and_weights(name: str, bands: int, classes: int) -> None:
    assert name in bundled_models()
    card = read_card(name)
    config = ModelConfig.from_dict(card.architecture)
    assert card.bands == config.in_channels == bands
    assert len(card.class_names) == config.num_classes == classes
    assert "test" in card.provenance["metrics"], "test-split metrics recorded in the card"
    model, _ = load_model(name)
    assert not model.training


@pytest.mark.parametrize("name", ["nwpu10", "ssdd-ship"])
def test_bundled_card_names_no_path_of_the_training_machine(name: str) -> None:
    """Commands and data in the provenance are relative to the project or ../shared (portable cards)."""
    import json
    import re

    text = json.dumps(read_card(name).provenance)
    assert not re.findall(r'(?<![\w.])/[A-Za-z_][^\s",]*', text), "absolute paths in the card"


def test_ssdd_ship_finds_the_ships_of_the_example(tmp_path) -> None:
    """examples/ssdd_001111.jpg holds 24 annotated ships, mostly offshore: most must be found, not many more."""
    out = tmp_path / "ships.gpkg"
    result = segment([EXAMPLES / "ssdd_001111.jpg"], out, SegmentOptions(model="ssdd-ship", bands=[1]))
    info = pyogrio.read_info(out, layer="instances")
    assert info["features"] == result.features
    assert 15 <= result.features <= 35


SSDD_TEST = Path(__file__).resolve().parents[2] / "shared/data/ssdd/annotations/instances_test.json"


@pytest.mark.skipif(not SSDD_TEST.is_file(), reason="../shared/data (SSDD annotations) not present")
def test_ssdd_ship_detections_land_on_annotated_ships(tmp_path) -> None:
    """Recall at mask IoU 0.3 against the 24 annotated ships of the example (pixel frame: y = -row); 16 on the
    development machine, at least 12 required."""
    import json

    import shapely
    from shapely.geometry import Polygon

    coco = json.loads(SSDD_TEST.read_text())
    image_id = next(i["id"] for i in coco["images"] if i["file_name"].endswith("001111.jpg"))
    truth = [Polygon(list(zip(s[0::2], [-y for y in s[1::2]])))
             for a in coco["annotations"] if a["image_id"] == image_id for s in a["segmentation"]]
    out = tmp_path / "ships.gpkg"
    segment([EXAMPLES / "ssdd_001111.jpg"], out, SegmentOptions(model="ssdd-ship", bands=[1]))
    found = [shapely.from_wkb(g) for g in pyogrio.raw.read(out)[2]]
    hits = sum(any(t.intersection(f).area / t.union(f).area > 0.3 for f in found) for t in truth)
    assert len(truth) == 24 and hits >= 0.5 * len(truth), (hits, len(truth))


NWPU_TEST = Path(__file__).resolve().parents[2] / "shared/data/nwpu_vhr10/annotations/instances_test.json"


@pytest.mark.skipif(not NWPU_TEST.is_file(), reason="../shared/data (NWPU VHR-10 annotations) not present")
def test_nwpu10_finds_the_airplanes_of_the_example(tmp_path) -> None:
    """Airplanes of the example (14 annotated) found by an airplane detection at mask IoU > 0.1, with the card's
    threshold: 9 on the development machine, at least 7 required. (At IoU 0.3 only 2: the weak model's masks
    are mostly parts of airplanes, a fifth to a quarter of their area; see README "Models".)"""
    import json

    import shapely
    from shapely.geometry import Polygon

    coco = json.loads(NWPU_TEST.read_text())
    image_id = next(i["id"] for i in coco["images"] if i["file_name"] == "021.jpg")
    plane = next(c["id"] for c in coco["categories"] if c["name"] == "airplane")
    truth = [Polygon(list(zip(s[0::2], [-y for y in s[1::2]])))
             for a in coco["annotations"] if a["image_id"] == image_id and a["category_id"] == plane
             for s in a["segmentation"]]
    out = tmp_path / "planes.gpkg"
    segment([EXAMPLES / "nwpu_021.jpg"], out, SegmentOptions(model="nwpu10"))
    meta, _, wkb, fields = pyogrio.raw.read(out)
    names = dict(zip(meta["fields"], fields))["class_name"]
    found = [shapely.from_wkb(g) for g, n in zip(wkb, names) if n == "airplane"]
    hits = sum(any(t.intersection(f).area / t.union(f).area > 0.1 for f in found) for t in truth)
    assert len(truth) == 14 and hits >= 7, (hits, len(found))
