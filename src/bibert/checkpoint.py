"""What a model folder and a training run hold on disk, and how every file is written.

This module owns the names and versions of everything bibert writes outside the packed
format (bibert.packed.reader has its own): a model folder, a run's output folder, and the
training state that `--resume` continues from.

A model folder (`save_pretrained`, best/ and last/ of a run):

    config.json        the Hugging Face BertConfig, plus for a BiBERT student
                       "bibert_format_version" (MODEL_FORMAT_VERSION) and "quantization"
    model.safetensors  the weights (a student's latent full-precision ones)
    tokenizer files    (written by the tokenizer's own save_pretrained)

A run's output folder: config.json (the run's TrainConfig), metrics.jsonl (one line per
evaluation), results.json, calibration.json (elastic students), training_curves.png,
best/ and last/ (model folders) and checkpoint/ (the training state).

Every file is written whole to a temporary name in its folder, fsync'ed and renamed over
the old one (`atomic_write`), so a crash leaves the old file or the new one, never half
of one. A folder (best/, last/, checkpoint/) is written the same way as a whole:

    write .NAME.tmp/  ->  fsync  ->  rename NAME -> .NAME.old  ->  rename .NAME.tmp -> NAME
    ->  fsync the parent  ->  delete .NAME.old

At every moment either NAME or .NAME.old is a complete folder; `recover_folder` (run
before resuming) puts .NAME.old back if a kill fell between the two renames, and clears
temporary leftovers. Left out: checkpoint rotation (one training state is kept).

Each folder written whole also holds manifest.json (MANIFEST_VERSION): the size and
SHA-256 of every other file in it, written inside .NAME.tmp/ so that it appears with the
files it describes. `verify_folder` checks it where weights are read back (resume,
export, loading a model folder) and names the first damaged or missing file; a folder
without one (written by an older bibert, or not by bibert) is read unchecked. Files
added later (evaluate's eval_*.json) are not listed and not checked. The weights are
also checked for NaN and Inf after a resume and before an export (`check_finite`).

The training state (checkpoint/training_state.pt, format TRAIN_STATE_VERSION) holds
the step, the optimizer and scheduler states, every process's RNG states, the best
score so far, the metrics and loss history, and the reference signs for the flip
ratio; checkpoint/model.safetensors holds the model's state dict.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .errors import BibertError

if TYPE_CHECKING:  # torch is imported where the training state is written or read: the rest stays light
    import torch

# a model folder
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MODEL_FORMAT_KEY = "bibert_format_version"  # in config.json: present only in a BiBERT student's
MODEL_FORMAT_VERSION = 1  # the newest BiBERT model folder this bibert reads and writes
QUANTIZATION_KEY = "quantization"  # in config.json: the student's QuantConfig.to_dict()

# a run's output folder
RUN_CONFIG_NAME = CONFIG_NAME  # the run's TrainConfig.to_dict()
METRICS_NAME = "metrics.jsonl"
RESULTS_NAME = "results.json"
CALIBRATION_NAME = "calibration.json"
CURVES_NAME = "training_curves.png"
BEST_DIR, LAST_DIR = "best", "last"

# the training state
TRAIN_STATE_VERSION = 1
STATE_DIR = "checkpoint"
STATE_FILE = "training_state.pt"

# in every folder written whole: {"bibert_manifest_version": 1, "files": {path: {"bytes", "sha256"}}}
MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
MANIFEST_KEY = "bibert_manifest_version"


# ------------------------------------------------------------------------------ files

def _fsync(path: Path | str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call write(tmp) with a temporary path in `path`'s folder (same suffix, so that writers
    that add one, like numpy's savez, keep it), fsync it and rename it to `path`. The file
    gets the usual permissions (0666 less the umask), also from writers that make private
    files (safetensors' save_file)."""
    path = Path(path)
    tmp = str(path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp{path.suffix}"))
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it back at once
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a UTF-8 text file atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, obj, **dumps) -> None:
    """Write `obj` as indented JSON (and a final newline) atomically."""
    write_text(path, json.dumps(obj, **{"indent": 2, **dumps}) + "\n")


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> None:
    """Write one JSON object per line atomically."""
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def append_jsonl(path: str | os.PathLike, row: dict) -> None:
    """Append one JSON line (a log: a crash may lose the last line, never an earlier one)."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def read_json(path: str | os.PathLike):
    """A JSON file, with a clear error when it is not valid JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BibertError(f"{path} is not valid JSON ({exc})") from None


