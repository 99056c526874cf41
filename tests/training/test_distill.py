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
    assert float(p.running) == pytest.approx(1.0)  # first batch: ebar = e_0 = mean = 1
    assert float(p.initial) == pytest.approx(1.0)
    sigma, rho = p.levels(idx)
    # g = 1; r = (2, 0.5, 0.5, unseen -> 1): sigma = 0.2 / r = (0.1, 0.4, 0.4, 0.2); rho likewise.
    assert sigma.tolist() == pytest.approx([0.1, 0.4, 0.4, 0.2])
    assert rho.tolist() == pytest.approx([0.1, 0.4, 0.4, 0.2])
    # Higher error -> less noise and masking; very low error is capped at the maxima.
    p.update(torch.tensor([3]), torch.tensor([0.05]))
    assert float(p.running) == pytest.approx(0.5 * 1.0 + 0.5 * 0.05)  # ebar <- beta ebar + (1 - beta) mean
    assert float(p.initial) == pytest.approx(1.0)  # e_0 stays the first batch's error
    sigma, rho = p.levels(torch.tensor([3, 0, 1, 2]))
    g = 1.0 / 0.525  # the student's error fell to 0.525 of e_0: everything gets harder by 1 / 0.525
    # chip 3: r = 0.05 / 0.525 -> capped; chip 0: 0.2 * g * 0.525 / 2; chips 1 and 2 use their own errors.
    assert sigma.tolist() == pytest.approx([0.6, 0.2 * g * 0.525 / 2.0, 0.2 * g * 0.525 / 0.5, 0.2 * g * 0.525 / 0.5])
    assert rho[0] == pytest.approx(0.6)
    # A chip never seen gets the global factor alone: the rule acts in a single pass over the data.
    p.errors[2] = float("nan")
    assert float(p.levels(torch.tensor([2]))[0][0]) == pytest.approx(0.2 * g)
    # gamma_global = 0 switches the progress factor off: an unseen chip is back at sigma_0.
    p.cfg = PerturbConfig(mode="adaptive", gamma_global=0.0)
    assert float(p.levels(torch.tensor([2]))[0][0]) == pytest.approx(0.2)
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


# ---------------------------------------------------------------- teachers

def test_efficientnet_lite0_teacher_is_imagenet_trained() -> None:
    """The package's weights, mapped onto timm's network, classify a real photo as ImageNet networks do."""
    from pathlib import Path

    import matplotlib
    import numpy as np
    from PIL import Image

    from training.distill.teachers import EfficientNetLiteTeacher

    photo = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if not photo.is_file():
        pytest.skip("matplotlib's sample photo is not installed")
    t = EfficientNetLiteTeacher()
    assert t.channels == {"s4": 24, "s8": 40, "s16": 112, "s32": 320}
    assert t.strides == {"s4": 4, "s8": 8, "s16": 16, "s32": 32}
    im = Image.open(photo).convert("RGB").crop((0, 44, 512, 556)).resize((224, 224), Image.BICUBIC)
    x = (torch.from_numpy(np.asarray(im, np.float32)) - torch.tensor(t.mean)) / torch.tensor(t.std)
    with torch.no_grad():
        p = t.classify(x.permute(2, 0, 1)[None]).softmax(1)[0]
    top5 = p.topk(5).indices.tolist()
    assert 652 in top5 and 834 in top5  # military uniform, suit (a random network: ~0.001 each, top-1 < 0.03)
    assert float(p.max()) > 0.15
    feats = t(torch.zeros(2, 3, 64, 64))
    assert feats["s32"].shape == (2, 320, 2, 2) and not any(q.requires_grad for q in t.parameters())


def test_sam_teacher_loads_checkpoint_and_rejects_wrong_keys(tmp_path) -> None:
    from segment_anything import sam_model_registry

    from training.distill.teachers import SamTeacher, build_teacher

    torch.manual_seed(0)
    sam = sam_model_registry["vit_b"](checkpoint=None)  # the official file holds the whole model's state dict
    state = sam.state_dict()
    good = tmp_path / "sam_vit_b.pth"
    torch.save(state, good)
    t = build_teacher(f"sam_vit_b:{good}")
    assert isinstance(t, SamTeacher) and t.channels == {"neck": 256} and t.strides == {"neck": 16}
    ref = state["image_encoder.blocks.0.attn.qkv.weight"]
    torch.testing.assert_close(t.encoder.blocks[0].attn.qkv.weight, ref)
    assert t(torch.zeros(1, 3, 96, 64))["neck"].shape == (1, 256, 6, 4)  # any multiple of 16 px
    bad = {k: v for k, v in state.items() if k != "image_encoder.neck.0.weight"}
    bad["image_encoder.blocks.0.attn.extra"] = torch.zeros(1)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(InputError) as err:
        SamTeacher("vit_b", tmp_path / "bad.pth")
    msg = str(err.value)
    assert "\n" not in msg and "bad.pth" in msg
    assert "1 missing keys (e.g. neck.0.weight)" in msg and "1 unexpected keys (e.g. blocks.0.attn.extra)" in msg
    with pytest.raises(InputError, match="not found"):
        build_teacher(f"sam_vit_b:{tmp_path / 'none.pth'}")


