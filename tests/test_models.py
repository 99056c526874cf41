"""Backbones, build_model and the model file (checkpoint.py)."""

from __future__ import annotations

import pytest
import torch

from rs_engine.checkpoint import ModelCard, load_model, read_card, save_model
from rs_engine.errors import InputError
from rs_engine.models import BACKBONES, ModelConfig, build_model, count_flops


def _card(config: ModelConfig, name: str = "unit") -> ModelCard:
    return ModelCard(
        name=name, version="0.1", architecture=config.to_dict(),
        class_names=[f"c{i}" for i in range(config.num_classes)], bands=config.in_channels,
        mean=[0.0] * config.in_channels, std=[1.0] * config.in_channels, tile_size=config.tile_size,
    )


@pytest.mark.parametrize("name", ["ssm_tiny", "ssm_small", "ssm_base", "rs4d_s"])
def test_backbone_sizes_give_four_scales(name: str) -> None:
    model = build_model(ModelConfig(backbone=name, tile_size=64))
    feats = model.backbone.body(torch.randn(2, 3, 64, 64))
    assert [f.shape[-1] for f in feats.values()] == [16, 8, 4, 2]
    assert [f.shape[1] for f in feats.values()] == model.backbone.body.out_channels_list


def test_sizes_grow() -> None:
    params = [count_flops(build_model(ModelConfig(backbone=n)), 64)["params_m"]
              for n in ("ssm_tiny", "ssm_small", "ssm_base")]
    assert params[0] < params[1] < params[2]


@pytest.mark.parametrize("bands,classes", [(1, 1), (3, 10), (5, 2)])
def test_any_bands_and_classes(bands: int, classes: int) -> None:
    model = build_model(ModelConfig(in_channels=bands, num_classes=classes, tile_size=64)).eval()
    model.roi_heads.score_thresh = 0.0  # an untrained head scores low: keep every detection, so labels are checked
    with torch.no_grad():
        out = model([torch.randn(bands, 64, 64)])[0]
    assert set(out) == {"boxes", "labels", "scores", "masks"}
    assert out["labels"].numel() > 0 and out["masks"].shape[1:] == (1, 64, 64)
    assert 1 <= int(out["labels"].min()) and int(out["labels"].max()) <= classes


def test_training_step_reaches_backbone() -> None:
    model = build_model(ModelConfig(in_channels=1, num_classes=1, tile_size=64)).train()
    masks = torch.zeros(1, 64, 64, dtype=torch.uint8)
    masks[0, 10:30, 12:40] = 1
    target = {"boxes": torch.tensor([[12.0, 10.0, 40.0, 30.0]]), "labels": torch.tensor([1]), "masks": masks}
    losses = model([torch.randn(1, 64, 64)], [target])
    sum(losses.values()).backward()
    grad = model.backbone.body.stages[0][0].mixer.A_log.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_flops_count_includes_scan() -> None:
    f = count_flops(build_model(ModelConfig(backbone="ssm_tiny")), 128)
    assert 0 < f["scan_gflops"] < f["backbone_gflops"]


def test_unknown_backbone() -> None:
    with pytest.raises(ValueError, match="unknown backbone"):
        ModelConfig(backbone="nope")
    assert "ssm_tiny" in BACKBONES


def test_checkpoint_round_trip(tmp_path) -> None:
    config = ModelConfig(in_channels=3, num_classes=2, tile_size=64)
    torch.manual_seed(0)
    model = build_model(config).eval()
    path = save_model(tmp_path / "m.safetensors", model, _card(config))
    loaded, card = load_model(path)
    assert card.class_names == ["c0", "c1"] and ModelConfig.from_dict(card.architecture) == config
    x = torch.randn(3, 64, 64)
    with torch.no_grad():
        a = model.backbone(x[None])
        b = loaded.backbone(x[None])
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    assert path.read_bytes()[:8] != b"\x80\x02\x8a\n" and b"model_card" in path.read_bytes()[:20000]


def test_checkpoint_fp16_is_half_size_and_close(tmp_path) -> None:
    config = ModelConfig(tile_size=64)
    model = build_model(config).eval()
    full = save_model(tmp_path / "f.safetensors", model, _card(config))
    half = save_model(tmp_path / "h.safetensors", model, _card(config), half=True)
    assert half.stat().st_size < 0.55 * full.stat().st_size
    loaded, _ = load_model(half)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = model.backbone(x), loaded.backbone(x)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0.05, atol=0.05)


def test_bad_model_files(tmp_path) -> None:
    with pytest.raises(InputError, match="unknown model name"):
        read_card("no-such-model")
    with pytest.raises(InputError, match="not found"):
        read_card(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(InputError, match="not a valid model file"):
        load_model(junk)
    config = ModelConfig(tile_size=64)
    good = save_model(tmp_path / "g.safetensors", build_model(config), _card(config))
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(InputError):
        load_model(truncated)
    # weights that don't fit the card's architecture
    other = ModelConfig(backbone="ssm_small", tile_size=64)
    wrong = save_model(tmp_path / "w.safetensors", build_model(config), _card(other))
    with pytest.raises(InputError, match="don't match"):
        load_model(wrong)


def test_update_card_keeps_weights(tmp_path) -> None:
    from rs_engine.checkpoint import load_state, update_card

    config = ModelConfig(tile_size=64)
    path = save_model(tmp_path / "m.safetensors", build_model(config), _card(config), half=True)
    before, card = load_state(path)
    card.provenance["metrics"] = {"test": {"segm": {"AP": 12.5}}}
    update_card(path, card)
    after, card2 = load_state(path)
    assert card2.provenance["metrics"]["test"]["segm"]["AP"] == 12.5
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)
