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


def _dense_from_bundled(path: Path, noise: float = 0.0) -> None:
    """A dense-neck nwpu10 at ``path``: each separable pair of the bundled (separable) nwpu10 expanded exactly into
    the dense kernel ``pointwise[o, c] * depthwise[c]``, plus ``noise`` (relative) so that it is no longer rank 1
    per input channel, as a trained dense kernel is not. The bundled defaults are all separable now."""
    sep, card = load_model("nwpu10")
    config = ModelConfig.from_dict({**card.architecture, "neck": "fpn"})
    dense = build_model(config)
    state, own = sep.state_dict(), dense.state_dict()
    torch.manual_seed(0)
    for k in own:
        if k in state and state[k].shape == own[k].shape:
            own[k] = state[k]
        elif k.endswith(".0.weight"):  # a dense 3x3 kernel in place of (depthwise, pointwise)
            dw, pw = state[k], state[k.removesuffix("0.weight") + "1.weight"]
            w = pw * dw.permute(1, 0, 2, 3)
            own[k] = w + noise * w.std() * torch.randn_like(w)
            own[k.removesuffix("weight") + "bias"] = state[k.removesuffix("0.weight") + "1.bias"]
    dense.load_state_dict(own)
    card = dataclasses.replace(card, architecture=config.to_dict(), name="dense")
    save_model(path, dense.eval(), card)


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
def test_dense_to_separable_fit_on_real_chips(tmp_path) -> None:
    from training.coco import ChipSpec, CocoChips
    from training.neck import fit_separable_neck

    dense = tmp_path / "dense.safetensors"
    _dense_from_bundled(dense, noise=1.0)
    _, card = load_model(dense)
    spec = ChipSpec(512, [0, 1, 2], card.mean, card.std)
    chips = CocoChips(NWPU / "annotations" / "instances_train.json", NWPU / "images", spec, train=False)
    model = build_model(ModelConfig.from_dict({**card.architecture, "neck": "separable_fpn"}))
    info = init_from(model, dense)
    assert info["skipped"] == [] and len(info["adapted"]) == 5  # 4 FPN outputs + the RPN conv, nothing left new
    fit = fit_separable_neck(model, dense, chips, max_chips=2, steps=40)
    for before, after in fit["relative_error"].values():
        assert after < 0.8 * before


@pytest.mark.skipif(not NWPU.exists(), reason="needs ../shared/data/nwpu_vhr10")
def test_separable_model_segments_through_rs_engine(tmp_path) -> None:
    """A dense-neck model converted to the separable neck (factorised and fitted, not fine-tuned) runs through
    `rs-engine segment` on a real image and finds objects there."""
    from training.coco import ChipSpec, CocoChips
    from training.neck import fit_separable_neck

    dense = tmp_path / "dense.safetensors"
    _dense_from_bundled(dense)
    _, card = load_model(dense)
    model = build_model(ModelConfig.from_dict({**card.architecture, "neck": "separable_fpn"}))
    init_from(model, dense)
    spec = ChipSpec(512, [0, 1, 2], card.mean, card.std)
    chips = CocoChips(NWPU / "annotations" / "instances_train.json", NWPU / "images", spec, train=False)
    fit_separable_neck(model, dense, chips, max_chips=4, steps=150)
    card = dataclasses.replace(card, architecture={**card.architecture, "neck": "separable_fpn"}, name="sep")
    path = save_model(tmp_path / "sep.safetensors", model.eval(), card)
    out = tmp_path / "out.gpkg"
    r = subprocess.run([sys.executable, "-m", "rs_engine.cli", "segment", str(ROOT / "examples" / "nwpu_021.jpg"),
                        "--model", str(path), "--runtime", "torch", "--output", str(out)], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert pyogrio.read_info(out, layer="instances")["features"] >= 3
