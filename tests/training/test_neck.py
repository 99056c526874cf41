"""The depthwise-separable neck (ModelConfig.neck "separable_fpn"): built, saved and read back, started from a dense
model (factorised, then fitted on real chips), and segmenting through rs-engine."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pyogrio
import pytest
import torch

from rs_engine.checkpoint import load_model, save_model
from rs_engine.models import ModelConfig, build_model
from training.train import factorise_separable, init_from

ROOT = Path(__file__).resolve().parents[2]
NWPU = ROOT.parent / "shared" / "data" / "nwpu_vhr10"


def test_factorise_recovers_a_separable_kernel_and_is_least_squares() -> None:
    torch.manual_seed(0)
    dw, pw = torch.randn(8, 1, 3, 3), torch.randn(5, 8, 1, 1)
    dense = pw * dw.permute(1, 0, 2, 3)  # (5, 8, 3, 3), rank 1 per input channel
    d2, p2 = factorise_separable(dense)
    torch.testing.assert_close(p2 * d2.permute(1, 0, 2, 3), dense, rtol=1e-5, atol=1e-5)
    # A general kernel: no rank-1 pair per channel is closer than the SVD's (perturb it: the error grows).
    w = torch.randn(5, 8, 3, 3)
    d2, p2 = factorise_separable(w)
    err = (p2 * d2.permute(1, 0, 2, 3) - w).norm()
    for _ in range(5):
        d3 = d2 + 0.05 * torch.randn_like(d2)
        p3 = p2 + 0.05 * torch.randn_like(p2)
        assert (p3 * d3.permute(1, 0, 2, 3) - w).norm() > err


def test_separable_model_builds_saves_and_loads(tmp_path, make_card) -> None:
    config = ModelConfig(backbone="ssm_tiny", in_channels=3, num_classes=2, tile_size=64, neck="separable_fpn")
    torch.manual_seed(0)
    model = build_model(config).eval()
    convs = [m for m in model.backbone.fpn.layer_blocks.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 8 and sum(m.groups > 1 for m in convs) == 4
    dense = sum(p.numel() for p in build_model(dataclasses.replace(config, neck="fpn")).parameters())
    assert sum(p.numel() for p in model.parameters()) < dense
    card = make_card(bands=3, class_names=("a", "b"))
    card.architecture = config.to_dict()
    assert card.architecture["neck"] == "separable_fpn" and "neck" not in ModelConfig().to_dict()
    path = save_model(tmp_path / "sep.safetensors", model, card, half=False)
    loaded, card2 = load_model(path)
    x = [torch.randn(3, 64, 64)]
    with torch.no_grad():
        a, b = model.backbone(x[0][None]), loaded.backbone(x[0][None])
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    with pytest.raises(ValueError, match="unknown neck"):
        ModelConfig(neck="bifpn")


@pytest.mark.skipif(not NWPU.exists(), reason="needs ../shared/data/nwpu_vhr10")
def test_dense_to_separable_fit_on_real_chips() -> None:
    from training.coco import ChipSpec, CocoChips
    from training.neck import fit_separable_neck

    _, card = load_model("nwpu10")
    spec = ChipSpec(512, [0, 1, 2], card.mean, card.std)
    chips = CocoChips(NWPU / "annotations" / "instances_train.json", NWPU / "images", spec, train=False)
    model = build_model(ModelConfig.from_dict({**card.architecture, "neck": "separable_fpn"}))
    info = init_from(model, "nwpu10")
    assert info["skipped"] == [] and len(info["adapted"]) == 5  # 4 FPN outputs + the RPN conv, nothing left new
    fit = fit_separable_neck(model, "nwpu10", chips, max_chips=2, steps=40)
    for before, after in fit["relative_error"].values():
        assert after < 0.8 * before


@pytest.mark.skipif(not NWPU.exists(), reason="needs ../shared/data/nwpu_vhr10")
def test_separable_model_segments_through_rs_engine(tmp_path) -> None:
    """A separable-neck nwpu10 (fitted, not fine-tuned) runs through `rs-engine segment` on a real image and
    finds objects there."""
    from training.coco import ChipSpec, CocoChips
    from training.neck import fit_separable_neck

    dense, card = load_model("nwpu10")
    model = build_model(ModelConfig.from_dict({**card.architecture, "neck": "separable_fpn"}))
    init_from(model, "nwpu10")
    spec = ChipSpec(512, [0, 1, 2], card.mean, card.std)
    chips = CocoChips(NWPU / "annotations" / "instances_train.json", NWPU / "images", spec, train=False)
    fit_separable_neck(model, "nwpu10", chips, max_chips=4, steps=150)
    card = dataclasses.replace(card, architecture={**card.architecture, "neck": "separable_fpn"}, name="sep")
    path = save_model(tmp_path / "sep.safetensors", model.eval(), card)
    out = tmp_path / "out.gpkg"
    r = subprocess.run([sys.executable, "-m", "rs_engine.cli", "segment", str(ROOT / "examples" / "nwpu_021.jpg"),
                        "--model", str(path), "--runtime", "torch", "--output", str(out)], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert pyogrio.read_info(out, layer="instances")["features"] >= 3