def test_timm_teacher_and_spec_errors(tmp_path) -> None:
    import timm
    from safetensors.torch import save_file

    from training.distill.teachers import build_teacher

    net = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    save_file(net.state_dict(), str(tmp_path / "vit.safetensors"))
    t = build_teacher(f"timm:vit_tiny_patch16_224:{tmp_path / 'vit.safetensors'}")
    assert t.channels == {"last": 192} and t.strides == {"last": 16}
    assert t(torch.zeros(1, 3, 128, 96))["last"].shape == (1, 192, 8, 6)
    save_file({"cls_token": torch.zeros(1, 1, 192)}, str(tmp_path / "few.safetensors"))
    with pytest.raises(InputError, match="missing keys"):
        build_teacher(f"timm:vit_tiny_patch16_224:{tmp_path / 'few.safetensors'}")
    with pytest.raises(InputError, match="timm:NAME:PATH"):
        build_teacher("timm:vit_tiny_patch16_224")
    with pytest.raises(InputError, match="not a teacher spec"):
        build_teacher("no_such_teacher")


def test_model_teacher_gives_backbone_levels() -> None:
    from training.distill.teachers import build_teacher

    t = build_teacher("model:ssdd-ship")
    assert t.strides == {"0": 4, "1": 8, "2": 16, "3": 32} and t.in_channels == t.card.bands
    assert list(t(torch.zeros(1, t.in_channels, 64, 64))["3"].shape) == [1, t.channels["3"], 2, 2]


# ---------------------------------------------------------------- the objective and the command

