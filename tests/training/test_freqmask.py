"""Frequency-masked pretraining (training.freqmask): band masks, hierarchical masking inside the backbone,
learning on real SAR chips, and ``rs-train pretrain`` writing a backbone that ``--init-backbone`` loads."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from rs_engine.models import ModelConfig, build_backbone
from rs_engine.ops import dct2
from training.freqmask import FreqMaskConfig, FreqMaskObjective, band_mask, drop_band, level_entries, radial_frequency
from training.pretrain import UnlabelledChips, load_backbone

ROOT = Path(__file__).resolve().parents[2]
SSDD = ROOT.parent / "shared" / "data" / "ssdd"


def _need_ssdd() -> None:
    if not SSDD.is_dir():
        pytest.skip("../shared/data/ssdd not present")


def test_drop_band_removes_exactly_the_band() -> None:
    rho = radial_frequency(16, 12)
    assert rho[0, 0] == 0 and 0.99 > float(rho.max()) > 0.9 and rho[15, 0] > rho[3, 0]
    x = torch.randn(2, 3, 16, 12)
    lo, hi = torch.tensor([0.0, 0.3]), torch.tensor([0.2, 2.0])  # chip 0: low band, chip 1: high band
    m = band_mask(rho, lo, hi)
    assert m.shape == (2, 1, 16, 12) and m[0, 0, 0, 0] == 0  # the DC term always stays
    assert m[0].sum() > 0 and m[1].sum() > 0 and not torch.equal(m[0], m[1])
    y = drop_band(x, m)
    spec_x, spec_y = dct2(x), dct2(y)
    keep = (1 - m).expand_as(spec_x).bool()
    torch.testing.assert_close(spec_y[keep], spec_x[keep], atol=1e-5, rtol=1e-5)
    assert spec_y[~keep].abs().max() < 1e-5
    torch.testing.assert_close(y.mean((2, 3)), x.mean((2, 3)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["heat_tiny", "ssm_tiny"])
def test_hierarchical_masks_act_at_every_level_only_inside_the_objective(name: str) -> None:
    torch.manual_seed(0)
    body = build_backbone(ModelConfig(backbone=name, in_channels=1, tile_size=64))
    cfg = FreqMaskConfig(level_prob=1.0)
    obj = FreqMaskObjective(body, 1, cfg, seed=3)
    seen: list[torch.Tensor] = []
    for module in level_entries(body):  # registered after the objective's hooks: sees the masked output
        module.register_forward_hook(lambda mod, args, out: seen.append(out.detach()))
    x = torch.randn(2, 1, 64, 64)
    gen_state = obj.generator.get_state()
    loss, logs = obj({"image": x})
    assert torch.isfinite(loss) and set(logs) == {"pix", "freq", "masked_pix"} and len(seen) == 4
    obj.generator.set_state(gen_state)
    _, _, levels = obj.draw_masks(2)
    for level, (out, (lo, hi)) in enumerate(zip(seen, levels)):
        rho = radial_frequency(*out.shape[-2:])
        hi = torch.maximum(hi, rho[rho > 0].min() * 1.001) if level >= cfg.fine_levels else hi
        lo = torch.minimum(lo, rho.max()) if level < cfg.fine_levels else lo
        m = band_mask(rho, lo, hi)
        assert (m.flatten(1).sum(1) > 0).all()  # every chip loses a band at every level (level_prob 1)
        assert dct2(out)[m.expand_as(out).bool()].abs().max() < 1e-4, f"level {level} band not dropped"
        high = level < cfg.fine_levels
        assert bool((hi > 1).all()) == high  # fine levels lose a high band, coarse levels a low band
    loss.backward()
    assert body.patch_embed[0].weight.grad.abs().sum() > 0
    # outside the objective's forward the body is untouched: same features as an unhooked copy
    seen.clear()
    clean = build_backbone(ModelConfig(backbone=name, in_channels=1, tile_size=64))
    clean.load_state_dict(body.state_dict())
    with torch.no_grad():
        a, b = body(x), clean(x)
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_loss_falls_on_real_sar_chips() -> None:
    _need_ssdd()
    files = sorted((SSDD / "images" / "train").glob("*.jpg"))[:16]
    data = UnlabelledChips(files, size=64, bands=[1], seed=0)
    batch = {"image": torch.stack([data[i]["image"] for i in range(8)])}
    torch.manual_seed(0)
    obj = FreqMaskObjective(build_backbone(ModelConfig(backbone="heat_tiny", in_channels=1, tile_size=64)), 1,
                            seed=0)
    opt = torch.optim.AdamW(obj.parameters(), lr=2e-3)
    losses = []
    for _ in range(40):
        loss, _ = obj(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    """``rs-train ARGS`` in this process (the CLI's own code path, without paying a new interpreter's imports)."""
    from training.cli import main

    capsys.readouterr()
    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_pretrain_then_init_backbone(tmp_path: Path, ssdd_subset, capsys) -> None:
    _need_ssdd()
    files = [str(f) for f in sorted((SSDD / "images" / "train").glob("*.jpg"))[:8]]
    out = tmp_path / "heat.safetensors"
    rc, stdout, stderr = _cli(capsys, "pretrain", "--method", "freq-mask", "--images", *files, "--backbone",
                              "heat_tiny", "--bands", "1", "--chip-size", "64", "--epochs", "2", "--batch-size", "4",
                              "--workers", "0", "--out", str(out), "--progress", "jsonl")
    assert rc == 0, stderr
    events = [json.loads(line) for line in stdout.splitlines()]
    assert events[-1]["event"] == "done" and events[-1]["metrics"]["steps"] == 4
    assert [e["epoch"] for e in events if e["event"] == "epoch"] == [1, 2]
    rows = list(csv.DictReader(open(out.with_suffix(".log.csv"))))
    assert len(rows) == 2 and {"pix", "freq", "masked_pix"} <= set(rows[0])
    state, card = load_backbone(out)
    assert card["backbone"] == "heat_tiny" and card["method"] == "freq-mask" and card["in_channels"] == 1
    assert "fves.0" in state and state["patch_embed.0.weight"].shape[-1] == 7  # the SAR stem

    model = tmp_path / "m.safetensors"
    rc, _, stderr = _cli(capsys, "train", "--coco", str(ssdd_subset(2)), "--images", str(SSDD / "images"), "--bands",
                         "1", "--chip-size", "64", "--epochs", "1", "--batch-size", "1", "--workers", "0",
                         "--model-config", "heat_tiny", "--init-backbone", str(out), "--out", str(model),
                         "--progress", "none")
    assert rc == 0, stderr
    from rs_engine.checkpoint import load_state

    weights, mcard = load_state(model)
    assert mcard.provenance["init_backbone"]["copied"] == len(state)
    assert mcard.provenance["init_backbone"]["method"] == "freq-mask"
    assert weights["backbone.body.fves.0"].shape == state["fves.0"].shape


def test_cli_pretrain_bad_input(tmp_path: Path, capsys) -> None:
    out = tmp_path / "b.safetensors"
    rc, _, err = _cli(capsys, "pretrain", "--out", str(out), "--images", str(tmp_path / "nowhere"))
    assert rc == 2 and "nowhere" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    rc, _, err = _cli(capsys, "pretrain", "--out", str(out), "--images", str(tmp_path), "--backbone", "heat_huge")
    assert rc == 2 and "heat_huge" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
