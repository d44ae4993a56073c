"""Packed models as Hugging Face Hub repositories.

A packed model's repository (or any folder) holds three files:

    model.bibert   the packed file itself (docs/packed_format.md)
    config.json    what the model is: bits, quantization, sizes, labels, the file's SHA-256,
                   and where it came from (teacher, task, accuracy, speed) when known
    README.md      a model card: the Hub's YAML metadata (library_name: bibert, tags,
                   base_model, datasets, the accuracy as model-index) and how to run it

`save_pretrained` writes the folder, `push_to_hub` uploads it, and `load_packed` takes a
packed file, such a folder, or a repo id ("user/name", downloaded once into the Hugging Face
cache; HF_ENDPOINT and HF_TOKEN apply as for any Hub library). Only `push_to_hub` and the
download import `huggingface_hub` (pip install 'bibert[hub]').
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from .errors import BibertError

MODEL_FILE = "model.bibert"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
HUB_CONFIG_VERSION = 1
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
# the Hub's names of the offline corpora's datasets (the card's `datasets` metadata)
HUB_DATASETS = {"rotten_tomatoes": "cornell-movie-review-data/rotten_tomatoes", "snli": "stanfordnlp/snli",
                **{t: "nyu-mll/glue" for t in ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli")}}
INSTALL_HINT = "pip install 'bibert[hub]'"


def _hub():
    try:
        import huggingface_hub
    except ImportError:
        raise BibertError(f"the Hugging Face Hub needs huggingface_hub: {INSTALL_HINT}") from None
    return huggingface_hub


# ------------------------------------------------------------------------------ reading


def is_repo_id(name: str) -> bool:
    """"user/name" that is not a path here (a folder of that name wins)."""
    return bool(REPO_ID.fullmatch(name)) and not os.path.exists(name)


def resolve(path: str | os.PathLike, revision: str | None = None) -> Path:
    """The packed file behind `path`: the file itself, a folder's model.bibert (or its one
    .bibert file), or a Hub repo's (downloaded into the Hugging Face cache, or taken from it).
    Anything else is returned unchanged, for the reader to refuse with its own message."""
    p = Path(path)
    if p.is_dir():
        if (p / MODEL_FILE).is_file():
            return p / MODEL_FILE
        found = sorted(p.glob("*.bibert"))
        if len(found) == 1:
            return found[0]
        if found:
            raise BibertError(f"{p} is a folder without {MODEL_FILE} but with {len(found)} packed files: name one")
        return p  # the reader's message: a folder, not a packed file
    if p.exists() or not is_repo_id(str(path)):
        return p
    return Path(download(str(path), revision))


def download(repo_id: str, revision: str | None = None) -> str:
    """A Hub repo's model.bibert in the local Hugging Face cache (downloaded if missing)."""
    hub = _hub()
    from huggingface_hub import errors

    try:
        return hub.hf_hub_download(repo_id, MODEL_FILE, revision=revision, library_name="bibert",
                                   library_version=_version())
    except errors.RepositoryNotFoundError:
        raise BibertError(f"{repo_id} is neither a file or folder here nor a repository on the Hub "
                          f"({hub.constants.ENDPOINT}); a private one needs HF_TOKEN or `hf auth login`") from None
    except errors.RevisionNotFoundError:
        raise BibertError(f"the Hub repository {repo_id} has no revision {revision!r}") from None
    except errors.EntryNotFoundError:
        raise BibertError(f"the Hub repository {repo_id} holds no {MODEL_FILE}: it is not a bibert packed model "
                          "(one is made with `bibert export --push-to-hub`)") from None
    except errors.LocalEntryNotFoundError as exc:
        raise BibertError(f"cannot download {repo_id} from the Hub ({hub.constants.ENDPOINT}) and it is not in "
                          f"the local cache: {_first_line(exc)}; check the network (or HF_ENDPOINT), or give a "
                          "local packed file") from None
    except errors.HfHubHTTPError as exc:
        raise BibertError(f"the Hub refused {repo_id}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _version() -> str:
    from . import __version__

    return __version__


# ------------------------------------------------------------------------------ writing


def provenance(student_dir: str | os.PathLike) -> dict:
    """What a training run's folder says about a student (`out/best` or `out/last`): the
    task, the teacher it was distilled from, and its scores. Empty where unknown."""
    student_dir = Path(student_dir)
    info: dict = {}
    for folder in (student_dir, student_dir.parent):
        run = _json(folder / "config.json")
        if run and run.get("mode") in ("distill", "finetune"):
            info.update(task=run.get("task"), teacher=run.get("model"))
            results = _json(folder / "results.json") or {}
            test = (results.get("test") or {}).get("test") or {}
            dev = (results.get("best") or {}).get("metrics", {}).get("dev") or {}
            if test or dev:
                info["metrics"] = {"test" if test else "dev": test or dev}
            break
    return {k: v for k, v in info.items() if v}


def _json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def measure_speed(model, tokens: int = 128, repeats: int = 20) -> dict:
    """Median milliseconds of one forward of one sequence of `tokens` tokens (batch 1) on this
    CPU, with the model's kernel family and threads."""
    import numpy as np

    from .packed import kernels
    from .packed.tuning import cpu_model

    tokens = min(tokens, model.max_positions)
    rng = np.random.default_rng(0)
    ids = rng.integers(1000 if model.vocab_size > 2000 else 0, model.vocab_size, size=(1, tokens))
    mask = np.ones_like(ids)
    model.forward(ids, mask)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        model.forward(ids, mask)
        times.append(time.perf_counter() - t)
    return {"batch": 1, "tokens": tokens, "median_ms": round(1000 * statistics.median(times), 3),
            "cpu": cpu_model(), "threads": kernels.get_threads(), "kernel": kernels.get_kernel()}


def hub_config(model, file_sha256: str, file_bytes: int, info: dict) -> dict:
    """config.json of a packed model's folder."""
    q = model.quant
    return {
        "library_name": "bibert",
        "bibert_hub_config_version": HUB_CONFIG_VERSION,
        "bibert_version": _version(),
        "model_file": MODEL_FILE,
        "file_sha256": file_sha256,
        "file_bytes": file_bytes,
        "bits": f"1-1-{q.activation_bits}",
        "activations": q.activations,
        "attention": q.attention,
        "layers": model.num_layers,
        "hidden_size": model.hidden,
        "attention_heads": model.heads,
        "intermediate_size": model.intermediate,
        "max_position_embeddings": model.max_positions,
        "vocab_size": model.vocab_size,
        "labels": list(model.labels),
        **{k: info[k] for k in ("task", "teacher", "metrics", "speed") if info.get(k)},
    }


def model_card(config: dict, repo_id: str | None = None) -> str:
    """README.md of a packed model's folder: YAML metadata (JSON values, which YAML reads) and
    a short text with its bits, sizes, labels, scores, speed, and how to run it."""
    task, teacher, metrics, speed = (config.get(k) for k in ("task", "teacher", "metrics", "speed"))
    meta: dict = {"library_name": "bibert", "pipeline_tag": "text-classification",
                  "tags": ["bibert", "binarized", "1-bit", f"w1a{config['bits'][-1]}", "bit-packed", "cpu"],
                  "license": "apache-2.0"}
    if teacher and is_repo_id(str(teacher)):
        meta["base_model"] = teacher
    if task in HUB_DATASETS:
        meta["datasets"] = [HUB_DATASETS[task]]
    if metrics:
        split, values = next(iter(metrics.items()))
        meta["metrics"] = sorted(values)
        meta["model-index"] = [{"name": repo_id or "bibert-model", "results": [{
            "task": {"type": "text-classification", "name": "Text Classification"},
            "dataset": {"name": task or "the training run's data", "type": HUB_DATASETS.get(task, task or "custom"),
                        "split": split},
            "metrics": [{"type": k, "value": round(float(v), 4)} for k, v in sorted(values.items())]}]}]
    header = "\n".join(f"{k}: {json.dumps(v)}" for k, v in meta.items())
    name = repo_id or "a bibert packed model"
    ref = repo_id or "path/to/this/folder"
    lines = [
        "---", header, "---", "",
        f"# {name}", "",
        f"A fully binarized BERT classifier (BiBERT) in bibert's bit-packed format: 1-bit weights and word "
        f"embedding, {config['bits'][-1]}-bit activations ({config['activations']}), {config['attention']} "
        f"attention. It runs on CPUs with bitwise (XOR/popcount) kernels, without PyTorch.", "",
        "| | |", "|---|---|",
        f"| bits (weights-embedding-activations) | {config['bits']} |",
        f"| layers x hidden (heads) | {config['layers']} x {config['hidden_size']} ({config['attention_heads']}) |",
        f"| labels | {', '.join(map(str, config['labels']))} |",
        f"| file | {MODEL_FILE}, {config['file_bytes'] / 2**20:.2f} MiB, SHA-256 {config['file_sha256'][:16]}... |",
    ]
    if task:
        lines.append(f"| task | {task} |")
    if teacher:
        lines.append(f"| distilled from | {teacher} |")
    for split, values in (metrics or {}).items():
        lines.append(f"| {split} | " + ", ".join(f"{k} {100 * float(v):.2f}" for k, v in sorted(values.items())) + " |")
    if speed:
        lines.append(f"| speed | {speed['median_ms']:.2f} ms per sequence of {speed['tokens']} tokens at batch 1, "
                     f"{speed['threads']} thread(s), {speed['kernel']} kernels, on {speed['cpu']} (measured when "
                     "saved) |")
    lines += [
        "", "## How to run", "",
        "```bash", "pip install bibert", f'bibert predict --model {ref} "a sentence to classify"',
        f"bibert serve --model {ref} --port 8000", "```", "",
        "```python", "import bibert", "", f'model = bibert.load_packed("{ref}")',
        'print(model.predict(["a sentence to classify"]).labels)', "```", "",
    ]
    return "\n".join(lines)


def save_pretrained(model, directory: str | os.PathLike, info: dict | None = None, speed: bool = True,
                    repo_id: str | None = None) -> Path:
    """Write `model` (a PackedModel) as a folder: model.bibert, config.json and README.md.
    info: provenance to record (task, teacher, metrics; see `provenance`); speed: measure
    and record the batch-1 latency on this CPU. Returns the folder."""
    source = Path(model.source)
    if not source.is_file():
        raise BibertError(f"{model.source} is not a file any more: load the packed model from its file, then save")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise BibertError(f"{directory} exists and is not a folder: choose a folder to write the model into")
    directory.mkdir(parents=True, exist_ok=True)
    info = dict(info or {})
    if speed and "speed" not in info:
        info["speed"] = measure_speed(model)
    target = directory / MODEL_FILE
    if source.resolve() != target.resolve():
        _atomic_copy(source, target)
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    config = hub_config(model, digest, target.stat().st_size, info)
    _atomic_write(directory / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    _atomic_write(directory / CARD_FILE, model_card(config, repo_id))
    return directory


def push_to_hub(model, repo_id: str, info: dict | None = None, speed: bool = True, private: bool | None = None,
                token: str | None = None, revision: str | None = None,
                commit_message: str = "Upload a bibert packed model") -> str:
    """Upload `model` (a PackedModel) to the Hub repository `repo_id` (created if missing) as
    the folder `save_pretrained` writes. Returns the commit's URL."""
    if not REPO_ID.fullmatch(repo_id):
        raise BibertError(f"{repo_id!r} is not a Hub repo id: give it as user/name or organisation/name")
    hub = _hub()
    from huggingface_hub import errors

    with tempfile.TemporaryDirectory(prefix="bibert-hub-") as tmp:
        save_pretrained(model, tmp, info=info, speed=speed, repo_id=repo_id)
        api = hub.HfApi(token=token, library_name="bibert", library_version=_version())
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            commit = api.upload_folder(repo_id=repo_id, folder_path=tmp, revision=revision,
                                       commit_message=commit_message)
        except errors.HfHubHTTPError as exc:
            raise BibertError(f"the Hub refused the upload to {repo_id}: {_first_line(exc)} (log in with "
                              "`hf auth login` or set HF_TOKEN to a token that can write)") from None
    return str(getattr(commit, "commit_url", commit))


def _atomic_copy(src: Path, dest: Path) -> None:
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dest)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