class _CountingTeacher(torch.nn.Module):
    """A tiny stand-in teacher (one conv at stride 8) that counts its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 5, 8, stride=8)
        self.mean, self.std, self.in_channels, self.label = [100.0] * 3, [50.0] * 3, 3, "counting"
        self.channels, self.strides, self.calls = {"f": 5}, {"f": 8}, 0

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.calls += x.shape[0]
        return {"f": self.conv(x)}


def test_objective_keeps_teacher_out_of_state_and_caches_its_features(tmp_path) -> None:
    from rs_engine.models import ModelConfig, build_backbone
    from training.distill.objective import DistillObjective, match_levels

    assert match_levels({"neck": 16}) == [("2", "neck")]
    assert match_levels({"s4": 4, "s8": 8, "s16": 16, "s32": 32}) == [("0", "s4"), ("1", "s8"), ("2", "s16"),
                                                                    ("3", "s32")]
    torch.manual_seed(0)
    teacher = _CountingTeacher()
    body = build_backbone(ModelConfig(backbone="ssm_tiny", in_channels=3))
    obj = DistillObjective(body, teacher, [120.0] * 3, [60.0] * 3, num_chips=6,
                           perturb=PerturbConfig(mode="adaptive"), drd_weight=0.1, cache_dir=tmp_path / "cache")
    assert obj.pairs == [("1", "f")]
    assert not any(k.startswith("teacher") for k in obj.state_dict())  # never saved, never optimised
    assert all(p.requires_grad for p in obj.parameters())
    batch = {"image": torch.randn(2, 3, 64, 64), "index": torch.tensor([3, 5])}
    loss, logs = obj(batch)
    loss.backward()
    assert teacher.calls == 2 and {"l1", "noise", "mask", "drd_spatial", "drd_channel"} <= set(logs)
    assert body.patch_embed[0].weight.grad is not None
    # The teacher sees (x * 60 + 120 - 100) / 50: the chips renormalised to its own statistics.
    with torch.no_grad():
        direct = teacher.conv((batch["image"] * 60 + 20) / 50).half().float()
    cached = obj.teacher_features(batch["image"], batch["index"])
    assert teacher.calls == 2  # read back from the cache, the teacher did not run again
    torch.testing.assert_close(cached["f"], direct, atol=1e-3, rtol=1e-3)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["00000003.safetensors", "00000005.safetensors"]
    assert not torch.isnan(obj.perturb.errors[3]) and torch.isnan(obj.perturb.errors[0])


def test_distill_torchrun_two_processes_resume_and_init_backbone(tmp_path) -> None:
    import json
    import os
    import subprocess
    import sys

    from PIL import Image

    from rs_engine.models import ModelConfig, build_model
    from training.pretrain import init_backbone, load_backbone

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(4):
        a = (torch.rand(80, 72, 3, generator=g) * 255).byte().numpy()
        Image.fromarray(a).save(imgs / f"{i}.png")
    out = tmp_path / "b.safetensors"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "training.cli", "distill", "--teacher", "efficientnet_lite0", "--images", str(imgs), "--chip-size", "64",
           "--batch-size", "1", "--warmup-steps", "1", "--workers", "0", "--cache-dir", str(tmp_path / "cache"),
           "--drd-weight", "0.1", "--progress", "jsonl", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([*cmd, "--epochs", "1"], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    done = [e for e in map(json.loads, r.stdout.splitlines()) if e["event"] == "done"]
    assert len(done) == 1 and done[0]["metrics"]["steps"] == 2  # 4 chips, 2 ranks, batch 1
    # Both ranks cached their chips; the adaptive state reached the resume file.
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 4
    from safetensors.torch import load_file

    errors = load_file(str(out.with_suffix(".resume.safetensors")))["model.perturb.errors"]
    assert int((~torch.isnan(errors)).sum()) == 4  # every rank holds every chip's error (gathered)
    r = subprocess.run([*cmd, "--epochs", "2"], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    state, card = load_backbone(out)
    assert card["method"] == "distill" and card["provenance"]["steps"] == 4  # resumed: 2 more steps, not 4
    assert card["provenance"]["epochs"] == 2
    model = build_model(ModelConfig(backbone="ssm_tiny", num_classes=2))
    info = init_backbone(model, out, "ssm_tiny")
    assert info["copied"] == len(state)
    torch.testing.assert_close(model.backbone.body.patch_embed[0].weight, state["patch_embed.0.weight"])


def test_distill_hybrid_student_from_imagenet(tmp_path) -> None:
    """``--init-student imagenet`` starts a hybrid student's MBConv stages from ImageNet before distillation; a
    student without ImageNet weights is refused with one line."""
    import subprocess
    import sys

    from PIL import Image

    from rs_engine.models.effnet import imagenet_state_dict
    from training.pretrain import load_backbone

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(2):
        Image.fromarray((torch.rand(72, 72, 3, generator=g) * 255).byte().numpy()).save(imgs / f"{i}.png")
    out = tmp_path / "hybrid.safetensors"
    cmd = [sys.executable, "-m", "training.cli", "distill", "--teacher", "efficientnet_lite0", "--images", str(imgs),
           "--chip-size", "64", "--batch-size", "1", "--epochs", "1", "--warmup-steps", "1", "--workers", "0",
           "--progress", "none", "--init-student", "imagenet"]  # fmt: skip
    r = subprocess.run([*cmd, "--student-config", "ssm_hybrid_tiny", "--out", str(out)], capture_output=True,
                       text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    state, card = load_backbone(out)
    assert card["backbone"] == "ssm_hybrid_tiny" and card["provenance"]["init_student"]["copied"] > 50
    key = "blocks.2.0.conv_pw.weight"  # an MBConv weight of the stride-8 stage (not the stem, which is folded)
    imagenet = imagenet_state_dict("lite0")[key]
    assert 0 < (state[key].float() - imagenet).norm() / imagenet.norm() < 0.1  # two small steps from ImageNet
    frozen = tmp_path / "frozen.safetensors"  # --freeze-stages 2: the MBConv stages stay ImageNet's, SS2D trains
    r = subprocess.run([*cmd, "--student-config", "ssm_hybrid_tiny", "--freeze-stages", "2", "--out", str(frozen)],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    fstate, fcard = load_backbone(frozen)
    assert torch.equal(fstate[key].float(), imagenet.to(fstate[key].dtype).float())
    assert "blocks.2." in fcard["provenance"]["frozen"] and not any(
        p.startswith("ssm_stages") for p in fcard["provenance"]["frozen"])
    r = subprocess.run([*cmd, "--student-config", "ssm_tiny", "--out", str(tmp_path / "t.safetensors")],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 2 and "has no ImageNet weights" in r.stderr and len(r.stderr.strip().splitlines()) == 1
