"""The shared label-free machinery: unlabelled chips, the pretraining loop (resume included), backbone files."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import from_origin
from torch import nn

from rs_engine.errors import InputError
from rs_engine.models import ModelConfig, build_model
from training.pretrain import UnlabelledChips, init_backbone, load_backbone, run_pretraining, save_backbone
from training.train import TrainConfig

ROOT = Path(__file__).resolve().parents[2]
NWPU = ROOT.parent / "shared" / "data" / "nwpu_vhr10" / "images"


def _write(path: Path, array: np.ndarray) -> Path:
    with rasterio.open(path, "w", driver="GTiff", width=array.shape[2], height=array.shape[1], count=array.shape[0],
                       dtype=array.dtype, crs="EPSG:32633", transform=from_origin(500000, 4000000, 1, 1)) as ds:
        ds.write(array)
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    d = tmp_path / "imgs"
    d.mkdir()
    _write(d / "rgb.tif", rng.integers(0, 255, (3, 100, 120), dtype=np.uint8))
    _write(d / "grey.tif", rng.integers(0, 255, (1, 300, 40), dtype=np.uint8))
    _write(d / "two.tif", rng.integers(0, 255, (2, 64, 64), dtype=np.uint8))  # no band 3: skipped
    (d / "notes.txt").write_text("not an image")
    return d


def test_unlabelled_chips(folder: Path) -> None:
    ds = UnlabelledChips([folder], size=64, chips_per_image=3, seed=1)
    assert [f.name for f in ds.files] == ["grey.tif", "rgb.tif"] and len(ds) == 6
    a, b = ds[4], ds[4]
    assert a["image"].shape == (3, 64, 64) and a["index"] == 4
    assert torch.equal(a["image"], b["image"])  # deterministic per index: teacher features can be cached
    assert not torch.equal(ds[3]["image"], ds[4]["image"])
    plain = UnlabelledChips([folder], size=64, chips_per_image=3, seed=1, augment=False)
    grey = plain[0]["image"]  # 1-band file repeated into 3 bands; 40 px wide: padded with 0 (the mean)
    raw = grey * torch.from_numpy(plain.std)[:, None, None] + torch.from_numpy(plain.mean)[:, None, None]
    assert all(torch.allclose(raw[0, :, :40], raw[b, :, :40], atol=1e-4) for b in (1, 2))
    assert (grey[:, :, 40:] == 0).all()
    pixels = torch.stack([ds[i]["image"] for i in range(len(ds))])
    assert abs(float(pixels[pixels != 0].mean())) < 0.3  # normalised by the estimated band statistics
    with pytest.raises(InputError, match="no readable image"):
        UnlabelledChips([folder / "two.tif"], size=64)
    with pytest.raises(InputError, match="no such file"):
        UnlabelledChips([folder / "missing"], size=64)


class Reconstruct(nn.Module):
    """A small real objective: the backbone's stride-4 features decoded back to the input."""

    def __init__(self) -> None:
        super().__init__()
        self.body = build_model(ModelConfig(backbone="ssm_tiny", in_channels=3, tile_size=64)).backbone.body
        self.head = nn.Conv2d(self.body.out_channels_list[0], 3 * 16, 1)

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        x = batch["image"]
        y = nn.functional.pixel_shuffle(self.head(self.body(x)["0"]), 4)
        loss = (y - x).abs().mean()
        return loss, {"l1": float(loss.detach())}


def test_run_pretraining_resume_and_backbone_file(folder: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    ds = UnlabelledChips([folder], size=64, chips_per_image=4)
    out = tmp_path / "bb.safetensors"
    saved = []

    def save(path: Path, obj: Reconstruct, state: dict) -> None:
        saved.append(state["step"])
        save_backbone(path, obj.body, backbone="ssm_tiny", in_channels=3, method="test", mean=ds.mean.tolist(),
                      std=ds.std.tolist())

    obj = Reconstruct()
    cfg = TrainConfig(epochs=2, batch_size=2, lr=2e-3, warmup_steps=1, num_workers=0)
    r1 = run_pretraining(obj, ds, out, cfg, save)
    assert r1["epochs"] == 2 and r1["steps"] == 8 and saved == [4, 8]
    rows = list(csv.DictReader(open(out.with_suffix(".log.csv"))))
    assert [r["epoch"] for r in rows] == ["1", "2"] and float(rows[1]["loss"]) < float(rows[0]["loss"])
    # Re-running the finished command does nothing; more epochs continue from the saved state.
    assert run_pretraining(Reconstruct(), ds, out, cfg, save)["steps"] == 8
    cfg.epochs = 3
    assert run_pretraining(Reconstruct(), ds, out, cfg, save)["steps"] == 12 and saved[-1] == 12

    state, card = load_backbone(out)
    assert card["backbone"] == "ssm_tiny" and card["method"] == "test" and len(card["mean"]) == 3
    model = build_model(ModelConfig(backbone="ssm_tiny", in_channels=1, num_classes=2, tile_size=64))
    info = init_backbone(model, out, "ssm_tiny")
    assert info["copied"] == len(state) and info["adapted"] == ["patch_embed.0.weight"]
    body = model.backbone.body.state_dict()
    assert all(torch.equal(body[k], v) for k, v in state.items() if k != "patch_embed.0.weight")
    assert torch.allclose(body["patch_embed.0.weight"], state["patch_embed.0.weight"].sum(1, keepdim=True))
    with pytest.raises(InputError, match="cannot initialise a ssm_small"):
        init_backbone(build_model(ModelConfig(backbone="ssm_small", tile_size=64)), out, "ssm_small")
    with pytest.raises(InputError, match="do not match"):
        init_backbone(build_model(ModelConfig(backbone="ssm_small", tile_size=64)), out)
    whole = tmp_path / "model.safetensors"
    from rs_engine.checkpoint import ModelCard, save_model

    save_model(whole, model, ModelCard(name="m", version="1", architecture={}, class_names=["a", "b"], bands=1,
                                       mean=[0.0], std=[1.0]))
    with pytest.raises(InputError, match="whole model file"):
        load_backbone(whole)


def test_cli_init_backbone_bad_input(tmp_path: Path, ssdd_subset) -> None:
    coco = ssdd_subset(2)
    bad = tmp_path / "bb.safetensors"
    bad.write_bytes(b"not safetensors")
    out = tmp_path / "m.safetensors"
    r = subprocess.run([sys.executable, "-m", "training.cli", "train", "--coco", str(coco), "--images",
                        str(ROOT.parent / "shared/data/ssdd/images"), "--bands", "1", "--chip-size", "64",
                        "--epochs", "1", "--batch-size", "1", "--workers", "0", "--init-backbone", str(bad),
                        "--out", str(out), "--progress", "none"], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "not a readable safetensors file" in r.stderr
    assert not out.exists()


@pytest.mark.skipif(not NWPU.is_dir(), reason="../shared/data not present")
def test_unlabelled_chips_real_images() -> None:
    ds = UnlabelledChips([NWPU], size=256)
    assert len(ds) >= 500
    x = ds[7]["image"]
    assert x.shape == (3, 256, 256) and x.std() > 0.3
