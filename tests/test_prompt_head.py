"""The SAM-style prompt head (rs_engine/models/prompt_head.py), its training on a frozen detector
(training/prompt_head.py, ``rs-train prompt-head``) and :class:`~rs_engine.models.prompter.SAMPrompter`.

Shapes and errors need nothing but the code; the rest trains a head for 120 steps on 4 real NWPU VHR-10 chips
(256 px, the bundled nwpu10 frozen under it), which must lift box-prompted IoU on them from near 0 to over 0.4.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from rs_engine.models.prompt_head import PromptHead, PromptHeadConfig, prompt_maps, upscale

NWPU = Path(__file__).resolve().parents[2] / "shared" / "data" / "nwpu_vhr10"
needs_nwpu = pytest.mark.skipif(not (NWPU / "annotations/instances_train.json").is_file(),
                                reason="../shared/data (NWPU VHR-10) not present")
#: Training images whose top-left 256 px hold objects: storage tanks, tennis courts, vehicles, airplanes.
FOUR = ("285.jpg", "329.jpg", "414.jpg", "516.jpg")


def _embedding(head: PromptHead, h: int, w: int) -> torch.Tensor:
    grid = (-(-h // 32) * 2, -(-w // 32) * 2)
    return head.embed({"2": torch.randn(1, head.config.fpn_channels, *grid)})


@pytest.mark.parametrize("size", [(256, 256), (320, 512), (512, 512), (300, 500)])
def test_shapes_for_any_window(size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    head = PromptHead()
    h, w = size
    emb = _embedding(head, h, w)
    assert emb.shape == (1, 128, -(-h // 32) * 2, -(-w // 32) * 2)
    points = torch.tensor([[[20.0, 30.0], [40.0, 50.0]]] * 3)
    labels = torch.tensor([[1, 0], [1, 1], [1, -1]])
    boxes = torch.tensor([[10.0, 10.0, 60.0, 80.0], [0.0, 0.0, w, h], [100.0, 120.0, 101.0, 121.0]])
    cells = (-(-h // 4), -(-w // 4))
    for kw, m in ((dict(points=points, point_labels=labels, multimask=True), 3), (dict(boxes=boxes), 1),
                  (dict(points=points, point_labels=labels, boxes=boxes), 1),
                  (dict(points=points[:, :1]), 1)):  # fmt: skip
        logits, iou = head(emb, size, **kw)
        assert logits.shape == (3, m, *cells) and iou.shape == (3, m)
        assert upscale(logits, size).shape == (3, m, h, w)
        assert torch.isfinite(logits).all()


def test_errors_and_prompt_maps() -> None:
    head = PromptHead()
    emb = _embedding(head, 256, 256)
    box = torch.tensor([[10.0, 10.0, 60.0, 80.0]])
    with pytest.raises(ValueError, match="give points, boxes or both"):
        head(emb, (256, 256))
    with pytest.raises(ValueError, match="does not fit"):
        head(emb, (320, 256), boxes=box)
    with pytest.raises(ValueError, match="one window"):
        head(emb.expand(2, -1, -1, -1), (256, 256), boxes=box)
    with pytest.raises(ValueError, match="points must be"):
        head(emb, (256, 256), points=torch.zeros(1, 2))
    # The box map covers the stride-4 cells whose centres fall in the box; a positive point peaks at 1.
    maps = prompt_maps((64, 64), torch.tensor([[[30.0, 30.0]]]), torch.tensor([[1]]), box)
    inside = maps[0, 0] >= 1
    assert inside[2:20, 2:15].all() and not inside[25:, :].any() and not inside[:, 20:].any()
    assert abs(float(prompt_maps((64, 64), torch.tensor([[[29.5, 29.5]]]), torch.tensor([[1]])).max()) - 1) < 1e-5


def test_gradients_reach_the_head_only() -> None:
    from rs_engine.checkpoint import load_model
    from training.prompt_head import PromptObjective, PromptTrainConfig

    model, card = load_model("nwpu10")
    torch.manual_seed(0)
    head = PromptHead(PromptHeadConfig(fpn_channels=model.backbone.out_channels))
    masks = torch.zeros(2, 256, 256, dtype=torch.uint8)
    masks[0, 20:60, 30:90] = 1
    masks[1, 150:200, 100:140] = 1
    target = {"boxes": torch.tensor([[30.0, 20.0, 90.0, 60.0], [100.0, 150.0, 140.0, 200.0]]), "masks": masks}
    with torch.no_grad():  # as training runs the frozen detector
        maps = model.backbone(torch.randn(2, 3, 256, 256))["2"]
    g = torch.Generator().manual_seed(0)
    loss = sum(PromptObjective(head, PromptTrainConfig(box_share=share))(maps, [target, target], (256, 256), g)[0]
               for share in (0.0, 1.0))  # fmt: skip
    loss.backward()
    assert all(p.grad is None for p in model.parameters())
    # Every head tensor learns, except the negative-point embedding (training draws positive points only) and the
    # hypernetworks of the point outputs no object chose (SAM's minimum loss over the outputs).
    missing = {n for n, p in head.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0}
    hyper = {n for n in missing if n.startswith("mask_decoder.output_hypernetworks_mlps.")}
    assert missing - hyper == {"prompt_encoder.point_embeddings.0.weight"}, missing
    chosen = {n.split(".")[2] for n, p in head.named_parameters() if n.startswith("mask_decoder.output_hyper")
              and p.grad is not None and p.grad.abs().sum() > 0}
    assert "0" in chosen and chosen & {"1", "2", "3"}, chosen  # the box output and at least one point output


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The bundled nwpu10 with a prompt head trained for 120 steps (60 epochs of 2 batches) on 4 NWPU chips (on
    nwpu10 0.7's features 60 steps, enough on 0.6's, left box IoU at 0.05)."""
    from rs_engine.checkpoint import load_model
    from training.coco import ChipSpec, CocoChips
    from training.prompt_head import ChipSets, evaluate_head, train_prompt_head
    from training.train import TrainConfig

    tmp = tmp_path_factory.mktemp("prompt_head")
    coco = json.loads((NWPU / "annotations/instances_train.json").read_text())
    coco["images"] = [i for i in coco["images"] if i["file_name"] in FOUR]
    ids = {i["id"] for i in coco["images"]}
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in ids]
    (tmp / "four.json").write_text(json.dumps(coco))
    model, card = load_model("nwpu10")
    detector = {k: v.clone() for k, v in model.state_dict().items()}
    chips = CocoChips(tmp / "four.json", NWPU / "images", ChipSpec(256, [0, 1, 2], card.mean, card.std), train=False)
    torch.manual_seed(0)  # the head training starts from (train_prompt_head seeds with cfg.seed)
    model.prompt_head = PromptHead(PromptHeadConfig())
    before = evaluate_head(model, chips)
    out = tmp / "nwpu10-prompt.safetensors"
    cfg = TrainConfig(epochs=60, batch_size=2, lr=3e-3, warmup_steps=5, half=False, num_workers=0, seed=0)
    state = train_prompt_head(model, card, ChipSets([chips]), out, cfg)
    return {"model": model, "card": card, "chips": chips, "before": before, "after": evaluate_head(model, chips),
            "state": state, "out": out, "detector": detector, "tmp": tmp}