def read_json_if_exists(path: str | os.PathLike):
    """A JSON file, or None where there is none."""
    return read_json(path) if Path(path).is_file() else None


# ----------------------------------------------------------------------- model folders

def read_config(directory: str | os.PathLike) -> dict:
    """config.json of a model folder, with clear errors for a wrong path or file."""
    directory = Path(directory)
    if not directory.is_dir():
        raise BibertError(f"model folder {directory} does not exist")
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise BibertError(f"no model here: {directory} has no {CONFIG_NAME} (a model folder holds "
                          f"{CONFIG_NAME}, the weights and the tokenizer)")
    try:
        return read_json(path)
    except BibertError:
        verify_folder(directory, model_folder_advice(directory))  # a damaged file is named as such
        raise


def is_student_config(config: dict) -> bool:
    """Whether a model folder's config.json is a BiBERT student's (else a Hugging Face model's)."""
    return MODEL_FORMAT_KEY in config


def is_student_folder(directory: str | os.PathLike) -> bool:
    """Whether `directory` holds a BiBERT student (raises BibertError if it holds no model)."""
    return is_student_config(read_config(directory))


def model_labels(model: str | os.PathLike) -> tuple[list[str] | None, bool | None]:
    """(label names, regression) a model folder's head stands for: (None, True) for a
    regressor (one output), (names, None) for a classifier with names of its own in
    id2label, (None, None) otherwise (generic LABEL_i names, no head, or not a folder)."""
    if not os.path.isdir(model):
        return None, None
    config = read_config(model)
    id2label = config.get("id2label") or {}
    names = [str(id2label[k]) for k in sorted(id2label, key=int)]
    if config.get("num_labels", len(names)) == 1 or len(names) == 1:
        return None, True
    generic = all(n == f"LABEL_{i}" for i, n in enumerate(names))
    return (None if generic else names), None


def student_config(config: dict, quant: dict) -> dict:
    """A student's config.json: the BertConfig dict with the format version and quantization."""
    return {**config, MODEL_FORMAT_KEY: MODEL_FORMAT_VERSION, QUANTIZATION_KEY: quant}


def split_student_config(config: dict, where: str | os.PathLike) -> tuple[dict, dict]:
    """(BertConfig dict, quantization dict) of a student's config.json; checks the version."""
    config = dict(config)
    version = config.pop(MODEL_FORMAT_KEY)
    if not isinstance(version, int) or version > MODEL_FORMAT_VERSION:
        raise BibertError(f"{where} was written in bibert format version {version}; this bibert reads up to"
                          f" {MODEL_FORMAT_VERSION}: upgrade bibert")
    return config, config.pop(QUANTIZATION_KEY)


# ---------------------------------------------------------------------- folders whole

