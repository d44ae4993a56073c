"""Crash-safe checkpoint folders and the training state that `--resume` continues from.

A folder (best/, last/, checkpoint/) is written whole into a hidden temporary folder,
every file fsync'ed, then swapped in by renames:

    write .NAME.tmp/  ->  fsync  ->  rename NAME -> .NAME.old  ->  rename .NAME.tmp -> NAME
    ->  fsync the parent  ->  delete .NAME.old

At every moment either NAME or .NAME.old is a complete folder; `recover_folder` (run
before resuming) puts .NAME.old back if a kill fell between the two renames, and clears
temporary leftovers. Left out: checkpoint rotation (one training state is kept).

The training state (checkpoint/training_state.pt, format TRAIN_STATE_VERSION) holds
the step, the optimizer and scheduler states, every process's RNG states, the best
score so far, the metrics and loss history, and the reference signs for the flip
ratio; checkpoint/model.safetensors holds the model's state dict.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from .errors import BibertError

TRAIN_STATE_VERSION = 1
STATE_DIR = "checkpoint"
STATE_FILE = "training_state.pt"
MODEL_FILE = "model.safetensors"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            _fsync(Path(root) / name)
        _fsync(Path(root))


def write_folder_atomically(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call write(tmp_folder), then make tmp_folder appear as `path` in one rename."""
    path = Path(path)
    tmp, old = path.parent / f".{path.name}.tmp", path.parent / f".{path.name}.old"
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write(tmp)
    _fsync_tree(tmp)
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(path, old)
    os.rename(tmp, path)
    _fsync(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def recover_folder(path: str | os.PathLike) -> None:
    """Undo what a kill in the middle of `write_folder_atomically` left behind."""
    path = Path(path)
    tmp, old = path.parent / f".{path.name}.tmp", path.parent / f".{path.name}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    if old.exists():
        if path.exists():
            shutil.rmtree(old)
        else:
            os.rename(old, path)


def save_training_state(out: Path, model: torch.nn.Module, state: dict) -> None:
    """Atomically write out/checkpoint/ (model weights + training state)."""

    def write(folder: Path) -> None:
        weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(weights, str(folder / MODEL_FILE), metadata={"format": "pt"})
        torch.save({**state, "version": TRAIN_STATE_VERSION}, folder / STATE_FILE)

    write_folder_atomically(out / STATE_DIR, write)


def load_training_state(out: Path, model: torch.nn.Module) -> dict | None:
    """Load out/checkpoint/ into `model` and return the training state (None if none yet).
    Run `recover_folder(out / STATE_DIR)` first (once, in one process)."""
    folder = Path(out) / STATE_DIR
    if not folder.exists():
        return None
    try:
        state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
        weights = load_file(str(folder / MODEL_FILE))
    except Exception as exc:  # torch / safetensors raise many types for damaged files
        raise BibertError(f"cannot read the training state in {folder} ({exc}); it is damaged") from None
    if state.get("version", 0) > TRAIN_STATE_VERSION:
        raise BibertError(f"{folder} was written by a newer bibert (training state version "
                          f"{state.get('version')}); upgrade bibert")
    model.load_state_dict(weights)
    return state
