"""The model file: weights + model card in one ``.safetensors`` file. The only place that reads or writes them.

A model file is a safetensors file (no pickle, so loading can never run code) whose string metadata holds the
model card as JSON under the key ``"model_card"``. The card says what the network needs (architecture config,
input bands, per-band normalisation, GSD, tile size) and what it gives (class names, score threshold), plus
where it came from (data, epochs, metrics).

Bundled models live in ``rs_engine/weights/NAME.safetensors`` and are addressed by name (``nwpu10``,
``ssdd-ship``); any other model is addressed by path.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from rs_engine.errors import InputError, raise_write_error, remove_quietly

log = logging.getLogger(__name__)

BUNDLED_DIR = Path(__file__).resolve().parent / "weights"
CARD_KEY = "model_card"
FORMAT_VERSION = 1


@dataclass
class ModelCard:
    """What a model needs and gives, stored with its weights.

    Attributes:
        name: short model name, e.g. ``"nwpu10"``.
        version: model version string, e.g. ``"1.0"``.
        architecture: the :class:`rs_engine.models.ModelConfig` as a dict (``dataclasses.asdict``).
        class_names: names of the object classes, index i is ``class_id`` i + 1 (0 is background).
        bands: number of input bands the network takes.
        mean, std: per-band normalisation in the raster's own units (after complex -> magnitude):
            ``x_norm = (x - mean) / std``; one value per band.
        gsd: training ground sample distance in metres per pixel, or ``None`` when unknown (no resampling).
        tile_size: default tile size in pixels.
        overlap: default tile overlap in pixels.
        score_threshold: default minimum instance score (0-1).
        provenance: free-form facts: training data, epochs, hardware, metrics, command.
        format_version: model file format version.
    """

    name: str
    version: str
    architecture: dict[str, Any]
    class_names: list[str]
    bands: int
    mean: list[float]
    std: list[float]
    gsd: float | None = None
    tile_size: int = 512
    overlap: int = 128
    score_threshold: float = 0.5
    provenance: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if len(self.mean) != self.bands or len(self.std) != self.bands:
            raise ValueError(f"model card: mean/std need {self.bands} values, got {len(self.mean)}/{len(self.std)}")
        if any(s <= 0 for s in self.std):
            raise ValueError("model card: std values must be positive")

    @property
    def label(self) -> str:
        """``name`` and ``version`` as written in the output layer's ``model`` field."""
        return f"{self.name} {self.version}"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelCard:
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def bundled_models() -> dict[str, Path]:
    """Names and paths of the model files shipped with the engine."""
    if not BUNDLED_DIR.is_dir():
        return {}
    return {p.stem: p for p in sorted(BUNDLED_DIR.glob("*.safetensors"))}


def resolve_model(spec: str | os.PathLike) -> Path:
    """Turn a model name (bundled) or path into an existing file path.

    Raises:
        InputError: no bundled model has that name and no file exists at that path.
    """
    text = str(spec)
    bundled = bundled_models()
    if text in bundled:
        return bundled[text]
    path = Path(text).expanduser()
    if path.is_file():
        return path
    names = ", ".join(bundled) or "none installed"
    if path.suffix or os.sep in text:
        raise InputError(f"{text}: model file not found (bundled models: {names})")
    raise InputError(f"{text}: unknown model name (bundled models: {names})")


def read_card(spec: str | os.PathLike) -> ModelCard:
    """Read only the model card of a model file (cheap: no weights are loaded).

    Raises:
        InputError: the file is missing, is not a safetensors file, or has no valid model card.
    """
    path = resolve_model(spec)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"{path}: not a valid model file ({_first_line(exc)})") from None
    if CARD_KEY not in meta:
        raise InputError(f"{path}: model file has no model card (was it written by rs-train?)")
    try:
        return ModelCard.from_json(meta[CARD_KEY])
    except (ValueError, TypeError, KeyError) as exc:
        raise InputError(f"{path}: model card is invalid ({_first_line(exc)})") from None


def load_state(
    spec: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], ModelCard]:
    """Read weights (as stored, fp16 or fp32) and card.

    Raises:
        InputError: as :func:`read_card`, or the tensor data is corrupt.
    """
    card = read_card(spec)
    path = resolve_model(spec)
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

    fp16-stored weights are cast to float32 for CPU inference.

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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
