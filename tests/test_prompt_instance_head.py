"""The prompt head as a model's instance mask head (RSPrompter-anchor, issue 16 item 2): ``rs-train train --head
prompt`` trains it jointly with the detector (training/prompt_instances.py), the card says ``head = "prompt"``, and
``load_model`` / ``load_predictor`` / ``rs-train evaluate`` / ``prompter_for`` then take the masks from the prompt head
(:class:`rs_engine.models.prompter.PromptHeadInstances`).

The objective and the wrapper are checked on a random model; the command line on 4 real SSDD chips (128 px, 1 band,
2 steps per epoch), as tests/training/test_train_smoke.py runs ``rs-train train``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from rs_engine.models import ModelConfig, build_model
from rs_engine.models.prompter import PromptHeadInstances, SAMPrompter, prompter_for

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SSDD, SPACENET = DATA / "ssdd", DATA / "spacenet_samples"
#: The SSDD training images densest in ships.
DENSE = ("train/001112.jpg", "train/001113.jpg", "train/001108.jpg", "train/001093.jpg")
needs_ssdd = pytest.mark.skipif(not (SSDD / "annotations/instances_train.json").is_file(),
                                reason="../shared/data (SSDD) not present")


def rs_train(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "training.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


def _prompt_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelConfig(in_channels=1, num_classes=2, tile_size=128, head="prompt"))


def _target(size: int = 128) -> dict[str, torch.Tensor]:
    masks = torch.zeros(2, size, size, dtype=torch.uint8)
    masks[0, 10:40, 20:60] = 1
    masks[1, 70:100, 70:90] = 1
    return {"boxes": torch.tensor([[20.0, 10, 60, 40], [70, 70, 90, 100]]), "labels": torch.tensor([1, 2]),
            "masks": masks}


def test_config_and_model_without_a_mask_head() -> None:
    assert "head" not in ModelConfig().to_dict()  # Mask R-CNN cards stay as they were
    assert ModelConfig.from_dict(ModelConfig(head="prompt").to_dict()).head == "prompt"
    with pytest.raises(ValueError, match="unknown instance head"):
        ModelConfig(head="sam")
    model = _prompt_model()
    keys = model.state_dict().keys()
    assert not any(k.startswith(("roi_heads.mask_head", "roi_heads.mask_predictor")) for k in keys)
    assert any(k.startswith("prompt_head.") for k in keys) and not model.roi_heads.has_mask()


def test_joint_loss_is_the_prompt_heads_and_reaches_the_backbone() -> None:
    from training.prompt_head import PromptObjective
    from training.prompt_instances import PromptInstanceLoss, joint_prompts

    model = _prompt_model().train()
    images = [torch.randn(1, 128, 128), torch.randn(1, 128, 128)]
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
             "masks": torch.zeros(0, 128, 128, dtype=torch.uint8)}
    losses = PromptInstanceLoss(model, seed=3)(images, [_target(), empty])
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask"}
    # The mask loss is training.prompt_head's objective on the FPN's stride-16 map, box prompts drawn as it draws them.
    with torch.no_grad():
        maps = model.backbone(torch.stack(images))["2"]
        expected, _ = PromptObjective(model.prompt_head, joint_prompts())(maps, [_target(), empty], (128, 128),
                                                                          torch.Generator().manual_seed(3))
    assert joint_prompts().box_share == 1.0
    assert torch.allclose(losses["loss_mask"], expected, rtol=1e-4), (losses["loss_mask"], expected)
    model.zero_grad()
    losses["loss_mask"].backward()
    grads: dict[str, bool] = {}  # per module: does any of its parameters get a gradient?
    for n, p in model.named_parameters():
        key = ".".join(n.split(".")[:2])
        grads[key] = grads.get(key, False) or (p.grad is not None and bool(p.grad.abs().sum() > 0))
    assert grads["backbone.body"] and grads["backbone.fpn"] and grads["prompt_head.mask_decoder"]  # jointly
    assert not grads["roi_heads.box_predictor"]  # the mask loss is the head's alone


def test_instances_take_masks_from_the_prompt_head() -> None:
    model = _prompt_model().eval()
    model.roi_heads.score_thresh = 0.0  # an untrained model: keep every detection
    wrapped = PromptHeadInstances(model)
    assert len(wrapped.state_dict()) == len(model.state_dict())  # the detector's modules, registered once
    images = [torch.randn(1, 128, 128), torch.randn(1, 100, 120)]  # the second resized up by the transform
    outputs = wrapped(images)
    with torch.inference_mode():
        plain = model(images)
    sam = prompter_for(wrapped)
    assert isinstance(sam, SAMPrompter) and sam.model is model
    for image, out, ref in zip(images, outputs, plain, strict=True):
        n = len(out["boxes"])
        assert n > 0 and out["masks"].shape == (n, 1, *image.shape[-2:])
        assert "masks" not in ref  # the detector alone gives no masks
        assert torch.equal(out["boxes"], ref["boxes"]) and torch.equal(out["labels"], ref["labels"])
    # Not resized (128 px, the tile size): exactly the prompt head's box-prompted masks of the detections.
    expected = sam.box_masks(sam.embed(images[0]), outputs[0]["boxes"])[0]
    assert torch.allclose(outputs[0]["masks"][:, 0], expected, atol=1e-5)
    with pytest.raises(AttributeError, match="no prompt head"):
        PromptHeadInstances(torch.nn.Linear(1, 1))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``rs-train train --head prompt`` for 1 epoch (2 steps) on 4 SSDD training images (128 px chips).

    The COCO subset as tests/training/conftest.py's ``ssdd_subset`` makes it, once for the module, of the 4 images
    densest in ships (19 to 29 each), so that random 128 px chips hold ships: the first 4 hold one each, and chips
    without one train no mask loss (the head would not move)."""
    tmp = tmp_path_factory.mktemp("prompt_instances")
    coco = json.loads((SSDD / "annotations/instances_train.json").read_text())
    coco["images"] = [i for i in coco["images"] if i["file_name"] in DENSE]
    ids = {i["id"] for i in coco["images"]}
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in ids]
    ann, out = tmp / "ssdd4.json", tmp / "joint.safetensors"
    ann.write_text(json.dumps(coco))
    command = ["train", "--head", "prompt", "--coco", ann, "--images", SSDD / "images", "--bands", "1",
               "--chip-size", "128", "--batch-size", "2", "--warmup-steps", "2", "--workers", "0", "--seed", "0",
               "--progress", "none", "--out", out]
    r = rs_train(*command, "--epochs", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    return {"tmp": tmp, "ann": ann, "out": out, "command": command}


@needs_ssdd
def test_train_writes_a_prompt_head_model(run: dict[str, Any]) -> None:
    from rs_engine.checkpoint import load_state
    from rs_engine.models.prompt_head import PromptHeadConfig

    state, card = load_state(run["out"])
    assert card.architecture["head"] == "prompt" and card.class_names == ["ship"]
    assert card.architecture["extra"]["prompt_head"] == PromptHeadConfig().to_dict()
    assert card.provenance["prompts"]["box_share"] == 1.0 and card.provenance["steps"] == 2
    assert "--head prompt" in card.provenance["command"]
    assert not any(k.startswith("roi_heads.mask_") for k in state)
    # The head trained: its weights left their initialisation (the same seed builds the same initial model; the
    # file stores float16).
    torch.manual_seed(0)
    fresh = build_model(ModelConfig.from_dict(card.architecture)).state_dict()
    decoder = [k for k in state if k.startswith("prompt_head.mask_decoder.") and state[k].is_floating_point()]
    moved = [k for k in decoder if not torch.equal(state[k], fresh[k].to(state[k].dtype))]
    assert len(moved) > 0.8 * len(decoder), (len(moved), len(decoder))


@needs_ssdd
def test_load_model_and_predictor_give_prompt_head_masks(run: dict[str, Any]) -> None:
    from rs_engine.checkpoint import load_model
    from rs_engine.runtime import TorchPredictor, load_predictor
    from training.coco import ChipSpec, CocoChips
    from training.evaluate import predict_image

    model, card = load_model(run["out"])
    assert isinstance(model, PromptHeadInstances) and not model.training
    model.roi_heads.score_thresh = 0.0  # 2 steps of training: keep every detection
    chips = CocoChips(run["ann"], SSDD / "images", ChipSpec(128, [0], card.mean, card.std), train=False)
    image, _ = chips[0]
    out = predict_image(model, image)
    n = len(out["boxes"])
    assert n > 0 and out["masks"].shape == (n, 1, 128, 128)
    sam = prompter_for(model)
    assert isinstance(sam, SAMPrompter)
    assert torch.allclose(out["masks"][:, 0], sam.box_masks(sam.embed(image), out["boxes"])[0], atol=1e-5)
    # --input-scale 2 (the prompt head's stride-4 masks at twice the resolution): results at the image's own size
    before = model.transform.min_size, model.transform.max_size
    big = predict_image(model, image, scale=2.0)
    assert big["masks"].shape[1:] == (1, 128, 128) and float(big["boxes"].max()) <= 128
    assert (model.transform.min_size, model.transform.max_size) == before  # left as it was
    predictor, _ = load_predictor(run["out"], "torch", "cpu")
    assert isinstance(predictor, TorchPredictor) and isinstance(predictor.model, PromptHeadInstances)
    predictor.set_score_threshold(0.0)
    tile = np.asarray(image, dtype=np.float32)
    got = predictor([tile])[0]
    assert got["masks"].shape == (len(got["boxes"]), 1, 128, 128) and got["masks"].dtype == np.float32


@needs_ssdd
def test_evaluate_export_and_prompt_head_refusals(run: dict[str, Any]) -> None:
    from rs_engine.errors import InputError
    from rs_engine.export import export_onnx

    metrics = run["tmp"] / "m.json"
    r = rs_train("evaluate", "--model", run["out"], "--coco", run["ann"], "--images", SSDD / "images", "--json",
                 metrics)
    assert r.returncode == 0, r.stderr[-2000:]
    assert 0 <= json.loads(metrics.read_text())["segm"]["AP"] <= 100
    r = rs_train("evaluate", "--model", run["out"], "--coco", run["ann"], "--images", SSDD / "images",
                 "--mask-head", "maskrcnn")
    assert r.returncode == 2 and "has no Mask R-CNN mask head" in r.stderr, r.stderr
    r = rs_train("evaluate", "--model", run["out"], "--coco", run["ann"], "--images", SSDD / "images",
                 "--input-scale", "0")
    assert r.returncode == 2 and "--input-scale 0.0: use a positive factor" in r.stderr, r.stderr
    with pytest.raises(InputError, match="prompt head"):
        export_onnx(run["out"], run["tmp"] / "m.onnx")
    assert not (run["tmp"] / "m.onnx").exists()


@needs_ssdd
def test_resume_continues_the_joint_run(run: dict[str, Any]) -> None:
    from rs_engine.checkpoint import read_card

    r = rs_train(*run["command"], "--epochs", "2")  # the same command, one more epoch: resumes at epoch 1
    assert r.returncode == 0, r.stderr[-2000:]
    rows = run["out"].with_suffix(".log.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows[1:]] == ["1", "2"]
    card = read_card(run["out"])
    assert card.provenance["epochs"] == 2 and card.provenance["steps"] == 4 and card.architecture["head"] == "prompt"


@pytest.mark.skipif(not (SPACENET / "sample_geotiff.tif").is_file(), reason="../shared/data (SpaceNet) not present")
def test_finetune_head_prompt(tmp_path: Path) -> None:
    """``finetune --head prompt`` from the bundled Mask R-CNN nwpu10: the new model's masks come from a prompt head."""
    from rs_engine.checkpoint import load_model

    out = tmp_path / "ft.safetensors"
    r = rs_train("finetune", "--head", "prompt", "--raster", SPACENET / "sample_geotiff.tif", "--labels",
                 SPACENET / "geotiff_labels.geojson", "--class-field", "building", "--base-model", "nwpu10", "--out",
                 out, "--chip-size", "128", "--chips-per-epoch", "4", "--batch-size", "2", "--epochs", "1",
                 "--warmup-steps", "1", "--workers", "0", "--val-fraction", "0", "--progress", "none")
    assert r.returncode == 0, r.stderr[-2000:]
    model, card = load_model(out)
    assert isinstance(model, PromptHeadInstances) and card.architecture["head"] == "prompt"
    assert "prompt_head" in card.architecture["extra"] and card.provenance["steps"] == 2
