"""Dual relation distillation (seed 002): relation maps, distances and the loss module on hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from rs_engine.errors import InputError
from training.distill.drd import (
    DRDLoss,
    channel_distance,
    channel_relation,
    pool_positions,
    spatial_distance,
    spatial_relation,
)

R2 = 1 / math.sqrt(2)


def test_spatial_relation_is_cosine_between_positions() -> None:
    # Two positions (1 x 2 grid), 2 channels: p0 = (1, 0), p1 = (3, 3) -> cos = 1/sqrt(2) whatever the length.
    x = torch.tensor([[[[1.0, 3.0]], [[0.0, 3.0]]]])
    a = spatial_relation(x)
    assert a.shape == (1, 2, 2)
    torch.testing.assert_close(a[0], torch.tensor([[1.0, R2], [R2, 1.0]]))


def test_channel_relation_is_normalised_gram() -> None:
    # Channel 0 = (1, 0, 0, 0), channel 1 = (2, 2, 0, 0) over 4 positions -> cos = 1/sqrt(2).
    x = torch.tensor([[1.0, 0, 0, 0], [2.0, 2, 0, 0]]).view(1, 2, 2, 2)
    torch.testing.assert_close(channel_relation(x)[0], torch.tensor([[1.0, R2], [R2, 1.0]]))


def test_spatial_distance_is_rowwise_kl_of_softmax() -> None:
    a_s = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    a_t = torch.tensor([[[1.0, R2], [R2, 1.0]]])
    # By hand, tau = 1: row 0 teacher p = softmax(1, 0.7071), student q = softmax(1, 0); rows are symmetric.
    p0 = math.exp(1) / (math.exp(1) + math.exp(R2))
    q0 = math.exp(1) / (math.exp(1) + 1)
    kl = p0 * math.log(p0 / q0) + (1 - p0) * math.log((1 - p0) / (1 - q0))
    torch.testing.assert_close(spatial_distance(a_s, a_t, tau=1.0), torch.tensor([kl]))
    assert float(spatial_distance(a_t, a_t)) == pytest.approx(0.0, abs=1e-7)


def test_channel_distance_is_mse() -> None:
    g_s = torch.eye(2).unsqueeze(0)
    g_t = torch.tensor([[[1.0, 0.5], [0.5, 1.0]]])
    assert float(channel_distance(g_s, g_t)) == pytest.approx((0.25 + 0.25) / 4)


def test_pooling_caps_positions_and_keeps_aspect() -> None:
    assert pool_positions(torch.zeros(1, 3, 64, 64), 1024).shape[-2:] == (32, 32)
    assert pool_positions(torch.zeros(1, 3, 10, 40), 100).shape[-2:] == (5, 20)
    assert pool_positions(torch.zeros(1, 3, 8, 8), 1024).shape[-2:] == (8, 8)
    # A (B, C, 128, 128) stride-4 map of a 512 px chip gives a 1024 x 1024 spatial map, not 16384 x 16384.
    assert spatial_relation(torch.randn(2, 4, 128, 128)).shape == (2, 1024, 1024)


def test_drd_loss_zero_on_identical_features_and_positive_otherwise() -> None:
    torch.manual_seed(0)
    loss_fn = DRDLoss([(4, 4)])
    with torch.no_grad():  # identity projection: student == teacher gives zero loss
        loss_fn.proj[0].weight.copy_(torch.eye(4).view(4, 4, 1, 1))
        loss_fn.proj[0].bias.zero_()
    t = torch.randn(2, 4, 6, 6)
    loss, logs = loss_fn([t.clone()], [t])
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-6) and set(logs) == {"drd_spatial", "drd_channel"}
    s = torch.randn(2, 4, 3, 3, requires_grad=True)  # other values, other size (resized to the teacher's)
    loss, logs = loss_fn([s], [t])
    assert float(loss.detach()) > 0.01 and logs["drd_spatial"] > 0 and logs["drd_channel"] > 0
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_drd_loss_pairs_must_match() -> None:
    with pytest.raises(ValueError, match="pairs"):
        DRDLoss([(4, 4)])([torch.zeros(1, 4, 2, 2)] * 2, [torch.zeros(1, 4, 2, 2)] * 2)


class _Squares(torch.utils.data.Dataset):
    """Two 64 px 3-band chips with one bright square each (a Mask R-CNN loss needs an instance)."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int):  # noqa: ANN204
        import numpy as np

        from training.augment import make_target

        masks = np.zeros((1, 64, 64), np.uint8)
        masks[0, 10 + 20 * i:30 + 20 * i, 20:40] = 1
        img = torch.zeros(3, 64, 64)
        img[:, torch.from_numpy(masks[0]).bool()] = 2.0
        return img, make_target(masks, np.array([1]))


