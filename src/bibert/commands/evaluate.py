"""`bibert evaluate`: score a saved model on a task's dev or test split(s), or on a file."""
from __future__ import annotations

from pathlib import Path

from .data import add_source_arguments, source_kwargs, source_task


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="score a saved model on a task's dev or test split, or on a file",
                       description="Run a saved model (teacher, BiBERT student or any Hugging Face "
                       "sequence classifier folder) over a labeled split, or a labeled file of your own (--file, "
                       "read with the model's labels), and print the task's metrics (MNLI: matched and "
                       "mismatched). The metrics are also written as JSON, named after the data source and "
                       "recording it (a file by its path and sha256), so that scores of different data never "
                       "replace each other.")
    p.add_argument("--model", required=True, help="model folder (or `teacher`)")
    p.add_argument("--task", help="task name, e.g. sst2, mnli, rotten_tomatoes (default: with --file, a task of your "
                   "own data with the model's labels)")
    p.add_argument("--split", default="dev", help="dev (default), test, or a split name such as dev_mismatched")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the model folder)")
    p.add_argument("--max-length", type=int, help="truncation length (default: the task's recipe)")
    p.add_argument("--batch-size", type=int, default=64, help="evaluation batch size (default 64)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--out", help="metrics JSON file (default: <model>/eval_<task>_<split>.json for the task's own "
                   "data, <model>/eval_[<task>_]<file name>-<sha256 prefix>.json for a file)")
    add_source_arguments(p)
    p.set_defaults(func=run)


def default_out(model_dir: Path, task, split: str, source: dict) -> Path:
    """The results file of one data source: its name says which data were scored."""
    if "file" in source:
        stem = f"{Path(source['file']).stem}-{source['sha256'][:8]}"
        return model_dir / (f"eval_{task.name}_{stem}.json" if task.registered else f"eval_{stem}.json")
    return model_dir / f"eval_{task.name}_{split}.json"


def run(args) -> int:
    import torch
    from transformers import AutoTokenizer

    from ..checkpoint import model_labels, read_json_if_exists, write_json
    from ..data import build_dataset, load_examples, resolve_model, source_record
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
    earlier = read_json_if_exists(out)
    if earlier and earlier.get("source", source) != source:
        raise BibertError(f"{out} holds the result of other data ({earlier['source']}); choose another --out")
    max_length = args.max_length or task.max_length
    datasets = {split: build_dataset(load_examples(task, split, **source_kwargs(args)), tokenizer,
                                     max_length, task) for split in splits}
    results = evaluate_model(model, task, datasets, batch_size=args.batch_size)
    for split, metrics in results.items():
        where = f"{task.name} {split}" if not args.file else \
            f"{task.name} {Path(args.file).name}" if task.registered else Path(args.file).name
        print(f"{where}: " + "  ".join(f"{k} {100 * v:.2f}" for k, v in metrics.items()))
    write_json(out, {"task": task.name, "model": str(model_dir), "split": args.split, "source": source,
                     "max_length": max_length, "metrics": results})
    print(f"wrote {out}")
    return 0
