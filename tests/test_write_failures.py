"""Writes the file system refuses, on real file systems: a small tmpfs that fills up, one mounted or remounted
read-only, the output folder removed mid-run.

``rs-engine segment`` and ``rs-train`` must then say in one line which folder and why (exit 2, no traceback),
leave nothing at the output path and no temporary file, and never damage what was there before (a previous
output under ``--overwrite``, the previous resume file of a training run).

Mounting needs root (CAP_SYS_ADMIN); without it the tmpfs tests skip with the reason. Every mount is undone in
the fixture's teardown, whatever the test did.
"""

from __future__ import annotations

import errno
import importlib
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine
from safetensors import SafetensorError
from torch import nn

from rs_engine.checkpoint import ModelCard, read_card, save_model
from rs_engine.errors import InputError
from rs_engine.gpkg import GpkgWriter

TESTS = Path(__file__).resolve().parent
CLASS1 = 100  # the pixel value conftest's LabelPredictor sees as a class 1 object

#: ``rs-engine ARGS`` in a new process, as a user runs it, with the network swapped for conftest's stand-in predictor
#: (one instance per blob) so that a run takes seconds; everything else (CLI, checks, merge, GeoPackage writing,
#: messages, logging set-up) is the real code.
ENGINE = f"""
import importlib, sys, types
sys.path.insert(0, {str(TESTS)!r})
from conftest import LabelPredictor
from rs_engine.checkpoint import read_card
from rs_engine.cli import main

class Predictor(LabelPredictor):
    def set_score_threshold(self, threshold):
        pass

# the module (rs_engine.pipeline the attribute may be the function of that name)
importlib.import_module("rs_engine.pipeline").load_predictor = lambda spec, *a: (Predictor(), read_card(spec))
sys.exit(main(sys.argv[1:]))
"""


def engine(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", ENGINE, *map(str, args)], capture_output=True, text=True,
                          timeout=120)  # fmt: skip


@pytest.fixture
def engine_here(monkeypatch, capsys, caplog, label_predictor) -> Callable[..., tuple[int, str, str]]:
    """``engine_here(*args, before_batch=None) -> (exit code, stderr, stdout)``: ``rs-engine ARGS`` in this process
    (no new interpreter's imports to pay), the network swapped as in :data:`ENGINE`; ``before_batch(k)`` runs
    before the k-th batch is predicted (k = 0, 1, ...). Nothing may be logged at WARNING or above (the CLI would
    print it on stderr)."""
    from rs_engine.cli import main

    def run(*args: object, before_batch: Callable[[int], None] | None = None) -> tuple[int, str, str]:
        class Predictor(label_predictor):
            def set_score_threshold(self, threshold):  # noqa: ANN001, ANN202
                pass

            def __call__(self, images):  # noqa: ANN001, ANN204
                if before_batch is not None:
                    before_batch(self.calls)
                return super().__call__(images)

        module = importlib.import_module("rs_engine.pipeline")  # the module, not the function of the same name
        monkeypatch.setattr(module, "load_predictor", lambda spec, *a: (Predictor(), read_card(spec)))
        capsys.readouterr()
        caplog.clear()
        code = main([*map(str, args), "--progress", "none"])
        captured = capsys.readouterr()
        logged = [f"{r.levelname} {r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.WARNING]
        assert not logged, logged
        return code, captured.err, captured.out

    return run


def one_error_line(r: subprocess.CompletedProcess | tuple[int, str], program: str = "rs-engine") -> str:
    """The run's exit code is 2 and its stderr one line without a traceback; returns the message."""
    code, stderr = (r.returncode, r.stderr) if isinstance(r, subprocess.CompletedProcess) else r
    assert code == 2, (code, stderr)
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"{program}: error: "), lines[0]
    return lines[0].removeprefix(f"{program}: error: ")


# ------------------------------------------------------------------------------------------------ fixtures