@needs_nwpu
def test_training_learns_on_real_chips(trained: dict[str, Any]) -> None:
    before, after = trained["before"], trained["after"]
    assert trained["state"]["step"] == 120
    assert after["box_iou"] >= 0.4 and after["box_iou"] > before["box_iou"] + 0.3, (before, after)
    assert after["point_iou"] > before["point_iou"] + 0.05, (before, after)
    assert after["box_loss"] < 0.5 * before["box_loss"], (before, after)
    model = trained["model"]
    # The detector stayed frozen: same weights, nothing but the head trainable.
    for k, v in model.state_dict().items():
        if not k.startswith("prompt_head."):
            assert torch.equal(v, trained["detector"][k]), k
    assert all(n.startswith("prompt_head.") for n, p in model.named_parameters() if p.requires_grad)


@needs_nwpu
def test_model_file_round_trip(trained: dict[str, Any]) -> None:
    from rs_engine.checkpoint import load_model, read_card
    from rs_engine.models.prompter import SAMPrompter, prompter_for

    card = read_card(trained["out"])
    assert card.architecture["extra"]["prompt_head"] == PromptHeadConfig().to_dict()
    assert card.provenance["prompt_head"]["steps"] == 120 and card.class_names == trained["card"].class_names
    loaded, _ = load_model(trained["out"])
    assert isinstance(loaded.prompt_head, PromptHead)
    image, target = trained["chips"][0]
    a, b = prompter_for(trained["model"]), prompter_for(loaded)
    assert isinstance(a, SAMPrompter) and isinstance(b, SAMPrompter)
    ma, sa, la = a.box_masks(a.embed(image), target["boxes"])
    mb, sb, lb = b.box_masks(b.embed(image), target["boxes"])
    assert torch.equal(ma, mb) and torch.equal(sa, sb) and torch.equal(la, lb)