def test_drd_as_extra_loss_of_supervised_training(tmp_path, make_card) -> None:
    """train(extra_loss=DRDExtraLoss): the DRD term runs every step on the hooked backbone features, its projections
    learn and live in the resume file only; the model file stays a plain model file."""
    from safetensors.torch import load_file

    from rs_engine.checkpoint import load_model
    from rs_engine.models import ModelConfig, build_model
    from training.distill.objective import DRDExtraLoss
    from training.distill.teachers import build_teacher
    from training.train import TrainConfig, train

    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="ssm_tiny", num_classes=1, tile_size=64))
    card = make_card(bands=3, class_names=("blob",))
    card.architecture = ModelConfig(backbone="ssm_tiny", num_classes=1, tile_size=64).to_dict()
    teacher = build_teacher("model:ssdd-ship")  # a 1-band SAR model cannot teach on 3-band chips
    assert teacher.in_channels == 1
    with pytest.raises(InputError, match="bands"):
        DRDExtraLoss(model, teacher, card.mean, card.std, 1.0)
    teacher = build_teacher("efficientnet_lite0")
    extra = DRDExtraLoss(model, teacher, card.mean, card.std, weight=0.5)
    before = extra.drd.proj[0].weight.detach().clone()
    calls = []

    def counted(m, images):  # noqa: ANN001, ANN202
        loss = extra(m, images)
        calls.append(float(loss.detach()))
        return loss

    out = tmp_path / "m.safetensors"
    train(model, card, _Squares(), out, TrainConfig(epochs=1, batch_size=1, warmup_steps=1, num_workers=0),
          extra_loss=counted)
    assert len(calls) == 2 and all(c > 0 for c in calls)
    assert torch.equal(extra.drd.proj[0].weight, before)  # a plain callable: its parameters are not optimised
    out2 = tmp_path / "m2.safetensors"
    train(model, card, _Squares(), out2, TrainConfig(epochs=1, batch_size=1, warmup_steps=1, num_workers=0),
          extra_loss=extra)  # an nn.Module: its projections are optimised and resumable
    assert not torch.equal(extra.drd.proj[0].weight, before)
    resume = load_file(str(out2.with_suffix(".resume.safetensors")))
    assert any(k.startswith("extra.drd.proj.") for k in resume)
    loaded, _ = load_model(out2)  # no DRD tensors in the model file (load_model is strict)
    assert not any("drd" in k for k in loaded.state_dict())


def test_cli_train_with_drd_teacher_on_sar(tmp_path, ssdd_subset) -> None:
    """rs-train train --drd-teacher: an RGB teacher on 1-band SAR chips (the band is repeated for it)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from rs_engine.checkpoint import read_card

    ssdd = Path(__file__).resolve().parents[3] / "shared" / "data" / "ssdd"
    if not ssdd.is_dir():
        pytest.skip("../shared/data (SSDD) not present")
    out = tmp_path / "m.safetensors"
    r = subprocess.run([sys.executable, "-m", "training.cli", "train", "--coco", str(ssdd_subset(2)), "--images",
                        str(ssdd / "images"), "--bands", "1", "--chip-size", "64", "--batch-size", "1", "--epochs", "1",
                        "--warmup-steps", "1", "--workers", "0", "--drd-teacher", "efficientnet_lite0",
                        "--drd-weight", "0.5", "--progress", "none", "--out", str(out)],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert read_card(out).provenance["drd"] == {"teacher": "efficientnet_lite0", "weight": 0.5}
