"""The bundled models: valid cards, loadable weights, and real detections on the bundled example images."""

from __future__ import annotations

from pathlib import Path

import pyogrio
import pytest

from rs_engine.checkpoint import bundled_models, load_model, read_card
from rs_engine.models import ModelConfig
from rs_engine.pipeline import SegmentOptions, segment

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
    """Recall at mask IoU 0.3 against the 24 annotated ships of the example (pixel frame: y = -row): 21 to 22 with
    ssdd-ship 0.6 (int8, PyTorch); 22 with
    ssdd-ship 0.5 and 0.4 on the development machines (22 and 21 at IoU 0.5; 0.3: 20, 0.2: 16); at least 17
    required."""
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
    assert len(truth) == 24 and hits >= 17, (hits, len(truth))


NWPU_TEST = Path(__file__).resolve().parents[2] / "shared/data/nwpu_vhr10/annotations/instances_test.json"


def _nwpu_hits(out: Path, class_name: str, iou: float) -> tuple[int, int, int]:
    """(annotated, found, annotated objects matched by a detection of that class at mask IoU > ``iou``) for the
    NWPU example (pixel frame: y = -row)."""
    import json

    import shapely
    from shapely.geometry import Polygon

    coco = json.loads(NWPU_TEST.read_text())
    image_id = next(i["id"] for i in coco["images"] if i["file_name"] == "021.jpg")
    cat = next(c["id"] for c in coco["categories"] if c["name"] == class_name)
    truth = [Polygon(list(zip(s[0::2], [-y for y in s[1::2]])))
             for a in coco["annotations"] if a["image_id"] == image_id and a["category_id"] == cat
             for s in a["segmentation"]]
    meta, _, wkb, fields = pyogrio.raw.read(out)
    names = dict(zip(meta["fields"], fields))["class_name"]
    found = [shapely.from_wkb(g) for g, n in zip(wkb, names) if n == class_name]
    hits = sum(any(t.intersection(f).area / t.union(f).area > iou for f in found) for t in truth)
    return len(truth), len(found), hits


@pytest.mark.skipif(not NWPU_TEST.is_file(), reason="../shared/data (NWPU VHR-10 annotations) not present")
def test_nwpu10_outlines_the_airplanes_and_storage_tanks_of_the_example(tmp_path) -> None:
    """With the card's threshold: the 12 storage tanks at mask IoU > 0.5 (nwpu10 0.7: 10 in int8 and in PyTorch on
    the development machine; 0.6 found 5 to 7, missing the white tanks; 0.5 10; at least 9 required) and the 14
    airplanes at IoU > 0.3 (13; at least 10). Each airplane is outlined tightly, and this image's airplane
    annotations lie 10 to 15 px to the right, over the shadows (about twice the outline's area), so at IoU > 0.5
    0.6 and 0.7 match only 5 of them where 0.5, whose masks took in part of the shadows, matched 10."""
    out = tmp_path / "nwpu.gpkg"
    segment([EXAMPLES / "nwpu_021.jpg"], out, SegmentOptions(model="nwpu10"))
    tanks = _nwpu_hits(out, "storage tank", 0.5)
    assert tanks[0] == 12 and tanks[2] >= 9 and tanks[1] <= 18, tanks
    planes = _nwpu_hits(out, "airplane", 0.3)
    assert planes[0] == 14 and planes[2] >= 10 and planes[1] <= 30, planes


def test_nwpu10_sees_no_airplanes_in_the_spacenet_suburb(tmp_path) -> None:
    """The SpaceNet Atlanta sample (houses and trees, 0.5 m pan as RGB): at most one false airplane (none with
    nwpu10 0.4 and 0.5 on the development machine, one with 0.3; nwpu10 0.2 called tree crowns airplanes)."""
    out = tmp_path / "suburb.gpkg"
    result = segment([EXAMPLES / "spacenet_atlanta.tif"], out, SegmentOptions(model="nwpu10", bands=[1, 1, 1]))
    meta, _, _, fields = pyogrio.raw.read(out) if result.features else ({"fields": []}, None, [], [])
    names = list(dict(zip(meta["fields"], fields)).get("class_name", []))
    assert names.count("airplane") <= 1, names


NEON = Path(__file__).resolve().parents[2] / "shared/data/neon_trees/OSBS_029.tif"


@pytest.mark.skipif(not NEON.is_file(), reason="../shared/data (NEON sample) not present")
def test_nwpu10_marks_nothing_in_a_forest_plot(tmp_path) -> None:
    """A NEON forest plot (0.1 m RGB, shrubs and tree crowns: none of nwpu10's classes): at most one object
    (none on the development machine)."""
    result = segment([NEON], tmp_path / "forest.gpkg", SegmentOptions(model="nwpu10"))
    assert result.features <= 1
