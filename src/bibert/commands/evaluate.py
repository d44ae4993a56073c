"""`bibert evaluate`: score a saved model on a task's dev or test split(s), or on a file."""
from __future__ import annotations

from pathlib import Path

from .data import add_source_arguments, source_kwargs, source_task


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="score a saved model on a task's dev or test split, or on a file",
                       description="Run a saved model (teacher, BiBERT student or any Hugging Face "
                       "sequence classifier folder, or a packed file run on the bitwise engine) over a labeled split, or a labeled file of your own (--file, "
                       "read with the model's labels), and print the task's metrics (MNLI: matched and "
                       "mismatched). The metrics are also written as JSON, named after the data source and "
                       "recording it (a file by its path and sha256), so that scores of different data never "
                       "replace each other.")
    p.add_argument("--model", required=True, help="model folder (or `teacher`), or a packed model (a .bibert file, or a "
                   "folder written by save_pretrained)")
    p.add_argument("--task", help="task name, e.g. sst2, mnli, rotten_tomatoes (default: with --file, a task of your "
                   "own data with the model's labels)")
    p.add_argument("--split", default="dev", help="dev (default), test, or a split name such as dev_mismatched")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the model folder)")
    p.add_argument("--max-length", type=int, help="truncation length (default: the task's recipe)")
    p.add_argument("--batch-size", type=int, default=64, help="evaluation batch size (default 64)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available; a packed model runs on "
                   "the CPU)")
    p.add_argument("--threads", type=int, help="kernel threads of a packed model (default: BIBERT_THREADS or all "
                   "cores)")
    p.add_argument("--out", help="metrics JSON file (default: <model>/eval_<task>_<split>.json for the task's own "
                   "data, <model>/eval_[<task>_]<file name>-<sha256 prefix>.json for a file)")
    add_source_arguments(p)
    p.set_defaults(func=run)


def default_out(model_dir: Path, task, split: str, source: dict, prefix: str = "") -> Path:
    """The results file of one data source: its name says which data were scored (a packed
    file's results sit beside it, prefixed with its name)."""
    if "file" in source:
        stem = f"{Path(source['file']).stem}-{source['sha256'][:8]}"
        return model_dir / (f"{prefix}eval_{task.name}_{stem}.json" if task.registered else f"{prefix}eval_{stem}.json")
    return model_dir / f"{prefix}eval_{task.name}_{split}.json"


def packed_path(model: str) -> Path | None:
    """The packed file `--model` names (a file starting with the packed magic, or a folder
    holding model.bibert), else None: a model folder."""
    from ..hub import MODEL_FILE
    from ..packed.format import MAGIC

    path = Path(model)
    if path.is_dir():
        return path / MODEL_FILE if (path / MODEL_FILE).is_file() else None
    try:
        with open(path, "rb") as f:
            return path if f.read(len(MAGIC)) == MAGIC else None
    except OSError:
        return None


def _earlier_result(out: Path, source: dict) -> None:
    from ..checkpoint import read_json_if_exists
    from ..errors import BibertError

    earlier = read_json_if_exists(out)
    if earlier and earlier.get("source", source) != source:
        raise BibertError(f"{out} holds the result of other data ({earlier['source']}); choose another --out")


def _report(args, task, results: dict) -> None:
    for split, metrics in results.items():
        where = f"{task.name} {split}" if not args.file else \
            f"{task.name} {Path(args.file).name}" if task.registered else Path(args.file).name
        print(f"{where}: " + "  ".join(f"{k} {100 * v:.2f}" for k, v in metrics.items()))


def run_packed(args, path: Path) -> int:
    """`bibert evaluate` of a packed model: the same splits, metrics and result file as for a
    model folder, the predictions from the bitwise engine."""
    import numpy as np

    from ..checkpoint import write_json
    from ..data import load_examples, source_record
    from ..errors import BibertError
    from ..packed import kernels, load_packed
    from ..packed.tuning import cpu_model
    from ..tasks import compute_metrics

    if args.tokenizer:
        raise BibertError("--tokenizer does not apply to a packed model: it carries its own tokenizer")
    model = load_packed(path, threads=args.threads)
    task = source_task(args, labels=list(map(str, model.labels)), regression=model.num_labels == 1)
    splits = task.eval_splits(args.split)
    if args.file and len(splits) > 1:
        splits = splits[:1]  # one file is one split
    source = source_record(args.file, args.data_dir)
    out = Path(args.out) if args.out else default_out(path.parent, task, args.split, source, prefix=f"{path.stem}.")
    _earlier_result(out, source)
    max_length = args.max_length or task.max_length
    results = {}
    for split in splits:
        examples = load_examples(task, split, **source_kwargs(args))
        if any(e.label is None for e in examples):
            raise BibertError(f"{task.name} {split} has no labels to score against")
        pairs = [e.text_b for e in examples] if task.is_pair else None
        pred = model.predict([e.text_a for e in examples], pairs, batch_size=args.batch_size, max_length=max_length)
        if task.is_regression:
            ids = np.asarray(pred.scores, np.float64).reshape(-1)
        else:
            index = {str(label): i for i, label in enumerate(task.label_list)}
            ids = np.array([index[str(label)] for label in pred.labels])
        results[split] = compute_metrics(task, ids, np.array([e.label for e in examples]))
    _report(args, task, results)
    write_json(out, {"task": task.name, "model": str(path), "split": args.split, "source": source,
                     "max_length": max_length, "metrics": results,
                     "engine": {"kernel": kernels.get_kernel(), "threads": kernels.get_threads(), "cpu": cpu_model()}})
    print(f"wrote {out}")
    return 0


def run(args) -> int:
    packed = packed_path(args.model)
    if packed is not None:  # the runtime's path: no torch, no transformers
        return run_packed(args, packed)
    import torch
    from transformers import AutoTokenizer

    from ..batches import build_dataset
    from ..checkpoint import model_labels, write_json
    from ..data import load_examples, resolve_model, source_record
    from ..errors import BibertError
    from ..evaluate import evaluate_model
    from ..modeling import load_any_model

    model_dir = Path(resolve_model(args.model))
    if not model_dir.is_dir():
        raise BibertError(f"model folder not found: {model_dir}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_any_model(model_dir).to(device)  # first: a folder without a model says so
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(args.tokenizer or model_dir))
    except (OSError, ValueError) as exc:
        raise BibertError(f"no tokenizer in {args.tokenizer or model_dir} ({exc}); pass --tokenizer DIR") from None
    labels, regression = model_labels(model_dir)
    task = source_task(args, labels=labels, regression=regression)
    splits = task.eval_splits(args.split)
    if args.file and len(splits) > 1:
        splits = splits[:1]  # one file is one split
    source = source_record(args.file, args.data_dir)
    out = Path(args.out) if args.out else default_out(model_dir, task, args.split, source)
    _earlier_result(out, source)
    max_length = args.max_length or task.max_length
    datasets = {split: build_dataset(load_examples(task, split, **source_kwargs(args)), tokenizer,
                                     max_length, task) for split in splits}
    results = evaluate_model(model, task, datasets, batch_size=args.batch_size)
    _report(args, task, results)
    write_json(out, {"task": task.name, "model": str(model_dir), "split": args.split, "source": source,
                     "max_length": max_length, "metrics": results})
    print(f"wrote {out}")
    return 0
