"""`bibert evaluate`: score a saved model on a task's dev or test split(s)."""
from __future__ import annotations

import json
from pathlib import Path

from .data import add_source_arguments, source_kwargs


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="score a saved model on a task's dev or test split",
                       description="Run a saved model (teacher, BiBERT student or any Hugging Face "
                       "sequence classifier folder) over a labeled split and print the task's metrics "
                       "(MNLI: matched and mismatched). The metrics are also written as JSON.")
    p.add_argument("--model", required=True, help="model folder")
    p.add_argument("--task", required=True, help="task name, e.g. sst2, mnli, rotten_tomatoes")
    p.add_argument("--split", default="dev", help="dev (default), test, or a split name such as dev_mismatched")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the model folder)")
    p.add_argument("--max-length", type=int, help="truncation length (default: the task's recipe)")
    p.add_argument("--batch-size", type=int, default=64, help="evaluation batch size (default 64)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--out", help="metrics JSON file (default: <model>/eval_<task>_<split>.json)")
    add_source_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import torch
    from transformers import AutoTokenizer

    from ..data import build_dataset, load_examples
    from ..errors import BibertError
    from ..evaluate import evaluate_model
    from ..tasks import get_task

    task = get_task(args.task)
    splits = task.eval_splits(args.split)
    if args.file and len(splits) > 1:
        splits = splits[:1]  # one file is one split
    model_dir = Path(args.model)
    if not model_dir.is_dir():
        raise BibertError(f"model folder not found: {model_dir}")
    from ..modeling import load_any_model

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(args.tokenizer or model_dir))
    except (OSError, ValueError) as exc:
        raise BibertError(f"no tokenizer in {args.tokenizer or model_dir} ({exc}); pass --tokenizer DIR") from None
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_any_model(model_dir).to(device)
    max_length = args.max_length or task.max_length
    datasets = {split: build_dataset(load_examples(task, split, **source_kwargs(args)), tokenizer,
                                     max_length, task) for split in splits}
    results = evaluate_model(model, task, datasets, batch_size=args.batch_size)
    for split, metrics in results.items():
        print(f"{task.name} {split}: " + "  ".join(f"{k} {100 * v:.2f}" for k, v in metrics.items()))
    out = Path(args.out) if args.out else model_dir / f"eval_{task.name}_{args.split}.json"
    out.write_text(json.dumps({"task": task.name, "model": str(model_dir), "split": args.split,
                               "max_length": max_length, "metrics": results}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0