def _umount(path: Path) -> None:
    if os.path.ismount(path):
        r = subprocess.run(["umount", str(path)], capture_output=True, text=True)
        if r.returncode != 0:  # still busy: detach it now, it goes when the last user does
            subprocess.run(["umount", "-l", str(path)], capture_output=True, text=True)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """``small_fs(size="256k", ro=False) -> folder``: a tmpfs of that size mounted on a new folder; unmounted
    at teardown even when the test fails. Skips where mounting is not permitted."""
    mounts: list[Path] = []

    def mount(size: str = "256k", ro: bool = False) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN); these tests run as an ordinary user")
        folder = tmp_path / f"fs{len(mounts)}"
        folder.mkdir()
        options = f"size={size}" + (",ro" if ro else "")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True,
                           text=True)  # fmt: skip
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (no CAP_SYS_ADMIN?): {r.stderr.strip()}")
        mounts.append(folder)
        return folder

    try:
        yield mount
    finally:
        for folder in reversed(mounts):
            subprocess.run(["mount", "-o", "remount,rw", str(folder)], capture_output=True)
            _umount(folder)
        assert not [m for m in mounts if os.path.ismount(m)], "a tmpfs is still mounted"


def fill(folder: Path, leave: int = 0) -> None:
    """Write a filler file into ``folder`` until the file system is full but for about ``leave`` bytes."""
    with open(folder / "filler", "wb", buffering=0) as fh:
        chunk = b"\0" * 4096
        try:
            while os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize > leave:
                fh.write(chunk)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc


@pytest.fixture(scope="module")
def card_file(tmp_path_factory) -> Path:
    """A model file whose card the runs use (1 band, 128 px tiles); its network is the stand-in predictor."""
    card = ModelCard(name="writes", version="0", architecture={}, class_names=["building", "tank"], bands=1,
                     mean=[0.0], std=[1.0], tile_size=128, overlap=16, score_threshold=0.5)  # fmt: skip
    return save_model(tmp_path_factory.mktemp("model") / "m.safetensors", nn.Linear(1, 1), card)


def blob_raster(path: Path, size: int = 320, blobs: bool = True) -> Path:
    """A 1-band raster of 4 x 4 px objects every 8 px: 1600 instances (about 500 KB of GeoPackage) at 320 px."""
    data = np.full((size, size), 10, np.uint8)
    if blobs:
        for r in range(2, size - 4, 8):
            for c in range(2, size - 4, 8):
                data[r : r + 4, c : c + 4] = CLASS1
    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=1, dtype="uint8",
                       crs="EPSG:32616", transform=Affine(0.5, 0, 500_000, 0, -0.5, 4_000_000)) as ds:  # fmt: skip
        ds.write(data[None])
    return path


@pytest.fixture
def raster(tmp_path: Path) -> Path:
    return blob_raster(tmp_path / "blobs.tif")