@needs_nwpu
def test_sam_prompter_on_a_real_window(trained: dict[str, Any]) -> None:
    from rs_engine.checkpoint import load_model
    from rs_engine.models.prompter import MaskRCNNPrompter, Outline, SAMPrompter, prompter_for
    from training.augment import make_target

    chips = trained["chips"]
    image_id = chips.ids[0]
    raw = chips.load_image(image_id)
    truth, labels = chips.instances(image_id, *raw.shape[-2:])
    h, w = 300, 420  # not multiples of 32
    mean, std = np.array(chips.spec.mean)[:, None, None], np.array(chips.spec.std)[:, None, None]
    window = ((raw[:, :h, :w] - mean) / std).astype(np.float32)
    target = make_target(truth[:, :h, :w], labels)
    prompter = prompter_for(trained["model"])
    assert isinstance(prompter, SAMPrompter)
    emb = prompter.embed(window)
    masks, scores, got = prompter.box_masks(emb, target["boxes"])
    assert masks.shape == (len(target["boxes"]), h, w) and ((scores >= 0) & (scores <= 1)).all()
    assert ((got >= 1) & (got <= len(chips.class_names))).all()
    box = target["boxes"][0].numpy()
    t = time.perf_counter()
    out = prompter.box(emb, box)
    further = time.perf_counter() - t
    assert isinstance(out, Outline) and out.mask.shape == (h, w) and 0 <= out.score <= 1
    assert further < 1.0, further  # issue 16 asks for 0.2 s; loose here, the test machine is shared
    from training.prompted import interior_point

    pt = prompter.point(emb, np.array([interior_point(truth[0, :h, :w].astype(bool))], np.float32))
    assert pt is None or (pt.mask.shape == (h, w) and 1 <= pt.label <= len(chips.class_names))
    # A model without a head keeps the Mask R-CNN prompter.
    assert type(prompter_for(load_model("nwpu10")[0])) is MaskRCNNPrompter


@needs_nwpu
def test_cli(trained: dict[str, Any]) -> None:
    tmp = trained["tmp"]
    base = [sys.executable, "-m", "training.cli", "prompt-head", "--model", "nwpu10", "--progress", "none"]
    r = subprocess.run([*base, "--coco", str(tmp / "four.json"), "--coco", str(tmp / "four.json"), "--images",
                        str(NWPU / "images"), "--out", str(tmp / "x.safetensors")], capture_output=True, text=True)
    assert r.returncode == 2 and "one --images folder per --coco file" in r.stderr, r.stderr
    out = tmp / "cli.safetensors"
    r = subprocess.run([*base, "--coco", str(tmp / "four.json"), "--images", str(NWPU / "images"), "--out", str(out),
                        "--chip-size", "256", "--epochs", "1", "--workers", "0"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["steps"] == 2
    from rs_engine.checkpoint import read_card

    assert "prompt-head" in read_card(out).provenance["prompt_head"]["command"]
    assert out.with_suffix(".resume.safetensors").is_file()


@needs_nwpu
def test_prompt_head_as_instance_head(trained: dict[str, Any]) -> None:
    """RSPrompter-anchor: the detector's detections, masks from the prompt head; rs-train evaluate --mask-head."""
    from rs_engine.models.prompter import PromptHeadInstances, SAMPrompter
    from training.evaluate import predict_image

    model = trained["model"]
    image, _ = trained["chips"][0]
    plain = predict_image(model, image)
    prompted = predict_image(PromptHeadInstances(model), image)
    assert len(plain["boxes"]) > 0
    for key in ("boxes", "labels", "scores"):
        assert torch.equal(plain[key], prompted[key]), key
    assert prompted["masks"].shape == plain["masks"].shape
    sam = SAMPrompter(model)
    expected = sam.box_masks(sam.embed(image), plain["boxes"])[0]
    assert torch.allclose(prompted["masks"][:, 0], expected)
    r = subprocess.run([sys.executable, "-m", "training.cli", "evaluate", "--model", str(trained["out"]), "--coco",
                        str(trained["tmp"] / "four.json"), "--images", str(NWPU / "images"), "--mask-head", "prompt",
                        "--json", str(trained["tmp"] / "m.json")], capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert 0 <= json.loads((trained["tmp"] / "m.json").read_text())["segm"]["AP"] <= 100
    r = subprocess.run([sys.executable, "-m", "training.cli", "evaluate", "--model", "nwpu10", "--coco",
                        str(trained["tmp"] / "four.json"), "--images", str(NWPU / "images"), "--mask-head", "prompt"],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 2 and "has no prompt head" in r.stderr, r.stderr
