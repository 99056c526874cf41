"""Training, evaluation and inference read pixels, georeferencing and metrics one way (issue 18).

Each test here failed before the change: COCO chips were read with PIL (other pixels than inference's GDAL
reads), a missing band was silently replaced by band 0, a GCP-only scene was scored in the pixel frame while the
engine segmented it in its GCP frame, and ``evaluate_coco`` reported "no object of that size" as -100.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
import torch
from rasterio.control import GroundControlPoint

from rs_engine.errors import InputError
from training.coco import ChipSpec, CocoChips
from training.evaluate import evaluate_coco

NWPU = Path(__file__).resolve().parents[3] / "shared" / "data" / "nwpu_vhr10"


def _coco(tmp_path: Path, image: np.ndarray, boxes: list[tuple[int, int, int, int]]) -> Path:
    """A one-image COCO file (PNG image, one rectangle instance per box x0, y0, x1, y1)."""
    from PIL import Image

    Image.fromarray(image).save(tmp_path / "img.png")
    anns = [{"id": i + 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": (x1 - x0) * (y1 - y0),
             "bbox": [x0, y0, x1 - x0, y1 - y0], "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]]}
            for i, (x0, y0, x1, y1) in enumerate(boxes)]
    coco = {"images": [{"id": 1, "file_name": "img.png", "height": image.shape[0], "width": image.shape[1]}],
            "annotations": anns, "categories": [{"id": 1, "name": "object"}]}
    path = tmp_path / "coco.json"
    path.write_text(json.dumps(coco))
    return path


@pytest.mark.skipif(not NWPU.is_dir(), reason="../shared/data (NWPU VHR-10) not present")
def test_coco_chips_read_the_pixels_inference_reads() -> None:
    spec = ChipSpec(512, [0, 1, 2], [0] * 3, [1] * 3)
    ds = CocoChips(NWPU / "annotations/instances_test.json", NWPU / "images", spec, train=False)
    for image_id in ds.ids[:3]:  # JPEGs: PIL's and GDAL's decoders differ by up to 22 grey levels here
        path = NWPU / "images" / ds.coco.imgs[image_id]["file_name"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            with rasterio.open(path) as src:  # GDAL, as rs-engine reads it, and nothing of ours in between
                expected = src.read().astype(np.float32)
        np.testing.assert_array_equal(ds.load_image(image_id), expected)


def test_coco_chips_missing_band_is_an_error(tmp_path: Path) -> None:
    coco = _coco(tmp_path, np.full((64, 64, 3), 50, np.uint8), [(10, 10, 20, 20)])
    ds = CocoChips(coco, tmp_path, ChipSpec(64, [0, 3], [0, 0], [1, 1]), train=False)
    with pytest.raises(InputError, match="has 3 band"):
        ds.load_image(1)
    grey = CocoChips(_coco(tmp_path, np.full((64, 64), 7, np.uint8), []), tmp_path,
                     ChipSpec(64, [0, 1, 2], [0] * 3, [1] * 3), train=False)
    assert (grey.load_image(1) == 7).all() and grey.load_image(1).shape == (3, 64, 64)  # grey repeated, as inference


class _Truth(torch.nn.Module):
    """Stands in for a Mask R-CNN: predicts exactly the given boxes as masks (score 0.9, class 1)."""

    def __init__(self, boxes: list[tuple[int, int, int, int]]) -> None:
        super().__init__()
        self.boxes = boxes
        self.transform = SimpleNamespace(min_size=(800,), max_size=1333)

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        h, w = images[0].shape[-2:]
        masks = torch.zeros(len(self.boxes), 1, h, w)
        for k, (x0, y0, x1, y1) in enumerate(self.boxes):
            masks[k, 0, y0:y1, x0:x1] = 1
        n = len(self.boxes)
        return [{"boxes": torch.tensor(self.boxes, dtype=torch.float32).reshape(-1, 4), "masks": masks,
                 "labels": torch.ones(n, dtype=torch.int64), "scores": torch.full((n,), 0.9)}]


def test_no_object_of_a_size_is_minus_one_not_minus_100(tmp_path: Path) -> None:
    boxes = [(10, 10, 20, 20), (40, 40, 50, 52)]  # both small (area < 32^2)
    ds = CocoChips(_coco(tmp_path, np.full((64, 64, 3), 50, np.uint8), boxes), tmp_path,
                   ChipSpec(64, [0, 1, 2], [0] * 3, [1] * 3), train=False)
    metrics = evaluate_coco(_Truth(boxes), ds)
    for kind in ("segm", "bbox"):
        assert metrics[kind]["AP"] == 100.0 and metrics[kind]["AP_small"] == 100.0
        assert metrics[kind]["AP_medium"] == -1.0 and metrics[kind]["AP_large"] == -1.0


def test_gcp_only_scene_is_scored_in_the_frame_it_was_segmented_in(tmp_path, monkeypatch, make_card,
                                                                   label_predictor) -> None:
    import rs_engine.checkpoint
    import rs_engine.pipeline
    from training.evaluate import evaluate_raster

    data = np.full((120, 150), 10, np.uint8)
    data[30:60, 40:100] = 100
    # GCPs only (as many SAR products): a 2 m UTM grid, no geotransform.
    x0, y0, px = 500_000.0, 4_000_000.0, 2.0
    corners = ((0, 0), (0, 150), (120, 0), (120, 150))
    gcps = [GroundControlPoint(row=r, col=c, x=x0 + c * px, y=y0 - r * px) for r, c in corners]
    path = tmp_path / "sar.tif"
    with rasterio.open(path, "w", driver="GTiff", width=150, height=120, count=1, dtype="uint8") as dst:
        dst.write(data, 1)
        dst.gcps = (gcps, rasterio.crs.CRS.from_epsg(32616))
    truth = shapely.box(x0 + 40 * px, y0 - 60 * px, x0 + 100 * px, y0 - 30 * px)
    labels = tmp_path / "truth.gpkg"
    pyogrio.raw.write(labels, np.array([shapely.to_wkb(truth)], dtype=object), [np.array(["object"], dtype=object)],
                      ["class"], geometry_type="Polygon", crs="EPSG:32616", driver="GPKG")

    card = make_card(class_names=("object",))
    real_segment = rs_engine.pipeline.segment
    monkeypatch.setattr(rs_engine.checkpoint, "read_card", lambda model: card)
    monkeypatch.setattr(rs_engine.pipeline, "segment",
                        lambda inputs, out, options, **kw: real_segment(inputs, out, options,
                                                                       predictor=label_predictor(values=(100,)),
                                                                       card=card))
    metrics = evaluate_raster("stand-in", [path], labels, "class")
    assert metrics["f1@0.5"]["f1"] == pytest.approx(1.0)
    assert metrics["segm"]["AP50"] == 100.0