def leftovers(folder: Path) -> list[str]:
    """Temporary or SQLite side files of a run in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name or p.name.endswith(("-journal", "-wal")))


# ------------------------------------------------------------------------------------------------ rs-engine


def test_segment_onto_a_disk_that_fills_up(small_fs, raster, card_file) -> None:
    """The run fills a 256 KB tmpfs with polygons: one line naming the folder and "no space left", exit 2,
    nothing at OUT and no temporary file (before: a 28-line pyogrio traceback, exit 1); with ``--progress jsonl``
    the last event on stdout is the same message."""
    mnt = small_fs("256k")
    out = mnt / "out.gpkg"
    r = engine("segment", raster, "-o", out, "--model", card_file, "--progress", "jsonl")
    message = one_error_line(r)
    assert message == f"{mnt}: no space left on device while writing out.gpkg"
    assert json.loads(r.stdout.splitlines()[-1]) == {"event": "error", "message": message}
    assert not out.exists()
    assert os.listdir(mnt) == []


def test_full_disk_leaves_the_previous_output_intact(small_fs, raster, card_file, engine_here) -> None:
    """With --overwrite, a run that fails on a full disk keeps the previous OUT byte for byte."""
    mnt = small_fs("256k")
    out = mnt / "out.gpkg"
    previous = GpkgWriter(out, None)
    previous.create()
    before = out.read_bytes()
    code, err, _ = engine_here("segment", raster, "-o", out, "--model", card_file, "--overwrite")
    assert one_error_line((code, err)) == f"{mnt}: no space left on device while writing out.gpkg"
    assert out.read_bytes() == before
    assert os.listdir(mnt) == ["out.gpkg"]


def test_a_full_disk_is_noticed_when_gdal_says_nothing(small_fs, tmp_path, card_file, engine_here) -> None:
    """On a disk already full GDAL "creates" a GeoPackage without its tables and reports no error; a run without
    objects then renamed that broken file onto OUT and exited 0. Now the file is read back: exit 2, no OUT."""
    mnt = small_fs("256k")
    fill(mnt, leave=48 * 1024)
    empty = blob_raster(tmp_path / "empty.tif", size=128, blobs=False)
    out = mnt / "out.gpkg"
    code, err, _ = engine_here("segment", empty, "-o", out, "--model", card_file)
    assert one_error_line((code, err)) == f"{mnt}: no space left on device while writing out.gpkg"
    assert not out.exists()
    assert os.listdir(mnt) == ["filler"]


def test_read_only_file_system(small_fs, raster, card_file, engine_here) -> None:
    """A folder on a read-only file system is refused before anything runs (one line, exit 2, nothing written)."""
    mnt = small_fs("256k", ro=True)
    out = mnt / "out.gpkg"
    message = one_error_line(engine_here("segment", raster, "-o", out, "--model", card_file)[:2])
    assert str(mnt) in message and ("read-only" in message or "not writable" in message), message
    assert os.listdir(mnt) == []


def test_file_system_remounted_read_only_mid_run(small_fs, raster, card_file, engine_here) -> None:
    """Remounted read-only after the first batch: one line naming the folder and "read-only file system", exit 2,
    nothing at OUT. The temporary file cannot be removed from a read-only file system: the line says where it is."""
    mnt = small_fs("64m")
    out = mnt / "out.gpkg"

    def remount(k: int) -> None:
        if k == 1:
            subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)

    code, err, _ = engine_here("segment", raster, "-o", out, "--model", card_file, before_batch=remount)
    message = one_error_line((code, err))
    assert message.startswith(f"{mnt}: read-only file system while writing out.gpkg"), message
    assert not out.exists()
    left = leftovers(mnt)
    assert len(left) <= 1 and all(name in message for name in left), (left, message)


@pytest.mark.parametrize("action", ["rmtree", "rmtree-mkdir"])
def test_output_folder_removed_mid_run(tmp_path, raster, card_file, engine_here, action) -> None:
    """The output folder removed after the first batch (or removed and made again, empty): one line naming the
    folder, exit 2, nothing at OUT and no temporary file."""
    folder = tmp_path / "results"
    folder.mkdir()
    out = folder / "out.gpkg"

    def remove(k: int) -> None:
        if k == 1:
            shutil.rmtree(folder)
            if action == "rmtree-mkdir":
                folder.mkdir()

    code, err, _ = engine_here("segment", raster, "-o", out, "--model", card_file, before_batch=remove)
    message = one_error_line((code, err))
    assert message.startswith(f"{folder}: "), message
    if action == "rmtree":
        assert message == f"{folder}: folder was removed while writing out.gpkg"
        assert not folder.exists()
    else:
        assert "out.gpkg" in message
        assert os.listdir(folder) == []


# ------------------------------------------------------------------------------------------------ the cause


def test_write_error_names_the_cause(tmp_path) -> None:
    """Causes that a tmpfs can't show a root process (permission, quota) and errors that are bugs, not writes."""
    from rs_engine.errors import write_error

    path = tmp_path / "out.gpkg"
    cases = {
        PermissionError(errno.EACCES, "Permission denied"): "permission denied",
        OSError(errno.EDQUOT, "Disk quota exceeded"): "disk quota exceeded",
        SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"):
            "no space left on device",
        RuntimeError("sqlite3_exec(COMMIT) failed: database or disk is full"): "no space left on device",
    }
    for exc, cause in cases.items():
        assert str(write_error(path, exc)) == f"{tmp_path}: {cause} while writing out.gpkg"
    assert str(write_error(tmp_path / "gone" / "m.safetensors", OSError("Failed to commit transaction"))) == (
        f"{tmp_path / 'gone'}: folder was removed while writing m.safetensors")
    # Not a file-system problem and the folder is fine (the test machine has more than 4 MiB free): a bug.
    assert write_error(path, ValueError("could not convert string to float")) is None


# ------------------------------------------------------------------------------------------------ rs-train


def _modules(seed: int) -> tuple[dict[str, nn.Module], torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Linear(64, 64)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 64)).sum().backward()
    opt.step()
    return {"model": model}, opt


