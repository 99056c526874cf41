"""``rs-train quantize``: a model's int8 form for OpenVINO (:mod:`rs_engine.runtime_int8`), by NNCF's post-training
quantization (https://github.com/openvinotoolkit/nncf, ``nncf.quantize``: min-max ranges of each quantized
input over calibration tiles, per-channel symmetric weights, fast bias correction) of the fused-scan graph.

What is quantized: the inputs of convolutions and matrix products only (OpenVINO's CPU plugin runs those in int8).
Elementwise and indexing operations are left to floating point: NNCF would otherwise quantize the box decoding
(pixel coordinates, anchor offsets) to 256 levels, which lost every detection of nwpu10 on a real tile. The
selective scans (custom nodes) stay in float32.

Calibration tiles are the engine's: ``tile_size`` windows of training images near their objects, the card's bands,
normalised with its mean and standard deviation, padded with 0 (the band mean) past the image edge, as
:meth:`rs_engine.raster.RasterSource.read_tile` does. Use training images, never the test split.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from rs_engine.errors import InputError

log = logging.getLogger(__name__)

#: OpenVINO operation types NNCF may not quantize (see the module docstring).
FLOAT_TYPES = ["If", "Add", "Multiply", "Subtract", "Divide", "Exp", "Gather", "Concat", "Maximum", "Minimum"]
#: Node name patterns left in floating point: the heads' last layers (class logits, box deltas), and the mask
#: branch, which runs on the detections only: over calibration tiles with none its tensors are empty, and one
#: quantizer NNCF placed there anyway (on the last mask-head ReLU, outside its ignored scope) made every mask of
#: nwpu10 one constant. :func:`drop_quantizers` removes any such quantizer after NNCF.
FLOAT_PATTERNS = [".*box_predictor.*", ".*rpn/head/(cls_logits|bbox_pred).*", ".*mask_(roi_pool|head|predictor).*"]


def calibration_tiles(coco_json: Path, images: Path, card: Any, count: int, seed: int = 0) -> list[np.ndarray]:
    """``count`` normalised (bands, T, T) float32 tiles of random images of a COCO file, each centred near a random
    annotated object of its image (so that the box head sees detections; a random place where it has none).

    Raises:
        InputError: an unreadable annotation file or image, or an image with fewer bands than the card's.
    """
    import rasterio
    from rasterio.windows import Window

    try:
        coco = json.loads(Path(coco_json).read_text())
        entries, boxes = coco["images"], {}
        for a in coco.get("annotations", []):
            boxes.setdefault(a["image_id"], []).append(a["bbox"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{coco_json}: not a readable COCO annotation file ({exc})") from None
    if not entries:
        raise InputError(f"{coco_json}: no images")
    rng = np.random.default_rng(seed)
    t, bands = card.tile_size, card.bands
    mean, std = np.float32(card.mean)[:, None, None], np.float32(card.std)[:, None, None]
    tiles = []
    for k in rng.choice(len(entries), count, replace=count > len(entries)):
        path = Path(images) / entries[k]["file_name"]
        try:
            with rasterio.open(path) as ds:
                if ds.count < bands:
                    raise InputError(f"{path}: {ds.count} band(s), the model takes {bands}")
                near = boxes.get(entries[k].get("id"))
                if near:  # the window's centre: a random object's, moved by up to a quarter tile
                    bx, by, bw, bh = near[rng.integers(len(near))]
                    cx, cy = (bx + bw / 2, by + bh / 2) + rng.uniform(-t / 4, t / 4, 2)
                else:
                    cx, cy = rng.uniform(0, ds.width), rng.uniform(0, ds.height)
                x0 = int(np.clip(cx - t / 2, 0, max(0, ds.width - t)))
                y0 = int(np.clip(cy - t / 2, 0, max(0, ds.height - t)))
                win = Window(x0, y0, min(t, ds.width - x0), min(t, ds.height - y0))
                a = ds.read(list(range(1, bands + 1)), window=win).astype(np.float32)
        except rasterio.errors.RasterioError as exc:
            raise InputError(f"{path}: cannot read ({exc})") from None
        tile = np.zeros((bands, t, t), np.float32)  # padding: 0 after normalisation, the band mean
        tile[:, : a.shape[1], : a.shape[2]] = (a - mean) / std
        tiles.append(tile)
    return tiles


def unshare_body_constants(model: Any) -> int:
    """Give each ``If`` body its own copy of every Constant that nodes outside the body also read; returns how
    many inputs were redirected.

    Why: OpenVINO's ONNX reader shares constants between a graph and its ``If`` bodies, and NNCF builds each body's
    graph from the body's own nodes, failing on the outside consumer ("Could not find a node ... in NNCFGraph").
    """
    import openvino as ov

    moved = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() != "If":
            continue
        for branch in range(2):
            body = op.get_function(branch)
            inside = {o.get_friendly_name() for o in body.get_ops()}
            for c in body.get_ops():
                if c.get_type_name() != "Constant":
                    continue
                targets = list(c.output(0).get_target_inputs())
                if all(t.get_node().get_friendly_name() in inside for t in targets):
                    continue
                copy = ov.op.Constant(np.array(c.get_data()), shared_memory=False)
                copy.set_friendly_name(f"{c.get_friendly_name()}/body{branch}")
                for t in targets:
                    if t.get_node().get_friendly_name() in inside:
                        t.replace_source_output(copy.output(0))
                        moved += 1
            moved += unshare_body_constants(body)
            body.validate_nodes_and_infer_types()
    return moved


def drop_quantizers(model: Any, patterns: list[str]) -> int:
    """Remove every FakeQuantize whose name matches one of ``patterns`` (its input passed on unchanged); returns
    how many."""
    import re

    dropped = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() == "FakeQuantize" and any(re.fullmatch(p, op.get_friendly_name()) for p in patterns):
            op.output(0).replace(op.input_value(0))
            dropped += 1
    if dropped:
        model.validate_nodes_and_infer_types()
    return dropped


def quantize(model_spec: str, coco_json: Path, images: Path, out: Path | None = None, tiles: int = 64,
             seed: int = 0, overwrite: bool = False) -> dict[str, Any]:
    """Write the int8 IR of a model (a bundled name, or a ``.onnx`` with its ``.safetensors`` beside it).

    Args:
        model_spec: model name or path. out: the ``.xml`` to write (default: ``NAME.int8.xml`` beside the
            ``.onnx``, where :func:`rs_engine.runtime_int8.int8_graph` looks). tiles: calibration tiles.

    Returns:
        ``{"output", "tiles", "seconds", "quantized"}`` (the number of FakeQuantize nodes).

    Raises:
        InputError: no ``.onnx`` form or no ``.safetensors`` beside it, no fused scan kernel, an existing output
            without ``overwrite``, unreadable calibration data.
    """
    import time

    import nncf
    import openvino as ov

    from rs_engine.card import read_card
    from rs_engine.runtime import model_file
    from rs_engine.runtime_int8 import DIGEST_KEY, int8_file
    from rs_engine.runtime_openvino import fused_scan_graph, read_model, scan_graph_digest

    onnx = model_file(model_spec, "openvino")
    card = read_card(onnx)
    out = Path(out) if out else int8_file(onnx)
    if out.suffix != ".xml":
        raise InputError(f"{out}: the output is an OpenVINO IR, name it NAME.int8.xml")
    if out.exists() and not overwrite:
        raise InputError(f"{out} exists (use --overwrite)")
    graph, why = fused_scan_graph(onnx, card)
    if graph is None:
        raise InputError(f"{onnx}: cannot make the fused-scan graph to quantize ({why})")
    data = calibration_tiles(coco_json, images, card, tiles, seed)
    model = read_model(graph, fused_scan=True, scan_threads=max(1, len(os.sched_getaffinity(0))))
    unshare_body_constants(model)
    start = time.perf_counter()
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

    # Overflow fix on every layer, not NNCF's default first layer only: the file runs on any CPU, and without VNNI
    # (AVX2-only CPUs) oneDNN's u8 x s8 products are summed in pairs into int16 with saturation, which full 8-bit
    # weights overflow (NNCF's docs); 7-bit weight ranges avoid it.
    q = nncf.quantize(model, nncf.Dataset(data), subset_size=len(data), fast_bias_correction=True,
                      ignored_scope=nncf.IgnoredScope(types=FLOAT_TYPES, patterns=FLOAT_PATTERNS,
                                                                    validate=False),
                      advanced_parameters=AdvancedQuantizationParameters(overflow_fix=OverflowFix.ENABLE))
    seconds = time.perf_counter() - start
    dropped = drop_quantizers(q, FLOAT_PATTERNS)
    q.set_rt_info(scan_graph_digest(onnx.with_suffix(".safetensors"), card), list(DIGEST_KEY))
    q.set_rt_info(f"nncf {nncf.__version__}, {len(data)} tiles of {Path(coco_json).name}, seed {seed}",
                  ["delineate", "calibration"])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.{os.getpid()}.xml")
    try:  # written under a temporary name, then renamed: a reader never sees half a model
        ov.save_model(q, tmp, compress_to_fp16=False)  # float constants as they are (fp16 moved boxes)
        os.replace(tmp.with_suffix(".bin"), out.with_suffix(".bin"))
        os.replace(tmp, out)
    finally:
        for f in (tmp, tmp.with_suffix(".bin")):
            f.unlink(missing_ok=True)
    fq = sum(op.get_type_name() == "FakeQuantize" for op in q.get_ops())
    log.info("%s: %d quantized inputs (%d dropped), calibrated on %d tiles in %.0f s", out, fq, dropped, len(data),
             seconds)
    return {"output": str(out), "tiles": len(data), "seconds": round(seconds, 1), "quantized": fq}
