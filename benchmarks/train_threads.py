"""What the second core buys a training run: wall and CPU seconds per step of the default
Elastic BiBERT distillation (snli, batch 32, max length 64, length-grouped batches, bf16
where the CPU has it) with 1 and 2 torch threads, each in a child process, interleaved.

The budget study (benchmarks/budget.py) trains with one thread per run, two runs side by
side, and counts each run's CPU minutes. A user runs one job with every core; this script
gives the factor between the two (wall seconds per step at 2 threads / at 1 thread), so a
limit on the clock (e.g. 45 minutes with both cores) can be read as a number of steps.
Run it on an idle machine: it states the load average beside each figure.

    python benchmarks/train_threads.py                # writes benchmarks/results/train_threads.json and .md
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TEACHER = ROOT / "benchmarks" / "results" / "budget" / "snli" / "teacher" / "best"
WARMUP = 5  # steps left out of the timing (allocation, first batches)
ONE, TWO = "1 thread", "2 threads, bibert's choice (a short spin where the machine is idle)"
VARIANTS = {  # name: (torch threads, OpenMP variables set before bibert is imported)
    ONE: (1, {}),
    TWO: (2, {}),
    "2 threads, passive waiting": (2, {"OMP_WAIT_POLICY": "PASSIVE"}),
}


def child(teacher: str, threads: int, steps: int) -> dict:
    """Times `steps` steps after WARMUP ones, in this process (bibert imported before torch, as
    the `bibert` command does, so its choice of OpenMP wait policy holds)."""
    from bibert import _omp  # what bibert chose (or kept) before torch loads

    others = _omp.others_running()
    import torch

    torch.set_num_threads(threads)
    from bibert.train import distill

    marks = []

    def hook(trainer):
        marks.append((trainer.step, time.perf_counter(), time.process_time()))

    with tempfile.TemporaryDirectory() as out:
        distill(teacher, "snli", out, max_steps=WARMUP + steps, eval_every=10 ** 6, max_eval_examples=16, lr=5e-4,
                max_length=64, batch_size=32, group_by_length=True, precision="auto", seed=1, hooks=[hook],
                log_every=10 ** 6)
    (s0, w0, c0), (s1, w1, c1) = marks[WARMUP - 1], marks[-1]
    return {"wall_s": (w1 - w0) / (s1 - s0), "cpu_s": (c1 - c0) / (s1 - s0), "others_running": others,
            "policy": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}}


def _policy(env: dict) -> str:
    if env.get("OMP_WAIT_POLICY"):
        return env["OMP_WAIT_POLICY"].lower()
    return f"spin {int(env['GOMP_SPINCOUNT']):,} rounds" if env.get("GOMP_SPINCOUNT") else "libgomp's default"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default=str(TEACHER),
                   help="a fine-tuned snli teacher folder (default: the budget study's; "
                        "`python benchmarks/budget.py --task snli --runs none` trains it)")
    p.add_argument("--steps", type=int, default=40, help="timed steps per measurement")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (median reported)")
    p.add_argument("--out", default=str(RESULTS / "train_threads.json"))
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.teacher, args.child, args.steps)))
        return 0
    if not Path(args.teacher).is_dir():
        sys.exit(f"no teacher at {args.teacher}: pass --teacher DIR (a fine-tuned snli classifier)")
    sys.path.insert(0, str(ROOT / "src"))
    from bibert.packed.tuning import cpu_model

    runs = {name: [] for name in VARIANTS}
    loads = []
    for _ in range(args.rounds):
        for name, (threads, extra) in VARIANTS.items():
            env = {**{k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")},
                   "OMP_NUM_THREADS": str(threads), **extra}
            done = subprocess.run([sys.executable, __file__, "--child", str(threads), "--teacher", args.teacher,
                                   "--steps", str(args.steps)], env=env, capture_output=True, text=True, check=True)
            runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
            loads.append(os.getloadavg()[0])
            print(f"{name}: {runs[name][-1]}", flush=True)
    med = {name: {k: statistics.median(r[k] for r in v) for k in ("wall_s", "cpu_s")} for name, v in runs.items()}
    one, two = med[ONE]["wall_s"], med[TWO]["wall_s"]
    factor = two / one
    result = {"cpu": cpu_model(), "cores": os.cpu_count(), "load_average_after_each": loads, "steps": args.steps,
              "rounds": args.rounds, "median": med, "runs": runs, "wall_2_over_1": factor}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"python benchmarks/train_threads.py --steps {args.steps} --rounds {args.rounds}",
             f"CPU: {result['cpu']}, {result['cores']} cores; 1-minute load average after each measurement: "
             + ", ".join(f"{x:.2f}" for x in loads), "",
             "| variant | OpenMP wait | wall s/step (median) | vs 1 thread | CPU s/step (median) | runs (wall) |",
             "|---|---|---|---|---|---|"]
    for name in VARIANTS:
        policy = ", ".join(sorted({_policy(r["policy"]) for r in runs[name]}))
        lines.append(f"| {name} | {policy} | {med[name]['wall_s']:.3f} | {med[name]['wall_s'] / one:.2f}x | "
                     f"{med[name]['cpu_s']:.3f} | "
                     + ", ".join(f"{r['wall_s']:.3f}" for r in runs[name]) + " |")
    lines += ["", f"With bibert's choice, a step with 2 threads takes {factor:.2f}x the wall time of a step with 1 "
              f"thread: 45 minutes on the clock with both cores are about {45 / factor:.0f} minutes of one-thread "
              "training (the CPU minutes the budget study counts per run)."]
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