def test_save_resume_on_a_full_disk_keeps_the_previous_file(small_fs) -> None:
    """A resume file that no longer fits: InputError in one line naming the folder and the cause; the previous
    resume file is byte-identical afterwards and no temporary file is left."""
    from training.loop import save_resume

    mnt = small_fs("256k")
    path = mnt / "m.resume.safetensors"
    modules, opt = _modules(0)
    save_resume(path, modules, opt, {"epoch": 1, "step": 4})
    before = path.read_bytes()
    fill(mnt)
    modules, opt = _modules(1)
    with pytest.raises(InputError) as info:
        save_resume(path, modules, opt, {"epoch": 2, "step": 8})
    assert str(info.value) == f"{mnt}: no space left on device while writing m.resume.safetensors"
    assert path.read_bytes() == before
    assert leftovers(mnt) == []


def test_model_writers_on_a_full_disk_keep_the_previous_file(small_fs) -> None:
    """The model file (``save_model``, which ``rs-train``'s ``_write_model`` and ``update_card`` use) and the
    backbone file (``save_backbone``): InputError in one line, the previous file unchanged, no temporary file."""
    from training.pretrain import save_backbone

    mnt = small_fs("256k")
    card = ModelCard(name="m", version="0", architecture={}, class_names=["a"], bands=1, mean=[0.0], std=[1.0])
    model = mnt / "m.safetensors"
    backbone = mnt / "b.safetensors"
    save_model(model, nn.Linear(64, 64), card)
    save_backbone(backbone, nn.Linear(64, 64), backbone="ssm_tiny", in_channels=1, method="test")
    before = model.read_bytes(), backbone.read_bytes()
    fill(mnt)
    with pytest.raises(InputError) as info:
        save_model(model, nn.Linear(64, 64), card)
    assert str(info.value) == f"{mnt}: no space left on device while writing m.safetensors"
    with pytest.raises(InputError) as info:
        save_backbone(backbone, nn.Linear(64, 64), backbone="ssm_tiny", in_channels=1, method="test")
    assert str(info.value) == f"{mnt}: no space left on device while writing b.safetensors"
    assert (model.read_bytes(), backbone.read_bytes()) == before
    assert leftovers(mnt) == []


def test_model_writer_on_a_read_only_file_system(small_fs) -> None:
    mnt = small_fs("256k", ro=True)
    card = ModelCard(name="m", version="0", architecture={}, class_names=["a"], bands=1, mean=[0.0], std=[1.0])
    with pytest.raises(InputError) as info:
        save_model(mnt / "m.safetensors", nn.Linear(4, 4), card)
    assert str(info.value) == f"{mnt}: read-only file system while writing m.safetensors"
    with pytest.raises(InputError) as info:
        save_model(mnt / "sub" / "m.safetensors", nn.Linear(4, 4), card)  # the folder it would make
    assert str(info.value) == f"{mnt / 'sub'}: read-only file system while writing m.safetensors"


def test_rs_train_on_a_full_disk_exits_2_and_keeps_the_resume_file(small_fs, tmp_path, capsys) -> None:
    """``rs-train pretrain`` resumed onto a disk that filled up since its last epoch: exit 2, one line naming the
    folder and "no space left"; the resume file and the backbone of the last epoch are left as they were."""
    from training.cli import main

    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        data = np.random.default_rng(i).integers(0, 255, (1, 64, 64)).astype(np.uint8)
        with rasterio.open(images / f"i{i}.tif", "w", driver="GTiff", width=64, height=64, count=1,
                           dtype="uint8") as ds:  # fmt: skip
            ds.write(data)
    mnt = small_fs("128m")
    out = mnt / "b.safetensors"
    args = ["pretrain", "--images", str(images), "--backbone", "heat_tiny", "--bands", "1", "--chip-size", "32",
            "--batch-size", "2", "--workers", "0", "--device", "cpu", "--out", str(out), "--progress", "none"]
    assert main([*args, "--epochs", "1"]) == 0, capsys.readouterr().err
    resume = out.with_suffix(".resume.safetensors")
    before = resume.read_bytes(), out.read_bytes()
    fill(mnt)
    capsys.readouterr()
    code = main([*args, "--epochs", "2"])
    message = one_error_line((code, capsys.readouterr().err), program="rs-train")
    assert message.startswith(f"{mnt}: no space left on device while writing "), message
    assert (resume.read_bytes(), out.read_bytes()) == before
    assert leftovers(mnt) == []
