"""Training loop pieces: augmentation, sampler, freezing, initialisation, schedule, F1 matching, resume, torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rs_engine.models import ModelConfig, build_model
from training.augment import AugmentConfig, augment, crop_size, make_target, photometric, resize
from training.distributed import Dist
from training.evaluate import match_f1
from training.train import EpochSampler, TrainConfig, apply_freeze, frozen_prefixes, init_from, lr_at

SSDD = Path(__file__).resolve().parents[3] / "shared" / "data" / "ssdd"
needs_ssdd = pytest.mark.skipif(not SSDD.is_dir(), reason="../shared/data (SSDD) not present")


def test_dihedral_keeps_image_and_masks_aligned() -> None:
    rng = np.random.default_rng(0)
    masks = np.zeros((2, 16, 16), np.uint8)
    masks[0, 2:5, 3:9] = 1
    masks[1, 10:15, 1:3] = 1
    chip = np.stack([masks[0], masks[1]]).astype(np.float32)
    cfg = AugmentConfig(gain=0, bias=0)
    seen = set()
    for _ in range(40):
        c, m = augment(chip, masks, rng, cfg)
        np.testing.assert_array_equal(c, m.astype(np.float32))
        seen.add(c.tobytes())
    assert len(seen) == 8  # all 8 dihedral transforms occur


def test_scale_jitter_and_resize() -> None:
    rng = np.random.default_rng(1)
    cfg = AugmentConfig(scale_range=(0.5, 2.0))
    sizes = {crop_size(64, rng, cfg) for _ in range(50)}
    assert min(sizes) >= 32 and max(sizes) <= 128 and len(sizes) > 10
    assert crop_size(64, rng, AugmentConfig(scale_range=(1, 1))) == 64
    chip = np.ones((3, 100, 100), np.float32)
    masks = np.zeros((1, 100, 100), np.uint8)
    masks[0, 50:, :] = 1
    c, m = resize(chip, masks, 50)
    assert c.shape == (3, 50, 50) and m.shape == (1, 50, 50) and m.dtype == np.uint8
    assert m[0, 25:].all() and not m[0, :25].any()


def test_photometric_is_per_band_and_spares_nodata() -> None:
    rng = np.random.default_rng(2)
    chip = np.ones((4, 8, 8), np.float32)
    valid = np.ones((8, 8), bool)
    valid[0, 0] = False
    out = photometric(chip, rng, AugmentConfig(gain=0.3, bias=0.3), valid)
    assert out[:, 0, 0].tolist() == [0, 0, 0, 0]
    per_band = out[:, 4, 4]
    assert len(set(per_band.round(5).tolist())) == 4  # independent jitter per band
    assert np.allclose(out[:, 1:, 1:], per_band[:, None, None])


def test_make_target_boxes_and_slivers() -> None:
    masks = np.zeros((3, 10, 10), np.uint8)
    masks[0, 2:4, 3:8] = 1
    masks[1, 9, 9] = 1  # a 1-pixel sliver: dropped
    t = make_target(masks, np.array([1, 2, 3]))
    assert t["boxes"].tolist() == [[3, 2, 8, 4]] and t["labels"].tolist() == [1]
    assert t["masks"].shape == (1, 10, 10)
    empty = make_target(np.zeros((0, 10, 10), np.uint8), np.zeros(0, np.int64))
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, 10, 10)


def test_epoch_sampler_splits_ranks_and_resumes_mid_epoch() -> None:
    ranks = [EpochSampler(10, 2, Dist(rank=r, world_size=2)) for r in range(2)]
    for s in ranks:
        s.set_epoch(3)
    a, b = list(ranks[0]), list(ranks[1])
    assert len(a) == len(b) == 4 and not set(a) & set(b)
    ranks[0].set_epoch(3, start_batch=1)
    assert list(ranks[0]) == a[2:]
    ranks[0].set_epoch(4)
    assert list(ranks[0]) != a  # a new permutation each epoch


def test_lr_schedule() -> None:
    cfg = TrainConfig(lr=1.0, warmup_steps=10)
    assert lr_at(0, 100, cfg) == pytest.approx(0.1)
    assert lr_at(9, 100, cfg) == pytest.approx(1.0)
    assert lr_at(10, 100, cfg) == pytest.approx(1.0)
    assert lr_at(100, 100, cfg) == pytest.approx(0.01)
    assert lr_at(55, 100, cfg) == pytest.approx(0.505)
    timed = TrainConfig(lr=1.0, warmup_steps=10, max_minutes=1.0)
    assert lr_at(20, 100, timed, seconds=0.0) == lr_at(20, 100, cfg)  # steps further along than time
    assert lr_at(20, 100, timed, seconds=30.0) == pytest.approx(0.505)  # half the time budget: half the decay
    assert lr_at(20, 100, timed, seconds=90.0) == pytest.approx(0.01)


def _tiny(num_classes: int = 2, in_channels: int = 3) -> torch.nn.Module:
    return build_model(ModelConfig(backbone="ssm_tiny", in_channels=in_channels, num_classes=num_classes,
                                   tile_size=64))


def test_freeze_stages_and_backbone() -> None:
    model = _tiny()
    n = apply_freeze(model, TrainConfig(freeze_stages=2))
    frozen = {k for k, p in model.named_parameters() if not p.requires_grad}
    assert n == len(frozen) > 0
    assert any(k.startswith("backbone.body.stages.1.") for k in frozen)
    assert not any(k.startswith("backbone.body.stages.2.") for k in frozen)
    assert not any(k.startswith("backbone.fpn") for k in frozen)
    assert frozen_prefixes(model, TrainConfig(freeze_backbone=True)) == ["backbone.body."]
    resnet = build_model(ModelConfig(backbone="resnet50", num_classes=2, tile_size=64))
    apply_freeze(resnet, TrainConfig(freeze_stages=1))
    frozen = {k for k, p in resnet.named_parameters() if not p.requires_grad}
    assert "backbone.body.conv1.weight" in frozen and any(k.startswith("backbone.body.layer1.") for k in frozen)
    assert not any(k.startswith("backbone.body.layer2.") for k in frozen)


def test_init_from_copies_matching_layers_only(tmp_path, make_card) -> None:
    from rs_engine.checkpoint import save_model

    torch.manual_seed(0)
    base = _tiny(num_classes=2)
    path = tmp_path / "base.safetensors"
    card = make_card(bands=3, class_names=("a", "b"))
    card.architecture = ModelConfig(backbone="ssm_tiny", in_channels=3, num_classes=2, tile_size=64).to_dict()
    save_model(path, base, card, half=False)
    torch.manual_seed(1)
    new = _tiny(num_classes=2)
    info = init_from(new, path, same_classes=False)
    sd_new, sd_base = new.state_dict(), base.state_dict()
    assert torch.equal(sd_new["backbone.body.stages.0.0.norm.weight"], sd_base["backbone.body.stages.0.0.norm.weight"])
    assert not torch.equal(sd_new["roi_heads.box_predictor.cls_score.weight"],
                           sd_base["roi_heads.box_predictor.cls_score.weight"])
    assert "roi_heads.box_predictor.cls_score.weight" in info["skipped"]
    info = init_from(new, path, same_classes=True)
    assert torch.equal(new.state_dict()["roi_heads.box_predictor.cls_score.weight"],
                       sd_base["roi_heads.box_predictor.cls_score.weight"])
    one_band = _tiny(num_classes=2, in_channels=1)
    info = init_from(one_band, path)
    assert info["adapted"] == ["backbone.body.patch_embed.0.weight"]
    # A pan band into the adapted model = that band repeated into the RGB model (first layer is linear).
    x = torch.randn(1, 1, 64, 64)
    base.eval(), one_band.eval()
    with torch.no_grad():
        torch.testing.assert_close(one_band.backbone.body.patch_embed(x),
                                   base.backbone.body.patch_embed(x.repeat(1, 3, 1, 1)), rtol=1e-4, atol=1e-4)
    five = _tiny(num_classes=2, in_channels=5)
    init_from(five, path)
    with torch.no_grad():
        torch.testing.assert_close(five.backbone.body.patch_embed(x.repeat(1, 5, 1, 1)),
                                   base.backbone.body.patch_embed(x.repeat(1, 3, 1, 1)), rtol=1e-4, atol=1e-4)


def test_match_f1_hand_case() -> None:
    from shapely import box

    truth = [box(0, 0, 10, 10), box(20, 0, 30, 10), box(40, 0, 50, 10)]
    pred = [box(0, 0, 10, 9),  # IoU 0.9 -> TP
            box(1, 0, 11, 10),  # second match of the same truth -> FP
            box(20, 0, 26, 10),  # IoU 0.6 -> TP
            box(40, 0, 44, 10)]  # IoU 0.4 -> FP; truth 3 -> FN
    r = match_f1(pred, [0.9, 0.8, 0.7, 0.6], [1, 1, 1, 1], truth, [1, 1, 1])
    assert (r["tp"], r["fp"], r["fn"]) == (2, 2, 1)
    assert r["precision"] == 0.5 and r["recall"] == pytest.approx(0.6667, abs=1e-4)
    assert r["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3), abs=1e-4)
    wrong_class = match_f1(pred[:1], [0.9], [2], truth[:1], [1])
    assert wrong_class["tp"] == 0


def _run(args: list, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=600, env=env,
                          **kw)


@needs_ssdd
def test_resume_mid_epoch_keeps_the_schedule(tmp_path, ssdd_subset) -> None:
    ann, out = ssdd_subset(), tmp_path / "m.safetensors"
    common = ["-m", "training.cli", "train", "--coco", ann, "--images", SSDD / "images", "--bands", "1",
              "--chip-size", "96", "--batch-size", "1", "--epochs", "1", "--warmup-steps", "1", "--workers", "0",
              "--progress", "jsonl", "--out", out]
    r = _run([*common, "--max-minutes", "0.0001"])  # stops after its first step, as an interruption would
    assert r.returncode == 0, r.stderr
    from safetensors import safe_open

    with safe_open(str(out.with_suffix(".resume.safetensors")), framework="pt") as f:
        assert json.loads(f.metadata()["state"])["step"] == 1
    r = _run(common)
    assert r.returncode == 0, r.stderr
    steps = [json.loads(line) for line in r.stdout.splitlines() if '"progress"' in line]
    assert [s["done"] for s in steps] == [2, 3, 4]  # continues at the second batch, not from the start
    rows = out.with_suffix(".log.csv").read_text().splitlines()
    assert rows[-1].split(",")[:2] == ["1", "4"]
    assert out.with_suffix(".curves.png").stat().st_size > 1000


@needs_ssdd
def test_torchrun_two_processes_on_cpu(tmp_path, ssdd_subset) -> None:
    from rs_engine.checkpoint import load_model

    ann, out = ssdd_subset(), tmp_path / "ddp.safetensors"
    r = _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "training.cli",
              "train", "--coco", ann, "--images", SSDD / "images", "--bands", "1", "--chip-size", "96",
              "--batch-size", "1", "--epochs", "1", "--warmup-steps", "1", "--workers", "0", "--progress", "jsonl",
              "--out", out])
    assert r.returncode == 0, r.stderr[-3000:]
    # 4 images, 2 processes, batch 1: 2 steps per epoch (each process sees half the images).
    assert out.with_suffix(".log.csv").read_text().splitlines()[1].split(",")[:2] == ["1", "2"]
    done = [e for e in map(json.loads, r.stdout.splitlines()) if e["event"] == "done"]
    assert len(done) == 1  # only rank 0 reports
    model, card = load_model(out)
    assert card.class_names == ["ship"] and card.provenance["steps"] == 2


def test_cli_errors_are_one_line_exit_2(tmp_path) -> None:
    r = _run(["-m", "training.cli", "evaluate", "--model", "ssdd-ship"])
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--coco" in r.stderr
    r = _run(["-m", "training.cli", "finetune", "--raster", tmp_path / "none.tif", "--labels", tmp_path / "l.gpkg",
              "--class-field", "c", "--out", tmp_path / "m.safetensors", "--progress", "jsonl"])
    assert r.returncode == 2 and "none.tif" in r.stderr and r.stderr.count("\n") == 1
    assert json.loads(r.stdout.splitlines()[-1])["event"] == "error"
    r = _run(["-m", "training.cli", "train", "--coco", tmp_path / "x.json", "--images", tmp_path, "--out",
              tmp_path / "m.safetensors", "--epochs", "0"])
    assert r.returncode == 2


class _Blobs(torch.utils.data.Dataset):
    """Two 64 px chips with one bright square each (enough for a Mask R-CNN loss)."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int):  # noqa: ANN204
        img = torch.zeros(3, 64, 64)
        masks = np.zeros((1, 64, 64), np.uint8)
        masks[0, 10 + 20 * i:30 + 20 * i, 20:40] = 1
        img[:, torch.from_numpy(masks[0]).bool()] = 2.0
        return img, make_target(masks, np.array([1]))


