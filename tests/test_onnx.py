"""The ONNX form of a model (issue 15): the exportable scan, ``rs-engine export``, and the bundled .onnx files."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rs_engine.card import bundled_models, read_card
from rs_engine.errors import InputError
from rs_engine.maskpaste import paste_window
from rs_engine.ops.scan_export import export_chunk_size, selective_scan_export
from rs_engine.ops.scan_reference import selective_scan_ref
from rs_engine.runtime import OnnxPredictor, load_predictor

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


@pytest.mark.parametrize(("length", "groups", "chunk"), [(1, 1, None), (37, 1, None), (100, 2, 8), (256, 4, None)])
def test_export_scan_equals_the_float64_reference(length, groups, chunk):
    g = torch.Generator().manual_seed(length)
    b, d, n = 2, 8 * groups, 4

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    u, delta, z = r(b, d, length), r(b, d, length), r(b, d, length)
    A = -torch.rand(d, n, generator=g, dtype=torch.float64) * 8  # strong decays: states reset inside chunks
    B, C, D, bias = r(b, groups, n, length), r(b, groups, n, length), r(d), r(d)
    ref = selective_scan_ref(u, delta, A, B, C, D, z, bias, True)
    out = selective_scan_export(u, delta, A, B, C, D, z, bias, True, chunk_size=chunk)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_export_chunk_size_is_near_sqrt_length():
    assert [export_chunk_size(n) for n in (1, 64, 256, 1024, 4096)] == [4, 8, 16, 32, 64]


@pytest.mark.parametrize("name", ["nwpu10", "ssdd-ship"])
def test_bundled_onnx_carries_the_bundled_card(name):
    """The .onnx beside each bundled .safetensors is its export: same card (a stale export fails here)."""
    onnx_path = bundled_models(".onnx")[name]
    torch_card, onnx_card = read_card(bundled_models(".safetensors")[name]), read_card(onnx_path)
    fixed = onnx_card.provenance.pop("onnx")
    assert fixed == {"tile_size": torch_card.tile_size, "min_score": torch_card.score_threshold, "opset": 17}
    assert onnx_card == torch_card
    assert onnx_path.stat().st_size < 25e6  # float16 weights


def _pasted(mask: np.ndarray, box: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """One RoI mask pasted into a full (H, W) tile plane."""
    window, r0, c0 = paste_window(mask, box, size)
    full = np.zeros(size, np.float32)
    full[r0:r0 + window.shape[0], c0:c0 + window.shape[1]] = window
    return full


def test_onnx_predictor_matches_torch_on_a_real_tile():
    """Same detections, scores and masks from ONNX Runtime as from PyTorch, on a tile of a real SAR scene.

    Not bit-equal: the runtimes' convolution kernels and the two scans sum in different orders, and float32
    rounding through the network moves scores by a few 1e-3 (measured 8.6e-4 with ssdd-ship 0.3, 3.1e-3 with 0.4)."""
    import rasterio

    torch_pred, card = load_predictor("ssdd-ship", runtime="torch", threads=1)
    onnx_pred, _ = load_predictor("ssdd-ship", runtime="onnx", threads=1)
    assert isinstance(onnx_pred, OnnxPredictor)
    with rasterio.open(EXAMPLES / "ssdd_001111.jpg") as ds:
        band = ds.read(1, window=((0, card.tile_size), (0, card.tile_size))).astype(np.float32)
    tile = ((band - card.mean[0]) / card.std[0])[None]
    a, b = torch_pred([tile])[0], onnx_pred([tile])[0]
    keep_a = a["scores"] >= card.score_threshold
    assert keep_a.sum() >= 1 and len(b["scores"]) == keep_a.sum()
    np.testing.assert_allclose(b["scores"], a["scores"][keep_a], atol=5e-3)
    np.testing.assert_array_equal(b["labels"], a["labels"][keep_a])
    np.testing.assert_allclose(b["boxes"], a["boxes"][keep_a], atol=0.5)  # pixels
    assert b["roi_masks"].shape == (len(b["scores"]), 1, 28, 28)  # box-frame masks: the engine pastes them
    size = tile.shape[-2:]
    ma = np.stack([_pasted(m, box, size) for m, box in zip(a["roi_masks"][keep_a], a["boxes"][keep_a])]) > 0.5
    mb = np.stack([_pasted(m, box, size) for m, box in zip(b["roi_masks"], b["boxes"])]) > 0.5
    iou = (ma & mb).sum((1, 2)) / (ma | mb).sum((1, 2))
    assert iou.min() >= 0.98, iou


def test_onnx_model_refuses_another_tile_size(tmp_path):
    from rs_engine import SegmentOptions, segment

    with pytest.raises(InputError, match="exported for 256 px tiles, not 512"):
        segment([EXAMPLES / "ssdd_001111.jpg"], tmp_path / "o.gpkg",
                SegmentOptions(model="ssdd-ship", runtime="onnx", tile_size=512))  # fmt: skip
    assert not list(tmp_path.iterdir())


def test_export_cli_writes_a_model_onnx_runtime_runs(tmp_path):
    out = tmp_path / "ship.onnx"
    r = subprocess.run([sys.executable, "-m", "rs_engine.cli", "export", "ssdd-ship", "-o", str(out),
                        "--tile-size", "128", "--min-score", "0.3"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    card = read_card(out)
    assert card.tile_size == 128 and card.provenance["onnx"]["min_score"] == 0.3
    pred, _ = load_predictor(out, runtime="onnx", threads=1)
    assert pred.runtime == "onnx" and pred.input_shape == (1, 128, 128)
    auto, _ = load_predictor(out, threads=1, device="cpu")  # an .onnx file: OpenVINO where installed, else ORT
    assert auto.runtime == ("openvino" if importlib.util.find_spec("openvino") else "onnx")
    assert set(pred([np.zeros((1, 128, 128), np.float32)])[0]) == {"boxes", "labels", "scores", "roi_masks"}
    again = subprocess.run([sys.executable, "-m", "rs_engine.cli", "export", "ssdd-ship", "-o", str(out)],
                           capture_output=True, text=True, timeout=600)  # fmt: skip
    assert again.returncode == 2 and again.stderr.strip().endswith("exists (use --overwrite to replace it)")
    assert len(again.stderr.strip().splitlines()) == 1


def test_export_refuses_what_onnx_cannot_express_and_leaves_nothing(tmp_path, monkeypatch):
    """A network with an operator that has no ONNX form: one line naming the model, nothing at OUT, no temp file."""
    import rs_engine.checkpoint as checkpoint
    from rs_engine.export import export_onnx

    real = checkpoint.load_model

    def with_inexpressible_op(spec, device="cpu"):
        model, card = real(spec, device)
        body = model.backbone.body
        forward = body.forward
        body.forward = lambda x: forward(torch.special.bessel_j0(x))  # no ONNX symbolic exists for it
        return model, card

    monkeypatch.setattr(checkpoint, "load_model", with_inexpressible_op)
    out = tmp_path / "m.onnx"
    with pytest.raises(InputError) as err:
        export_onnx("ssdd-ship", out, tile_size=64)
    message = str(err.value)
    assert message.startswith("ssdd-ship: cannot be exported to ONNX (") and "\n" not in message
    assert list(tmp_path.iterdir()) == []


def test_doctor_names_the_runtimes():
    r = subprocess.run([sys.executable, "-m", "rs_engine.cli", "doctor", "--json"], capture_output=True, text=True,
                       timeout=120)  # fmt: skip
    facts = json.loads(r.stdout)
    openvino = ["openvino"] if importlib.util.find_spec("openvino") else []  # an extra (issue 14)
    assert facts["runtimes"] == ["torch", "onnx", *openvino] and facts["onnxruntime"]
    assert facts["bundled_onnx"] == ["nwpu10", "ssdd-ship"]


def test_card_of_a_broken_onnx_file_is_one_line_error(tmp_path):
    """A truncated or junk .onnx file: one InputError line naming the file, from read_card (the onnx package
    reads the metadata; ONNX Runtime only where it is absent)."""
    from rs_engine.card import read_card

    whole = (ROOT / "rs_engine" / "weights" / "nwpu10.onnx").read_bytes()
    for name, data in [("cut.onnx", whole[: len(whole) // 2]), ("junk.onnx", b"\x08\x07junk" * 50)]:
        bad = tmp_path / name
        bad.write_bytes(data)
        with pytest.raises(InputError, match=f"^{bad}: ") as err:
            read_card(bad)
        assert "\n" not in str(err.value)
    assert read_card(ROOT / "rs_engine" / "weights" / "nwpu10.onnx").name == "nwpu10"
