"""The model list: bundled models and the user's model files, with their cards, from ``rs-engine models --json``.

The plugin never reads model files itself (only the engine does, DESIGN.md): it asks the engine for the cards.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from qgis.core import Qgis
from qgis.PyQt.QtCore import QObject, pyqtSignal

from .engine import EngineJob, EngineResult, log
from .settings import user_models


@dataclass(frozen=True)
class ModelInfo:
    """One model as the dock shows it. ``key``: what ``--model`` takes (a bundled name or a file path)."""

    key: str
    name: str
    path: str
    bundled: bool
    class_names: tuple[str, ...] = ()
    bands: int = 3
    gsd: float | None = None  # m/px the model was trained at; None: any
    tile_size: int = 512
    overlap: int = 128
    score_threshold: float = 0.5
    version: str = ""
    card: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @classmethod
    def from_entry(cls, entry: dict[str, Any], bundled: bool) -> ModelInfo:
        """From one item of ``rs-engine models --json``: ``{"name", "path", "card": {...}}``."""
        card = entry.get("card") or {}
        return cls(
            key=entry["name"] if bundled else entry["path"],
            name=str(card.get("name") or entry["name"]),
            path=str(entry["path"]),
            bundled=bundled,
            class_names=tuple(card.get("class_names") or ()),
            bands=int(card.get("bands") or 3),
            gsd=float(card["gsd"]) if card.get("gsd") else None,
            tile_size=int(card.get("tile_size") or 512),
            overlap=int(card.get("overlap") or 0),
            score_threshold=float(card.get("score_threshold") or 0.5),
            version=str(card.get("version") or ""),
            card=card,
        )

    def label(self) -> str:
        """Text for the model combo box."""
        return self.name if self.bundled else f"{self.name} ({os.path.basename(self.path)})"

    def summary(self) -> str:
        """One paragraph: classes, bands, GSD, tile size."""
        gsd = f"{self.gsd:g} m/px" if self.gsd else "any"
        where = "bundled" if self.bundled else self.path
        return (f"{self.name} {self.version} ({where})\nclasses: {', '.join(self.class_names) or '?'}\n"
                f"{self.bands} band(s), GSD {gsd}, tile {self.tile_size} px\n"
                f"overlap {self.overlap} px, score threshold {self.score_threshold:g}")


class ModelError(ValueError):
    """The engine could not describe a model (unknown name, missing or invalid file), with its message."""


def parse_models(stdout: str) -> list[ModelInfo]:
    """The models of ``rs-engine models --json`` output (user files are listed with name == path).

    Raises:
        ModelError: the output is not that JSON.
    """
    try:
        entries = json.loads(stdout)
        return [ModelInfo.from_entry(e, bundled=e.get("name") != e.get("path")) for e in entries]
    except (ValueError, TypeError, KeyError, AttributeError):
        raise ModelError("rs-engine models --json printed no model list") from None


def describe_model(key: str, feedback: Any = None) -> ModelInfo:
    """The card of one model (a bundled name or a file path), from the engine, blocking (for Processing: the
    dock keeps a :class:`ModelCatalog`). ``feedback`` (QgsFeedback) cancels it.

    Raises:
        ModelError: the engine's message (e.g. "model file not found"), or cancelled.
    """
    job = EngineJob("rs-engine", ["models", "--json", key], jsonl=False)
    if job.start():
        job.wait(feedback)
    result = job.result
    job.deleteLater()
    if not result.ok:
        raise ModelError(result.message)
    models = parse_models(result.stdout)
    if not models:
        raise ModelError(f"{key}: the engine did not describe it")
    return models[-1]  # the bundled models, then the one asked for


class ModelCatalog(QObject):
    """Asks the engine for the model cards (asynchronously) and keeps them. ``changed`` after each refresh;
    ``failed(str)`` with the engine's message when it could not list them."""

    changed = pyqtSignal()
    failed = pyqtSignal(str)

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.models: list[ModelInfo] = []
        self._job: EngineJob | None = None
        self._asked: list[str] = []

    def refresh(self, paths: list[str] | None = None) -> None:
        """List bundled models + ``paths`` (default: the user models in the settings that still exist)."""
        if self._job is not None:  # a listing still running is superseded
            old, self._job = self._job, None
            old.jobFinished.disconnect()
            if old.is_running():
                old.kill()
                old.wait(timeout_s=5)
            old.deleteLater()
        self._asked = [p for p in (user_models() if paths is None else paths) if os.path.isfile(p)]
        self._job = EngineJob("rs-engine", ["models", "--json", *self._asked], parent=self, jsonl=False)
        self._job.jobFinished.connect(self._on_finished)
        self._job.start()

    def busy(self) -> bool:
        """True while the engine is being asked."""
        return self._job is not None and self._job.is_running()

    def find(self, key: str) -> ModelInfo | None:
        """The model with this key (bundled name or path), or None."""
        return next((m for m in self.models if m.key == key or m.path == key), None)

    def shutdown(self) -> None:
        """Kill a listing still running (plugin unload)."""
        if self._job is not None and self._job.is_running():
            self._job.kill()
            self._job.wait(timeout_s=5)

    def _on_finished(self, result: EngineResult) -> None:
        if not result.ok:
            if result.cancelled:
                return
            if self._asked:  # one bad user file must not hide the bundled models
                log(f"listing user models failed ({result.message}); listing bundled models only", Qgis.Warning)
                self.refresh([])
                return
            self.failed.emit(result.message)
            return
        try:
            self.models = parse_models(result.stdout)
        except ModelError as exc:
            self.failed.emit(str(exc))
            return
        self.changed.emit()