def test_early_stopping_and_best_model(tmp_path, make_card) -> None:
    from rs_engine.checkpoint import read_card
    from training.train import train

    aps = iter([5.0, 7.0, 6.0, 6.5, 1.0, 1.0, 1.0, 1.0])
    calls = []

    def evaluate(model):  # noqa: ANN001, ANN202
        calls.append(1)
        ap = next(aps)
        return {"segm": {"AP": ap}, "bbox": {"AP": ap / 2}}

    torch.manual_seed(0)
    model = _tiny(num_classes=1)
    card = make_card(bands=3, class_names=("blob",))
    card.architecture = ModelConfig(backbone="ssm_tiny", num_classes=1, tile_size=64).to_dict()
    out = tmp_path / "m.safetensors"
    events = []
    train(model, card, _Blobs(), out, TrainConfig(epochs=8, batch_size=1, warmup_steps=1, num_workers=0, patience=2),
          evaluate=evaluate, progress=events.append)
    assert len(calls) == 4  # best at epoch 2, then 2 evaluations without gain
    saved = read_card(out)
    assert saved.provenance["epochs"] == 2 and saved.provenance["metrics"]["segm"]["AP"] == 7.0
    epochs = [e for e in events if e["event"] == "epoch"]
    assert [e["mask_ap"] for e in epochs] == [5.0, 7.0, 6.0, 6.5]
    assert [e["done"] for e in events if e["event"] == "progress"][:2] == [1, 2]


def test_plot_curves(tmp_path) -> None:
    from training.train import plot_curves

    log = tmp_path / "m.log.csv"
    log.write_text("epoch,step,lr,loss,mask_ap,box_ap,minutes\n1,10,0.001,1.5,nan,nan,0.5\n2,20,0.0005,1.2,3.5,2.0,1.0\n"
                   "2.5,25,0.0001,1.1,nan,nan,1.2\n")
    plot_curves(log, tmp_path / "m.png")
    assert (tmp_path / "m.png").stat().st_size > 1000
    log.write_text("1,10,0.001,1.5,nan,nan,0.5\n")  # no header (a log cut by a kill before its first flush)
    with pytest.raises(ValueError):
        plot_curves(log, tmp_path / "m2.png")
