"""`bibert bench`: a packed model's latency and size against its teacher, on one's own texts."""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

SAMPLE_TEXTS = [  # used when neither TEXT nor --file is given
    "the film is a quiet triumph, funny and humane from its first scene to its last",
    "a tedious, overlong mess that wastes a talented cast",
    "I expected little and was pleasantly surprised by how much I enjoyed the story",
    "the plot makes no sense, but the music and the photography are wonderful",
    "one of the most moving documentaries of the year",
    "not bad, not great: a film you will have forgotten by the time you reach the car park",
    "the service was slow and the food arrived cold",
    "an honest, well-acted portrait of a family coming apart",
]


def register(sub) -> None:
    p = sub.add_parser(
        "bench", help="latency and size of a packed model against its teacher, on your own texts",
        description="Time a packed model (batch 1: one text per forward, as a service answers a request) on your "
        "own texts, and, with --teacher, the full-precision teacher on the same texts, interleaved text by text "
        "so that both see the same machine load; prints the median and p90 milliseconds per text, the speed-up, "
        "the sizes, how often the two predict the same label, and the CPU. Texts: TEXT arguments, a column of "
        "--file, or a few built-in sentences.")
    p.add_argument("--model", required=True, metavar="PATH", help="packed model (file, save_pretrained folder, or "
                   "Hub repo id)")
    p.add_argument("texts", nargs="*", metavar="TEXT", help="texts to time")
    p.add_argument("--teacher", metavar="DIR", help="the full-precision model to compare with (a Hugging Face "
                   "classifier folder, e.g. the teacher the student was distilled from; needs bibert[train])")
    p.add_argument("--file", metavar="F", help="take the texts from a .csv, .tsv, .jsonl or .parquet file")
    p.add_argument("--text-column", metavar="C", default="text", help="column of F with the text "
                   "(default: %(default)s)")
    p.add_argument("--text-pair-column", metavar="C2", help="column of F with the second segment of a pair")
    p.add_argument("--max-texts", type=int, default=200, help="texts of F to use, from the top (default: "
                   "%(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="times each text is run (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="threads of both models (default: %(default)s)")
    p.add_argument("--max-length", type=int, help="truncate inputs to this many tokens (default: the model's)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--out", metavar="FILE", help="also write the result as JSON to FILE")
    p.set_defaults(func=run)


def _texts(args) -> tuple[list[str], list[str] | None, str]:
    from ..errors import BibertError

    if args.file and args.texts:
        raise BibertError("give texts as arguments or --file, not both")
    if not args.file:
        return (args.texts, None, "the command line") if args.texts else (SAMPLE_TEXTS, None, "built-in sentences")
    from ..serving.batch_predict import _check_columns, _texts as column
    from ..tables import TableReader

    reader = TableReader(Path(args.file))
    _check_columns(reader, args.text_column, args.text_pair_column, None)
    rows = []
    for row in reader.rows(0):
        rows.append(row)
        if len(rows) >= args.max_texts:
            break
    if not rows:
        raise BibertError(f"{args.file} has no rows to time")
    pairs = column(rows, args.text_pair_column, reader) if args.text_pair_column else None
    return column(rows, args.text_column, reader), pairs, f"{Path(args.file).name} ({len(rows)} rows)"


def _teacher(path: str, threads: int):
    """(predict one text -> label name, weights bytes) of a full-precision classifier folder."""
    from ..errors import BibertError

    try:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
    except ImportError:
        raise BibertError("--teacher runs the full-precision model with torch and transformers: "
                          "pip install 'bibert[train]'") from None
    folder = Path(path)
    if not folder.is_dir():
        raise BibertError(f"no such folder: {folder}; give the teacher's model folder (e.g. a run's best/)")
    torch.set_num_threads(threads)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise BibertError(f"cannot load the teacher from {folder}: {str(exc).splitlines()[0]}") from None
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    weights = sum(f.stat().st_size for f in folder.glob("*.safetensors")) or \
        sum(f.stat().st_size for f in folder.glob("*.bin"))

    def predict(text: str, pair: str | None, max_length: int) -> str:
        enc = tokenizer(text, pair, truncation=True, max_length=max_length, return_tensors="pt")
        with torch.inference_mode():
            return labels[int(model(**enc).logits[0].argmax())]

    return predict, weights


def _ms(values: list[float]) -> dict:
    values = sorted(values)
    return {"median_ms": round(1000 * statistics.median(values), 3),
            "p90_ms": round(1000 * values[min(len(values) - 1, int(0.9 * len(values)))], 3)}


def run(args: argparse.Namespace) -> int:
    from ..errors import BibertError
    from ..packed import kernels, load_packed
    from ..packed.tuning import cpu_model

    for name in ("rounds", "threads", "max_texts"):
        if getattr(args, name) < 1:
            raise BibertError(f"--{name.replace('_', '-')} is {getattr(args, name)}: give a positive number")
    texts, pairs, where = _texts(args)
    model = load_packed(args.model, threads=args.threads)
    max_length = min(args.max_length or model.max_positions, model.max_positions)
    teacher, teacher_bytes = _teacher(args.teacher, args.threads) if args.teacher else (None, None)
    times: dict[str, list[float]] = {"packed": [], "teacher": []}
    same = 0
    model.predict(texts[:1], pairs[:1] if pairs else None, max_length=max_length)  # warm-up
    if teacher:
        teacher(texts[0], pairs[0] if pairs else None, max_length)
    for r in range(args.rounds):
        for i, text in enumerate(texts):
            pair = pairs[i] if pairs else None
            t = time.perf_counter()
            label = model.predict([text], None if pair is None else [pair], max_length=max_length).labels[0]
            times["packed"].append(time.perf_counter() - t)
            if teacher:
                t = time.perf_counter()
                reference = teacher(text, pair, max_length)
                times["teacher"].append(time.perf_counter() - t)
                same += r == 0 and str(reference) == str(label)
    model_path = Path(model.source)
    result = {
        "model": str(args.model), "texts": len(texts), "source": where, "rounds": args.rounds,
        "threads": args.threads, "kernel": kernels.get_kernel(), "cpu": cpu_model(), "max_length": max_length,
        "packed": {**_ms(times["packed"]), "bytes": model_path.stat().st_size},
    }
    if teacher:
        result["teacher"] = {"path": str(args.teacher), **_ms(times["teacher"]), "bytes": teacher_bytes}
        result["speedup"] = round(result["teacher"]["median_ms"] / result["packed"]["median_ms"], 2)
        result["smaller"] = round(teacher_bytes / result["packed"]["bytes"], 1) if teacher_bytes else None
        result["same_label"] = round(same / len(texts), 4)
    if args.out:
        from ..checkpoint import write_json

        write_json(Path(args.out), result)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{len(texts)} texts from {where}, batch 1, {args.rounds} rounds, {args.threads} thread(s), "
          f"{result['kernel']} kernels, on {result['cpu']}")
    print(f"{'model':<10}{'median ms':>11}{'p90 ms':>10}{'size MiB':>10}")
    for name in ("packed", "teacher"):
        if name in result:
            row = result[name]
            print(f"{name:<10}{row['median_ms']:>11.2f}{row['p90_ms']:>10.2f}{row['bytes'] / 2**20:>10.2f}")
    if teacher:
        print(f"packed is {result['speedup']:.1f}x faster" + (f" and {result['smaller']:.1f}x smaller" if
              result["smaller"] else "") + f"; same label as the teacher on {100 * result['same_label']:.1f}% "
              "of the texts")
    return 0
