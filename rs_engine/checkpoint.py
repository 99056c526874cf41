"""The PyTorch model file: weights + model card in one ``.safetensors`` file. The only place that reads or writes
them (the card itself, and finding files by name: :mod:`rs_engine.card`, torch-free).

A model file is a safetensors file (no pickle, so loading can never run code) whose string metadata holds the
model card as JSON under the key ``"model_card"``. The card says what the network needs (architecture config,
input bands, per-band normalisation, GSD, tile size) and what it gives (class names, score threshold), plus
where it came from (data, epochs, metrics).

Bundled models live in ``rs_engine/weights/NAME.safetensors`` and are addressed by name (``nwpu10``,
``ssdd-ship``); any other model is addressed by path.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from rs_engine.card import (  # noqa: F401  (re-exported: the card's API as it was before the split)
    BUNDLED_DIR,
    CARD_KEY,
    FORMAT_VERSION,
    ModelCard,
    _first_line,
    bundled_models,
    read_card,
    resolve_model,
)
from rs_engine.errors import InputError, raise_write_error, remove_quietly

log = logging.getLogger(__name__)


def load_state(
    spec: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], ModelCard]:
    """Read weights (as stored, fp16 or fp32) and card.

    Raises:
        InputError: as :func:`read_card`, or the tensor data is corrupt.
    """
    path = resolve_model(spec, ".safetensors")
    if path.suffix.lower() == ".onnx":
        raise InputError(f"{path}: an ONNX model runs with --runtime onnx; PyTorch loads .safetensors models")
    card = read_card(path)
    try:
        state: dict[str, torch.Tensor] = {}
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for key in f.keys():
                state[key] = f.get_tensor(key)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise InputError(f"{path}: model file is corrupt ({_first_line(exc)})") from None
    return state, card


def load_model(spec: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, ModelCard]:
    """Build the network described by the card and load its weights; returns ``(model in eval mode, card)``.

    fp16-stored weights are cast to float32 for CPU inference. A card whose ``architecture["head"]`` is ``"prompt"``
    gives the detector in :class:`~rs_engine.models.prompter.PromptHeadInstances` (its masks from its prompt head,
    RSPrompter-anchor); absent or ``"maskrcnn"``: the torchvision Mask R-CNN itself.

    Raises:
        InputError: unknown name, missing or corrupt file, or weights that don't fit the card's architecture.
    """
    from rs_engine.models import ModelConfig, build_model

    state, card = load_state(spec, device="cpu")
    try:
        config = ModelConfig.from_dict(card.architecture)
        model = build_model(config)
    except (TypeError, ValueError, KeyError) as exc:
        raise InputError(f"{spec}: model card describes an unknown architecture ({_first_line(exc)})") from None
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise InputError(f"{spec}: weights don't match the card's architecture ({_first_line(exc)})") from None
    if missing or unexpected:
        raise InputError(
            f"{spec}: weights don't match the card's architecture "
            f"({len(missing)} missing, {len(unexpected)} unexpected, e.g. {(missing + unexpected)[:2]})"
        )
    if config.head == "prompt":
        from rs_engine.models.prompter import PromptHeadInstances

        model = PromptHeadInstances(model)
    model.to(device).eval()
    return model, card


def save_model(
    path: str | os.PathLike, model: torch.nn.Module, card: ModelCard, half: bool = False
) -> Path:
    """Write weights + card atomically (temp file, then rename); makes the folder if needed.

    Args:
        half: store floating-point weights as float16 (half the size; cast back to float32 on load).

    Raises:
        InputError: the file system refused the write (one line naming the folder and the cause); a model
            file already at ``path`` is left as it was.
    """
    path = Path(path)
    state = {}
    for key, value in model.state_dict().items():
        value = value.detach().cpu().contiguous()
        if half and value.is_floating_point():
            value = value.half()
        state[key] = value
    _write(path, state, card)
    log.info("wrote model %s (%d tensors)", path, len(state))
    return path


def update_card(path: str | os.PathLike, card: ModelCard) -> Path:
    """Rewrite a model file's card, keeping its tensors exactly as stored (e.g. to add test metrics).

    Raises:
        InputError: as :func:`load_state`.
    """
    state, _ = load_state(path)
    path = Path(path)
    _write(path, state, card)
    return path


def _write(path: Path, state: dict[str, torch.Tensor], card: ModelCard) -> None:
    """Write tensors + card (atomically, :func:`write_safetensors`), making the folder if needed.

    Raises:
        InputError: as :func:`write_safetensors`.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise_write_error(path, exc)
    write_safetensors(path, state, {CARD_KEY: card.to_json(), "format": "delineate"})


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """The one writer of safetensors files (models, backbones, resume files): a temporary file beside ``path``,
    renamed onto it once complete, so a failed or interrupted write never damages the file already there.

    Raises:
        InputError: the file system refused the write (disk full, quota, read-only, folder missing or removed):
            one line naming the folder and the cause; ``path`` is left as it was, no temporary file remains.
    """
    path, tmp = Path(path), None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        save_file(tensors, tmp, metadata=metadata)
        umask = os.umask(0)  # mkstemp makes the file 0600; give it the usual permissions
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except (OSError, SafetensorError) as exc:
        raise_write_error(path, exc)
    finally:
        if tmp is not None:
            remove_quietly(tmp)

