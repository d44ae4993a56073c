"""What a distillation step costs on a busy machine: CPU seconds and wall seconds per step by
torch thread count and OpenMP wait policy, measured beside other jobs.

A user's first own-data run (README: 400-row CSV, elastic bi-max, the recipe defaults of
that version: fp32, batch 16, max length 128, plain shuffled order) took about 16 CPU
seconds a step on a shared 2-core host: PyTorch's OpenMP threads spin while they wait, and
on a busy machine the spinning is most of the CPU time (bibert now makes an unset
OMP_WAIT_POLICY passive, where other tasks are running, when it is imported before torch; bibert._omp). This script
runs a few real steps of that recipe
and of today's default recipe in child processes (OpenMP settings must be in place before
torch loads), each with the machine as it is (run it beside training jobs to see the
shared case), and reports per step: wall seconds, the process's CPU seconds (user +
system, every thread), and their ratio (CPU seconds per wall second: above the thread
count's share of the cores means threads that spin rather than work).

    python benchmarks/shared_step.py                  # writes benchmarks/results/shared_step.json and .md
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
RECIPES = {
    # the own-data block of the README before the default changed: elastic bi-max, everything else the old defaults
    "previous own-data recipe (fp32, batch 16, length 128, shuffled)":
        dict(precision="fp32", batch_size=16, max_length=128, group_by_length=False, pred_weight=1.0, lr=1e-4),
    "default recipe (bf16 where the CPU has it, batch 32, length 128, length-grouped)": dict(),
}


def child(recipe: str, steps: int, threads: int) -> None:
    """One measurement, in this (child) process: a tiny own-data CSV, `steps` timed steps.
    torch is imported before bibert, so OpenMP starts with the policy the parent chose (bibert
    would otherwise make an unset policy PASSIVE)."""
    import torch

    torch.set_num_threads(threads)
    from bibert.config import QuantConfig
    from bibert.data import load_examples, teacher_path
    from bibert.train import distill, finetune

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows = load_examples("rotten_tomatoes", "train")[:400]
        csv = tmp / "reviews.csv"
        import csv as csvlib

        with open(csv, "w", newline="") as fh:
            w = csvlib.writer(fh)
            w.writerow(["review", "sentiment"])
            w.writerows([(r.text_a, ["neg", "pos"][r.label]) for r in rows])
        data = dict(train_file=str(csv), text_column="review", label_column="sentiment", max_eval_examples=16)
        teacher = finetune(str(teacher_path()), None, tmp / "t", max_steps=2, batch_size=8, max_length=64, **data)
        marks = []

        def hook(trainer):
            usage = resource.getrusage(resource.RUSAGE_SELF)
            marks.append((time.perf_counter(), usage.ru_utime + usage.ru_stime))

        distill(str(tmp / "t" / "best"), None, tmp / "s", quant=QuantConfig(activations="elastic", attention="bi-max"),
                max_steps=steps + 2, eval_every=10**6, hooks=[hook], **data, **RECIPES[recipe])
        del teacher
        # the first step is a warm-up; the last one's hook comes after the final evaluation
        wall = [b[0] - a[0] for a, b in zip(marks[1:-1], marks[2:-1])]
        cpu = [b[1] - a[1] for a, b in zip(marks[1:-1], marks[2:-1])]
        print(json.dumps({"wall": wall, "cpu": cpu}))


def measure(recipe: str, steps: int, threads: int, policy: str | None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    env.pop("OMP_WAIT_POLICY", None)
    env.pop("GOMP_SPINCOUNT", None)  # what bibert set in this process, were it imported
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    out = subprocess.run([sys.executable, __file__, "--child", recipe, "--steps", str(steps), "--threads", str(threads)],
                         env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"child failed: {out.stderr[-2000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return {"wall_s": statistics.median(r["wall"]), "cpu_s": statistics.median(r["cpu"]), "steps": len(r["wall"])}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--child")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if args.child:
        child(args.child, args.steps, args.threads)
        return 0
    rows = []
    for recipe in RECIPES:
        for threads, policy in ((2, None), (2, "PASSIVE"), (1, None)):
            r = measure(recipe, args.steps, threads, policy)
            r.update(recipe=recipe, threads=threads, omp_wait_policy=policy or "unset (libgomp spins)",
                     load_average=os.getloadavg()[0])
            rows.append(r)
            print(r, file=sys.stderr)
    from bibert.packed.tuning import cpu_model

    cpu = cpu_model()
    lines = ["python benchmarks/shared_step.py", f"CPU: {cpu}, {os.cpu_count()} cores; other jobs were running (load "
             "average in the table)", "",
             "| recipe | torch threads | OMP_WAIT_POLICY | wall s/step | CPU s/step | CPU s per wall s | load average |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['recipe']} | {r['threads']} | {r['omp_wait_policy']} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | "
                     f"{r['cpu_s'] / r['wall_s']:.2f} | {r['load_average']:.1f} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "shared_step.json").write_text(json.dumps({"cpu": cpu, "rows": rows}, indent=2) + "\n")
    (RESULTS / "shared_step.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
