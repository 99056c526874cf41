"""Heat-conduction backbones (rs_engine.models.heat): the operator against the heat equation's solution formula,
the multi-scale contract, any tile size, the precomputed inference mode, FLOP counting, and a heat model that
saves, loads and segments a real raster through ``rs-engine segment``."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pyogrio
import pytest
import torch

from rs_engine.checkpoint import ModelCard, load_model, save_model
from rs_engine.models import BACKBONES, HeatBackboneConfig, ModelConfig, build_model, count_flops
from rs_engine.models import heat as heat_mod
from rs_engine.models.heat import HeatBackbone, HeatConduction, heat_conduction

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SMALL = HeatBackboneConfig(dims=(8, 16, 24, 32), depths=(1, 1, 2, 1), mlp_ratio=2.0, fve_grid=(8, 8, 4, 4))


def _solution_by_double_sum(u0: torch.Tensor, kt: torch.Tensor) -> torch.Tensor:
    """u(x, y, t) = sum_{n,m} U~(n,m) exp(-k t ((n pi/a)^2 + (m pi/b)^2)) cos(n pi x/a) cos(m pi y/b), written out
    term by term on the cell centres x = i + 0.5, y = j + 0.5 of an a x b = H x W grid. U~ are the cosine-series
    coefficients of u0 (midpoint rule, exact for these modes): U~(n,m) = e_n e_m / (a b) sum_{i,j} u0 cos cos,
    e_0 = 1, e_n = 2. u0 (H, W, C), kt (H, W, C) -> (H, W, C). No DCT matrices, no vectorised transforms."""
    a, b, c = u0.shape
    out = torch.zeros_like(u0)
    coef = torch.zeros_like(u0)
    for n in range(a):
        for m in range(b):
            s = torch.zeros(c, dtype=u0.dtype)
            for i in range(a):
                for j in range(b):
                    s += u0[i, j] * math.cos(n * math.pi * (i + 0.5) / a) * math.cos(m * math.pi * (j + 0.5) / b)
            coef[n, m] = s * (1 if n == 0 else 2) * (1 if m == 0 else 2) / (a * b)
    for i in range(a):
        for j in range(b):
            for n in range(a):
                for m in range(b):
                    rate = (n * math.pi / a) ** 2 + (m * math.pi / b) ** 2
                    out[i, j] += (coef[n, m] * torch.exp(-kt[n, m] * rate)
                                  * math.cos(n * math.pi * (i + 0.5) / a) * math.cos(m * math.pi * (j + 0.5) / b))
    return out


def test_operator_equals_heat_equation_solution() -> None:
    torch.manual_seed(0)
    h, w, c = 6, 5, 3
    mixer = HeatConduction(c).double()
    with torch.no_grad():  # a larger k t than at initialisation, so that the decay really acts
        mixer.to_k[0].weight.mul_(20)
        mixer.to_k[0].bias.fill_(0.5)
    fve = torch.randn(4, 4, c, dtype=torch.float64)  # resized to the 6 x 5 frequency grid
    kt = mixer.kt(fve, h, w).detach()
    assert kt.shape == (h, w, c) and (kt >= 0).all() and kt.max() > 0.5
    u0 = torch.randn(h, w, c, dtype=torch.float64)
    got = heat_conduction(u0[None], mixer.decay(fve, h, w))[0]
    want = _solution_by_double_sum(u0, kt)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    # Neumann boundary: no heat leaves the grid, the mean of each channel stays; t = 0 changes nothing.
    torch.testing.assert_close(got.mean((0, 1)), u0.mean((0, 1)))
    torch.testing.assert_close(heat_conduction(u0[None], torch.ones(h, w, c, dtype=torch.float64))[0], u0)


@pytest.mark.parametrize("name", ["heat_tiny", "heat_small"])
def test_registered_and_four_scales(name: str) -> None:
    assert isinstance(BACKBONES[name], HeatBackboneConfig)
    model = build_model(ModelConfig(backbone=name, tile_size=64))
    body = model.backbone.body
    assert isinstance(body, HeatBackbone)
    feats = body(torch.randn(2, 3, 64, 64))
    assert list(feats) == ["0", "1", "2", "3"]
    assert [f.shape[-1] for f in feats.values()] == [16, 8, 4, 2]
    assert [f.shape[1] for f in feats.values()] == body.out_channels_list


@pytest.mark.parametrize("size", [(64, 64), (96, 160), (100, 72), (33, 47)])
def test_any_tile_size(size: tuple[int, int]) -> None:
    body = HeatBackbone(SMALL, 3)
    feats = body(torch.randn(1, 3, *size))
    expect = HeatBackbone.grid_sizes(*size)
    assert [tuple(f.shape[-2:]) for f in feats.values()] == expect
    assert expect[0] == (math.ceil(size[0] / 4), math.ceil(size[1] / 4))
    assert all(torch.isfinite(f).all() for f in feats.values())


def test_stems() -> None:
    sar = HeatBackbone(SMALL, 1)
    opt = HeatBackbone(SMALL, 3)
    assert sar.stem_kind == "sar" and sar.patch_embed[0].kernel_size == (7, 7)
    assert opt.stem_kind == "optical" and opt.patch_embed[0].kernel_size == (3, 3)
    assert HeatBackbone(SMALL, 1, stem="optical").stem_kind == "optical"
    model = build_model(ModelConfig(backbone="heat_tiny", in_channels=1, tile_size=64, extra={"stem": "optical"}))
    assert model.backbone.body.stem_kind == "optical"
    with pytest.raises(ValueError, match="stem"):
        HeatBackbone(SMALL, 3, stem="lidar")


def test_precomputed_inference_equals_training_path() -> None:
    torch.manual_seed(1)
    body = HeatBackbone(SMALL, 3)
    x = torch.randn(2, 3, 96, 64)
    body.train()
    live = body(x)
    body.precompute((96, 64))
    mixers = [m for m in body.modules() if isinstance(m, HeatConduction)]
    assert all(len(m._cache) == 1 for m in mixers)
    cached = [next(iter(m._cache.values()))[1] for m in mixers]
    with torch.inference_mode():
        fast = body(x)
    assert [next(iter(m._cache.values()))[1] for m in mixers] == cached  # served from the cache, not rebuilt
    for k in live:
        torch.testing.assert_close(fast[k], live[k].detach(), atol=1e-5, rtol=1e-5)
    # another size is cached on first use; new weights invalidate the cache
    with torch.no_grad():
        body(torch.randn(1, 3, 64, 64))
    assert all(len(m._cache) == 2 for m in mixers)
    other = HeatBackbone(SMALL, 3)
    body.load_state_dict(other.state_dict())
    with torch.no_grad():
        a = body(x)
    other.eval()
    b = other(x)  # grad enabled: the live path
    for k in a:
        torch.testing.assert_close(a[k], b[k].detach(), atol=1e-5, rtol=1e-5)
    assert "_cache" not in str(list(body.state_dict()))  # the cache is never saved


def test_training_step_reaches_fve_and_capacity() -> None:
    model = build_model(ModelConfig(backbone="heat_tiny", in_channels=1, num_classes=1, tile_size=64)).train()
    masks = torch.zeros(1, 64, 64, dtype=torch.uint8)
    masks[0, 10:30, 12:40] = 1
    target = {"boxes": torch.tensor([[12.0, 10.0, 40.0, 30.0]]), "labels": torch.tensor([1]), "masks": masks}
    sum(model([torch.randn(1, 64, 64)], [target]).values()).backward()
    body = model.backbone.body
    for p in (body.fves[0], body.capacities[1].capacity, body.stages[2][0].mixer.to_k[0].weight):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_flops_include_dct_products(monkeypatch) -> None:
    model = build_model(ModelConfig(backbone="heat_tiny", tile_size=64))
    full = count_flops(model, 64)["backbone_gflops"]
    monkeypatch.setattr(heat_mod, "heat_conduction", lambda u, decay: u * decay)
    without = count_flops(model, 64)["backbone_gflops"]
    # each operator: DCT2 + IDCT2, each an (H x H) product along H and a (W x W) one along W, per channel;
    # 2 FLOPs per multiply-add
    cfg = BACKBONES["heat_tiny"]
    dct = sum(n * 2 * (2 * h * h * w * d + 2 * w * w * h * d)
              for (h, w), d, n in zip(HeatBackbone.grid_sizes(64, 64), cfg.dims, cfg.depths))
    assert full - without == pytest.approx(dct / 1e9, rel=1e-6)
    assert count_flops(model, 64)["params_m"] < count_flops(build_model(ModelConfig(backbone="heat_small")), 64)[
        "params_m"]


def test_save_load_and_segment_real_raster(tmp_path) -> None:
    image = SHARED / "ssdd" / "images" / "test" / "000001.jpg"
    if not image.exists():
        pytest.skip(f"{image} not available (../shared/data is absent)")
    torch.manual_seed(0)
    config = ModelConfig(backbone="heat_tiny", in_channels=1, num_classes=1, tile_size=128, box_score_thresh=0.0,
                         box_detections_per_img=10, rpn_post_nms_top_n_test=50)
    card = ModelCard(name="heat-test", version="0", architecture=config.to_dict(), class_names=["ship"], bands=1,
                     mean=[40.0], std=[40.0], tile_size=128, overlap=32, score_threshold=0.0)
    model = build_model(config).eval()
    path = save_model(tmp_path / "heat.safetensors", model, card)
    loaded, card2 = load_model(path)
    assert card2.architecture["backbone"] == "heat_tiny" and loaded.backbone.body.stem_kind == "sar"
    x = torch.randn(1, 1, 128, 128)
    with torch.no_grad():
        a, b = model.backbone(x), loaded.backbone(x)
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    out = tmp_path / "ships.gpkg"
    r = subprocess.run([sys.executable, "-m", "rs_engine.cli", "segment", str(image), "-o", str(out), "--model",
                        str(path), "--bands", "1", "--progress", "none"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    info = pyogrio.read_info(out, layer="instances")
    assert info["features"] > 0  # untrained, threshold 0: some detections survive, drawn as polygons
    meta, _, _, fields = pyogrio.raw.read(out, layer="instances")
    assert set(fields[list(meta["fields"]).index("model")]) == {"heat-test 0"}
