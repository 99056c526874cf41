"""Command lines of the engine's tools, built from plain values (shared by the dock and the Processing
algorithms, so that both run exactly the same commands). Flags follow DESIGN.md's contracts."""

from __future__ import annotations

import shlex
from collections.abc import Sequence


def segment_args(inputs: Sequence[str], output: str, model: str, *, tile_size: int | None = None,
                 overlap: int | None = None, score_threshold: float | None = None, bands: str = "",
                 device: str = "auto", extent: tuple[float, float, float, float] | None = None,
                 overwrite: bool = True) -> list[str]:
    """``rs-engine segment`` arguments (``--progress jsonl`` included). ``None`` options take the model card's
    value; ``bands``: '1,2,3' style or '' (engine default); ``extent``: MINX, MINY, MAXX, MAXY in the raster's
    CRS."""
    args = ["segment", *inputs, "-o", output, "--model", model, "--device", device or "auto",
            "--progress", "jsonl"]
    if tile_size:
        args += ["--tile-size", str(int(tile_size))]
    if overlap is not None:
        args += ["--overlap", str(int(overlap))]
    if score_threshold is not None:
        args += ["--score-threshold", f"{float(score_threshold):g}"]
    if bands.strip():
        args += ["--bands", bands.replace(" ", "")]
    if extent is not None:
        args += ["--extent", ",".join(repr(float(v)) for v in extent)]
    if overwrite:
        args.append("--overwrite")
    return args


def finetune_args(rasters: Sequence[str], labels: str, class_field: str, base_model: str, output: str, *,
                  epochs: int, aoi: str | None = None, bands: str = "", device: str = "auto",
                  chip_size: int | None = None, chips_per_epoch: int | None = None, batch_size: int | None = None,
                  max_minutes: float | None = None, extra_args: str = "") -> list[str]:
    """``rs-train finetune`` arguments (``--progress jsonl`` included); ``extra_args`` is split like a shell
    would (e.g. ``--lr 1e-4 --freeze-backbone``)."""
    args = ["finetune"]
    for raster in rasters:
        args += ["--raster", raster]
    args += ["--labels", labels, "--class-field", class_field, "--base-model", base_model, "--out", output,
             "--epochs", str(int(epochs)), "--device", device or "auto", "--progress", "jsonl"]
    if aoi:
        args += ["--aoi", aoi]
    if bands.strip():
        args += ["--bands", bands.replace(" ", "")]
    if chip_size:
        args += ["--chip-size", str(int(chip_size))]
    if chips_per_epoch:
        args += ["--chips-per-epoch", str(int(chips_per_epoch))]
    if batch_size:
        args += ["--batch-size", str(int(batch_size))]
    if max_minutes:
        args += ["--max-minutes", f"{float(max_minutes):g}"]
    if extra_args.strip():
        args += shlex.split(extra_args)
    return args


def finetune_percent(event: dict) -> float | None:
    """Overall 0-100 progress of an ``rs-train`` progress event (epochs are 1-based)."""
    try:
        epochs, epoch = max(1, int(event["epochs"])), int(event["epoch"])
        fraction = float(event["done"]) / max(1, int(event["total"]))
    except (KeyError, TypeError, ValueError):
        return None
    return min(100.0, 100.0 * ((epoch - 1) + fraction) / epochs)


def segment_percent(event: dict) -> float | None:
    """0-100 progress of an ``rs-engine`` progress event."""
    try:
        return min(100.0, 100.0 * float(event["done"]) / max(1, int(event["total"])))
    except (KeyError, TypeError, ValueError):
        return None


def describe_epoch(event: dict) -> str:
    """One log line for an ``rs-train`` epoch event: loss, validation mask / box AP, minutes."""
    parts = [f"epoch {event.get('epoch')}", f"loss {event.get('loss')}"]
    if event.get("mask_ap") is not None:
        parts.append(f"validation mask AP {event.get('mask_ap')}")
    if event.get("box_ap") is not None:
        parts.append(f"box AP {event.get('box_ap')}")
    if event.get("minutes") is not None:
        parts.append(f"{event.get('minutes')} min")
    return ", ".join(parts)
