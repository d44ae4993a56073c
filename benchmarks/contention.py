"""Packed-engine latency on a shared machine: with busy processes competing for the cores.

A two-thread forward on a two-core machine where another process keeps one core busy is
the case that punishes barriers: a thread that the OS has descheduled holds up the other
at every synchronisation point. This script times the packed engine (BERT-base shape,
random weights, sequence 128) with 0..N busy-looping processes started beside it, for
each thread count, interleaving settings across rounds; it reports the median and the
90th percentile per setting.

    python benchmarks/contention.py                     # threads 1 2, busy 0 1
    python benchmarks/contention.py --threads 1 2 4 --busy 0 1 2
Writes benchmarks/results/contention.json and .md.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from latency import _cpu_name, build  # noqa: E402

from bibert.packed import kernels, load_packed  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _spin(stop) -> None:
    x = 0
    while not stop.is_set():
        for _ in range(100000):
            x += 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--busy", nargs="+", type=int, default=[0, 1], help="busy processes beside the engine")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=10, help="forwards per setting and round")
    ap.add_argument("--model", default="bert-base", choices=["bert-base", "minilm"])
    ap.add_argument("--out", type=Path, default=RESULTS / "contention.json")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        _, packed_path, _ = build(args.model, Path(tmp))
        engine = load_packed(packed_path)
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 20000, size=(args.batch, args.seq))
    mask = np.ones_like(ids)
    settings = [(t, b) for b in args.busy for t in args.threads]
    times = {s: [] for s in settings}
    ctx = mp.get_context("spawn")
    for _ in range(args.rounds):
        for threads, busy in settings:
            stop = ctx.Event()
            procs = [ctx.Process(target=_spin, args=(stop,), daemon=True) for _ in range(busy)]
            for p in procs:
                p.start()
            time.sleep(0.3 if busy else 0.0)
            kernels.set_threads(threads)
            engine.forward(ids, mask)
            for _ in range(args.reps):
                t = time.perf_counter()
                engine.forward(ids, mask)
                times[(threads, busy)].append((time.perf_counter() - t) * 1e3)
            stop.set()
            for p in procs:
                p.join()
    rows = []
    for threads, busy in settings:
        v = sorted(times[(threads, busy)])
        rows.append({"threads": threads, "busy": busy, "median_ms": round(statistics.median(v), 2),
                     "p90_ms": round(v[int(0.9 * (len(v) - 1))], 2), "max_ms": round(v[-1], 2), "n": len(v)})
    result = {"cpu": _cpu_name(), "cores": os.cpu_count(), "kernel": kernels.get_kernel(), "model": args.model,
              "batch": args.batch, "seq": args.seq, "rows": rows}
    lines = [f"# Packed engine under contention ({args.model}, batch {args.batch}, sequence {args.seq})", "",
             f"Machine: {result['cpu']}, {result['cores']} cores, kernel {result['kernel']}. "
             f"`python benchmarks/contention.py` ({args.rounds} interleaved rounds x {args.reps} forwards).", "",
             "| threads | busy processes | median ms | p90 ms | max ms |", "|---|---|---|---|---|"]
    lines += [f"| {r['threads']} | {r['busy']} | {r['median_ms']} | {r['p90_ms']} | {r['max_ms']} |" for r in rows]
    md = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
