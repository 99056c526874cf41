"""Distillation (RS4D, seed 000): feature loss, perturbation and its adaptive rule, teachers, the distill command."""

from __future__ import annotations

import pytest
import torch

from rs_engine.errors import InputError
from training.distill.losses import Perturbation, PerturbConfig, Projection, feature_l1, perturb, whiten


def test_feature_l1_by_hand() -> None:
    s = torch.tensor([1.0, -2.0, 3.0, 0.5]).view(1, 1, 2, 2).repeat(2, 1, 1, 1)
    t = torch.zeros(2, 1, 2, 2)
    t[1] = 1.0
    # sample 0: (1 + 2 + 3 + 0.5) / 4 = 1.625; sample 1: (0 + 3 + 2 + 0.5) / 4 = 1.375
    torch.testing.assert_close(feature_l1(s, t), torch.tensor([1.625, 1.375]))
    with pytest.raises(ValueError, match="differ"):
        feature_l1(s, torch.zeros(2, 2, 2, 2))


def test_whiten_and_projection_shapes() -> None:
    x = torch.randn(2, 8, 5, 7) * 30 + 4
    w = whiten(x)
    torch.testing.assert_close(w.mean(1), torch.zeros(2, 5, 7), atol=1e-5, rtol=0)
    torch.testing.assert_close(w.var(1, unbiased=False), torch.ones(2, 5, 7), atol=1e-3, rtol=0)
    assert Projection(8, 3)(x, (10, 14)).shape == (2, 3, 10, 14)


def test_perturb_masks_whole_cells_and_adds_noise() -> None:
    x = torch.ones(2, 3, 64, 64)
    same = perturb(x, torch.zeros(2), torch.zeros(2), 32)
    torch.testing.assert_close(same, x)
    g = torch.Generator().manual_seed(0)
    out = perturb(x, torch.zeros(2), torch.tensor([0.5, 0.25]), 32, generator=g)
    cells = out[:, 0].unfold(1, 32, 32).unfold(2, 32, 32).reshape(2, 4, -1)  # 2 x 2 cells of 32 px
    zero = (cells == 0).all(-1)
    assert zero.sum(1).tolist() == [2, 1]  # round(0.5 * 4) and round(0.25 * 4) cells
    assert ((cells == 1).all(-1) | zero).all()  # every cell either untouched or fully masked
    noisy = perturb(torch.zeros(1, 3, 128, 128), torch.tensor([0.3]), torch.zeros(1), 32, generator=g)
    assert float(noisy.std()) == pytest.approx(0.3, rel=0.05)


def test_adaptive_rule_responds_as_documented() -> None:
    cfg = PerturbConfig(mode="adaptive", sigma=0.2, mask_ratio=0.2, sigma_max=0.6, mask_max=0.6, gamma=1.0,
                        momentum=0.5)
    p = Perturbation(cfg, num_chips=4)
    idx = torch.tensor([0, 1, 2, 3])
    # Before any error is known every chip gets the base settings.
    sigma, rho = p.levels(idx)
    assert sigma.tolist() == pytest.approx([0.2] * 4) and rho.tolist() == pytest.approx([0.2] * 4)
    p.update(torch.tensor([0, 1, 2]), torch.tensor([2.0, 0.5, 0.5]))
    assert float(p.running) == pytest.approx(1.0)  # first batch: ebar = mean = 1
    sigma, rho = p.levels(idx)
    # r = (2, 0.5, 0.5, unseen -> 1): sigma = 0.2 / r = (0.1, 0.4, 0.4, 0.2); rho likewise.
    assert sigma.tolist() == pytest.approx([0.1, 0.4, 0.4, 0.2])
    assert rho.tolist() == pytest.approx([0.1, 0.4, 0.4, 0.2])
    # Higher error -> less noise and masking; very low error is capped at the maxima.
    p.update(torch.tensor([3]), torch.tensor([0.05]))
    assert float(p.running) == pytest.approx(0.5 * 1.0 + 0.5 * 0.05)  # ebar <- beta ebar + (1 - beta) mean
    sigma, rho = p.levels(torch.tensor([3, 0]))
    assert sigma.tolist() == pytest.approx([0.6, 0.2 * 0.525 / 2.0])
    assert rho[0] == pytest.approx(0.6)
    # Fixed and none ignore the errors.
    p.cfg = PerturbConfig(mode="fixed")
    assert p.levels(idx)[0].tolist() == pytest.approx([0.2] * 4)
    p.cfg = PerturbConfig(mode="none")
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(p(x, idx)[0], x)


def test_perturb_config_rejects_bad_values() -> None:
    with pytest.raises(InputError, match="--perturb"):
        PerturbConfig(mode="sometimes")
    with pytest.raises(InputError, match="mask ratio"):
        PerturbConfig(mask_ratio=0.9, mask_max=0.6)