def _fsync_tree(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            _fsync(Path(root) / name)
        _fsync(Path(root))


def write_folder_atomically(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call write(tmp_folder), add its manifest, then make tmp_folder appear as `path` in
    one rename."""
    path = Path(path)
    tmp, old = path.parent / f".{path.name}.tmp", path.parent / f".{path.name}.old"
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write(tmp)
    write_manifest(tmp)
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


# ------------------------------------------------------------------------- integrity

def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: str | os.PathLike) -> None:
    """Write folder/manifest.json: the size and SHA-256 of every other file under `folder`."""
    folder = Path(folder)
    files = {}
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        for name in sorted(names):
            path = Path(root) / name
            rel = path.relative_to(folder).as_posix()
            if rel != MANIFEST_NAME:
                files[rel] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    write_json(folder / MANIFEST_NAME, {MANIFEST_KEY: MANIFEST_VERSION, "files": files})


def verify_folder(folder: str | os.PathLike, advice: str) -> bool:
    """Check every file folder/manifest.json lists (size, then SHA-256); raise a BibertError
    naming the first damaged or missing one, followed by `advice` (what to do instead).
    False where the folder has no manifest (an older bibert's, or not bibert's): unchecked."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        return False
    try:
        manifest = json.loads(manifest_path.read_bytes())
        files = manifest["files"]
        version = manifest[MANIFEST_KEY]
        entries = [(rel, int(e["bytes"]), str(e["sha256"])) for rel, e in files.items()]
    except (ValueError, TypeError, KeyError, AttributeError):
        raise BibertError(f"{manifest_path} is damaged (it does not list the folder's checksums); {advice}") from None
    if not isinstance(version, int) or version > MANIFEST_VERSION:
        raise BibertError(f"{manifest_path} has version {version!r}; this bibert reads up to {MANIFEST_VERSION}: "
                          "upgrade bibert")
    for rel, size, sha256 in entries:
        path = folder / rel
        if not path.is_file():
            raise BibertError(f"{path} is missing (the folder's manifest lists it); {advice}")
        if path.stat().st_size != size or _sha256(path) != sha256:
            raise BibertError(f"{path} is damaged: its SHA-256 differs from the one written with it in "
                              f"{MANIFEST_NAME}; {advice}")
    return True


def model_folder_advice(folder: str | os.PathLike) -> str:
    """What to do about a damaged model folder (the tail of verify_folder's message)."""
    return (f"use another copy of the model (a run's best/ or last/, a backup) or train it again; if you "
            f"changed the file on purpose, delete {Path(folder) / MANIFEST_NAME} to accept the folder as it is")


def check_finite(tensors: dict, where: str | os.PathLike, advice: str) -> None:
    """Raise a BibertError naming the first floating-point tensor that holds NaN or Inf."""
    import torch

    for name, tensor in tensors.items():
        if tensor.is_floating_point():
            finite = torch.isfinite(tensor)
            if not bool(finite.all()):
                nan = int(torch.isnan(tensor).sum())
                inf = int((~finite).sum()) - nan
                what = " and ".join(f"{n} {kind}" for n, kind in ((nan, "NaN"), (inf, "infinite")) if n)
                raise BibertError(f"{where}: tensor {name} holds {what} value(s); {advice}")


def _first_line(exc: BaseException) -> str:
    """An exception's message in one short line (torch explains weights_only at length)."""
    line = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
    return line if len(line) <= 160 else line[:157] + "..."


# ----------------------------------------------------------------------- training state

def save_training_state(out: Path, model: torch.nn.Module, state: dict) -> None:
    """Atomically write out/checkpoint/ (model weights + training state)."""
    import torch
    from safetensors.torch import save_file

    def write(folder: Path) -> None:
        weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(weights, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
        torch.save({**state, "version": TRAIN_STATE_VERSION}, folder / STATE_FILE)

    write_folder_atomically(out / STATE_DIR, write)


def resume_advice(out: str | os.PathLike) -> str:
    """What to do about a damaged training state (the tail of the resume errors)."""
    return (f"the checkpoint cannot be resumed: resume from an earlier copy of {out} if you have one, or start the "
            "run again in a new --out (without --resume)")


def load_training_state(out: Path, model: torch.nn.Module) -> dict | None:
    """Load out/checkpoint/ into `model` and return the training state (None if none yet),
    after checking the folder's manifest and that every weight is finite.
    Run `recover_folder(out / STATE_DIR)` first (once, in one process)."""
    import torch
    from safetensors.torch import load_file

    folder = Path(out) / STATE_DIR
    if not folder.exists():
        return None
    advice = resume_advice(out)
    verify_folder(folder, advice)
    for name in (STATE_FILE, WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise BibertError(f"{folder / name} is missing; {advice}")
    try:
        state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for damaged files
        raise BibertError(f"{folder / STATE_FILE} is damaged ({_first_line(exc)}); {advice}") from None
    try:
        weights = load_file(str(folder / WEIGHTS_NAME))
    except Exception as exc:  # safetensors raises its own error types
        raise BibertError(f"{folder / WEIGHTS_NAME} is damaged ({_first_line(exc)}); {advice}") from None
    if not isinstance(state, dict):
        raise BibertError(f"{folder / STATE_FILE} is damaged (it holds no training state); {advice}")
    if state.get("version", 0) > TRAIN_STATE_VERSION:
        raise BibertError(f"{folder} was written by a newer bibert (training state version "
                          f"{state.get('version')}); upgrade bibert")
    check_finite(weights, folder / WEIGHTS_NAME, advice)
    model.load_state_dict(weights)
    return state
