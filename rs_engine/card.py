"""The model card, and finding model files: torch-free, so the light engine (ONNX Runtime) reads them too.

A model exists in two forms with the same card:

* ``NAME.safetensors``: weights + card (JSON under the metadata key ``"model_card"``); what PyTorch loads and
  ``rs-train`` writes (:mod:`rs_engine.checkpoint`).
* ``NAME.onnx``: the whole network as an ONNX graph (``rs-engine export``), the card under the same key in the
  graph's ``metadata_props``; what ONNX Runtime runs (:mod:`rs_engine.runtime`).

Bundled models live in ``rs_engine/weights/`` in both forms and are addressed by name (``nwpu10``,
``ssdd-ship``); any other model is addressed by path.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rs_engine.errors import InputError

BUNDLED_DIR = Path(__file__).resolve().parent / "weights"
CARD_KEY = "model_card"
FORMAT_VERSION = 1
#: Model file suffixes, in order of preference for a bundled name when the runtime doesn't decide.
MODEL_SUFFIXES = (".safetensors", ".onnx")


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


def bundled_models(suffix: str | None = None) -> dict[str, Path]:
    """Names and paths of the model files shipped with the engine.

    Args:
        suffix: ``".safetensors"`` or ``".onnx"``: that form only; None: each name once, in the first form of
            :data:`MODEL_SUFFIXES` present.
    """
    if not BUNDLED_DIR.is_dir():
        return {}
    found: dict[str, Path] = {}
    for suf in (suffix,) if suffix else MODEL_SUFFIXES:
        for p in sorted(BUNDLED_DIR.glob(f"*{suf}")):
            found.setdefault(p.stem, p)
    return dict(sorted(found.items()))


def resolve_model(spec: str | os.PathLike, suffix: str | None = None) -> Path:
    """Turn a model name (bundled) or path into an existing file path.

    Args:
        suffix: for a bundled name, the form wanted (``".safetensors"`` or ``".onnx"``); None: either.

    Raises:
        InputError: no bundled model has that name (in that form) and no file exists at that path.
    """
    text = str(spec)
    bundled = bundled_models(suffix)
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
    """Read only the model card of a model file (``.safetensors``: cheap, no weights are loaded; ``.onnx``: its
    metadata, :func:`_onnx_metadata`).

    Raises:
        InputError: the file is missing, is not a model file, or has no valid model card.
    """
    path = resolve_model(spec)
    meta = _onnx_metadata(path) if path.suffix.lower() == ".onnx" else _safetensors_metadata(path)
    if CARD_KEY not in meta:
        raise InputError(f"{path}: model file has no model card (was it written by rs-train?)")
    try:
        return ModelCard.from_json(meta[CARD_KEY])
    except (ValueError, TypeError, KeyError) as exc:
        raise InputError(f"{path}: model card is invalid ({_first_line(exc)})") from None


def _safetensors_metadata(path: Path) -> dict[str, str]:
    """The string metadata of a safetensors file, read from its JSON header (no tensor is read).

    The header is the format's first 8 bytes (little-endian length) then that much JSON, so no library (and no
    PyTorch) is needed for it: the light engine can list every model file.
    """
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 2 <= size <= 100_000_000:
                raise ValueError("no safetensors header")
            header = json.loads(f.read(size))
        meta = header.get("__metadata__") or {}
        if not isinstance(meta, dict):
            raise ValueError("metadata is not a mapping")
        return meta
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a valid model file ({_first_line(exc)})") from None


def _onnx_metadata(path: Path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file: read by the ``onnx`` package where installed (35 ms for ``nwpu10``);
    in the light engine, which has no ``onnx``, by an ONNX Runtime session, kept for the run that follows. Why not
    always the session: it costs 0.9 s and 85 MB of RSS, wasted when OpenVINO runs the model."""
    try:
        import onnx
    except ImportError:
        from rs_engine.runtime import onnx_session

        return onnx_session(path).get_modelmeta().custom_metadata_map
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError, onnx's own errors, OSError
        raise InputError(f"{path}: not a valid ONNX model ({_first_line(exc)})") from None
    return {p.key: p.value for p in model.metadata_props}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
