"""EfficientNet-Lite ImageNet bodies and the ssm_hybrid_* family (rs_engine/models/effnet.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rs_engine.checkpoint import ModelCard, save_model
from rs_engine.errors import InputError
from rs_engine.models import ModelConfig, build_model, count_flops
from rs_engine.models.effnet import _timm_lite, imagenet_file, imagenet_state_dict, load_imagenet

ROOT = Path(__file__).resolve().parents[1]
PHOTO = "grace_hopper.jpg"  # matplotlib's sample photo of a person in (US Navy) uniform


def _photo(size: int) -> np.ndarray:
    import matplotlib
    from PIL import Image

    path = Path(matplotlib.get_data_path()) / "sample_data" / PHOTO
    if not path.is_file():
        pytest.skip("matplotlib's sample photo is not installed")
    im = Image.open(path).convert("RGB").crop((0, 44, 512, 556)).resize((size, size), Image.BICUBIC)
    return np.asarray(im, np.float32)


@pytest.mark.parametrize("variant", ["lite0", "lite1", "lite2"])
def test_imagenet_weights_classify_a_real_photo(variant: str) -> None:
    """The packages' files, mapped onto timm's networks, know ImageNet: 'military uniform' (652) in the top 5."""
    net = _timm_lite(variant).eval()
    net.load_state_dict(imagenet_state_dict(variant))
    x = (torch.from_numpy(_photo(224)) - 127.0) / 128.0
    with torch.no_grad():
        p = net(x.permute(2, 0, 1)[None]).softmax(1)[0]
    assert 652 in p.topk(5).indices.tolist()  # a random network: ~0.001 per class
    assert float(p.max()) > 0.15


@pytest.mark.parametrize("name", ["effnet_lite0", "ssm_hybrid_tiny", "ssm_hybrid_tiny16"])
def test_body_with_card_normalisation_equals_imagenet_network(name: str) -> None:
    """load_imagenet folds the card's (pixel - mean) / std into the stem: the kept MBConv stages give ImageNet's
    features (away from the zero-padded border) whatever the band statistics."""
    model = build_model(ModelConfig(backbone=name, tile_size=128)).eval()
    mean, std = [90.0, 100.0, 80.0], [50.0, 60.0, 40.0]
    load_imagenet(model.backbone.body, mean, std)
    ref = _timm_lite("lite0").eval()
    ref.load_state_dict(imagenet_state_dict("lite0"))
    p = torch.from_numpy(_photo(256)).permute(2, 0, 1)[None]
    with torch.no_grad():
        ours = model.backbone.body((p - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None])
        theirs = ref.blocks[:3](ref.bn1(ref.conv_stem((p - 127.0) / 128.0)))
    diff = (ours["1"] - theirs)[..., 6:-6, 6:-6].abs().max()
    assert float(diff) < 1e-3 * float(theirs.abs().mean())
    assert [v.shape[-1] for v in ours.values()] == [64, 32, 16, 8]


def test_one_band_stem_sees_the_band_in_all_three_channels() -> None:
    """A 1-band (SAR, pan) body equals the RGB body fed that band three times."""
    rgb = build_model(ModelConfig(backbone="effnet_lite0", tile_size=64)).eval()
    one = build_model(ModelConfig(backbone="effnet_lite0", in_channels=1, tile_size=64)).eval()
    load_imagenet(rgb.backbone.body, [30.0] * 3, [40.0] * 3)
    load_imagenet(one.backbone.body, [30.0], [40.0])
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        a, b = one.backbone.body(x)["3"], rgb.backbone.body(x.repeat(1, 3, 1, 1))["3"]
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_wrong_weights_files_are_refused_with_one_line(tmp_path: Path) -> None:
    body = build_model(ModelConfig(backbone="effnet_lite0", tile_size=64)).backbone.body
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a weights file")
    with pytest.raises(InputError, match="not a readable weights file"):
        load_imagenet(body, [0.0] * 3, [1.0] * 3, garbage)
    lite2 = tmp_path / "lite2.pth"  # a real EfficientNet file, of another variant: same tensor count, other shapes
    torch.save(torch.load(imagenet_file("lite2"), weights_only=True), lite2)
    with pytest.raises(InputError, match="not EfficientNet-Lite0 weights") as err:
        load_imagenet(body, [0.0] * 3, [1.0] * 3, lite2)
    assert "\n" not in str(err.value)
    with pytest.raises(InputError, match="not found"):
        load_imagenet(body, [0.0] * 3, [1.0] * 3, tmp_path / "missing.pth")


def test_cli_refuses_imagenet_for_a_backbone_without_it(tmp_path: Path) -> None:
    d = ROOT.parent / "shared" / "data" / "ssdd"
    if not d.is_dir():
        pytest.skip("../shared/data is absent")
    r = subprocess.run([sys.executable, "-m", "training.cli", "train", "--images", str(d / "images"),
                        "--coco", str(d / "annotations/instances_test.json"), "--model-config", "ssm_tiny",
                        "--init-backbone", "imagenet",
                        "--out", str(tmp_path / "m.safetensors")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "has no ImageNet weights" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "m.safetensors").exists()


def test_frozen_batchnorm_keeps_statistics_and_freeze_stages_names_mbconv_blocks() -> None:
    from training.train import TrainConfig, apply_freeze

    model = build_model(ModelConfig(backbone="ssm_hybrid_tiny", tile_size=64))
    model.train()
    body = model.backbone.body
    before = body.blocks[1][0].bn1.running_mean.clone()
    body(torch.randn(2, 3, 64, 64) * 3 + 1)
    assert torch.equal(before, body.blocks[1][0].bn1.running_mean) and not body.blocks[1][0].bn1.training
    apply_freeze(model, TrainConfig(freeze_stages=2))
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert "backbone.body.conv_stem.weight" in frozen and "backbone.body.blocks.2.0.conv_pw.weight" in frozen
    assert not any(n.startswith("backbone.body.ssm_stages.") for n in frozen)


def test_hybrid_has_selective_scans_and_is_cheaper_than_ssm_tiny() -> None:
    hybrid = count_flops(build_model(ModelConfig(backbone="ssm_hybrid_tiny")), 256)
    tiny = count_flops(build_model(ModelConfig(backbone="ssm_tiny")), 256)
    assert hybrid["scan_gflops"] > 0 and hybrid["backbone_gflops"] < tiny["backbone_gflops"]


def test_hybrid_saves_loads_and_segments_through_the_cli(tmp_path: Path) -> None:
    """A hybrid model file (fp16) loads with the same weights and runs through `rs-engine segment` on a real
    raster (a 512 px crop of the NWPU example, written as a GeoTIFF)."""
    import pyogrio
    import rasterio
    from PIL import Image

    from rs_engine.checkpoint import load_model

    cfg = ModelConfig(backbone="ssm_hybrid_tiny", num_classes=2, tile_size=256)
    torch.manual_seed(0)
    model = build_model(cfg)
    load_imagenet(model.backbone.body, [100.0] * 3, [50.0] * 3)
    card = ModelCard(name="hybrid-unit", version="0.1", architecture=cfg.to_dict(), class_names=["a", "b"], bands=3,
                     mean=[100.0] * 3, std=[50.0] * 3, tile_size=256, overlap=64, score_threshold=0.5)
    path = save_model(tmp_path / "hybrid.safetensors", model, card, half=True)
    loaded, _ = load_model(path)
    w = model.backbone.body.blocks[2][0].conv_pw.weight
    torch.testing.assert_close(loaded.backbone.body.blocks[2][0].conv_pw.weight, w.half().float())
    rgb = np.asarray(Image.open(ROOT / "examples" / "nwpu_021.jpg").convert("RGB"))[:512, :512]
    raster = tmp_path / "crop.tif"
    with rasterio.open(raster, "w", driver="GTiff", width=512, height=512, count=3, dtype="uint8") as dst:
        dst.write(np.moveaxis(rgb, -1, 0))
    out = tmp_path / "out.gpkg"
    r = subprocess.run([sys.executable, "-m", "rs_engine.cli", "segment", str(raster), "-o", str(out),
                        "--model", str(path), "--progress", "none"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    info = pyogrio.read_info(out, layer="instances")
    assert {"class_id", "class_name", "score", "model", "run_id"} <= set(info["fields"])
