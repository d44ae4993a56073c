"""What the engine's idle threads cost: spin budgets between forwards that come with gaps.

After a forward, the threads of the engine's pool poll for the next job for a while (the
spin, `kernels.set_spin_us` / BIBERT_SPIN_US), then sleep. A long spin keeps them awake for
the next forward; but where forwards come with gaps (a server between requests, a file
scorer between windows) the polling takes cores that the rest of the machine needs. This
script runs forwards (MiniLM shape, random weights, one sequence, kernel threads 2 by
default) separated by idle gaps, beside a busy process that stands for the other work, for
each spin budget and gap, interleaved over rounds. Per setting it reports the median
forward time, the engine process's CPU time per forward (polling included), and the busy
process's progress relative to a round with no engine running.

    python benchmarks/idle_spin.py                            # spins 500 50 10 0 us, gaps 0 0.2 2 ms
    python benchmarks/idle_spin.py --spins 500 50 --gaps 0 1 --rounds 9
Writes benchmarks/results/idle_spin.json and .md.
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


def _busy(counter, stop) -> None:
    """Counts loop iterations into `counter` until `stop` is set (the other work)."""
    n = 0
    while not stop.is_set():
        for _ in range(20000):
            n += 1
        with counter.get_lock():
            counter.value += 20000


def run_setting(engine, ids, mask, gap_s: float, seconds: float) -> tuple[list[float], float, int]:
    """Forwards separated by `gap_s` of sleep for `seconds`: (forward times ms, CPU s, count)."""
    times = []
    cpu = time.process_time()
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        engine.forward(ids, mask)
        times.append((time.perf_counter() - t) * 1e3)
        if gap_s:
            time.sleep(gap_s)
    return times, time.process_time() - cpu, len(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spins", nargs="+", type=int, default=[500, 50, 10, 0], help="spin budgets, microseconds")
    ap.add_argument("--gaps", nargs="+", type=float, default=[0.0, 0.2, 2.0], help="idle ms between forwards")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seq", type=int, default=50)
    ap.add_argument("--model", default="minilm", choices=["bert-base", "minilm"])
    ap.add_argument("--seconds", type=float, default=1.5, help="per setting and round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-busy", action="store_true", help="without the competing busy process")
    ap.add_argument("--out", type=Path, default=RESULTS / "idle_spin.json")
    args = ap.parse_args(argv)
    if any(not 0 <= s <= kernels.MAX_SPIN_US for s in args.spins) or any(g < 0 for g in args.gaps):
        raise SystemExit(f"--spins must be 0..{kernels.MAX_SPIN_US} us and --gaps at least 0 ms")
    with tempfile.TemporaryDirectory() as tmp:
        _, packed_path, _ = build(args.model, Path(tmp))
        engine = load_packed(packed_path, threads=args.threads)
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 20000, size=(1, args.seq))
    mask = np.ones_like(ids)
    engine.forward(ids, mask)

    ctx = mp.get_context("spawn")
    counter, stop = ctx.Value("q", 0), ctx.Event()
    busy = None if args.no_busy else ctx.Process(target=_busy, args=(counter, stop), daemon=True)
    if busy:
        busy.start()
        time.sleep(0.5)
    settings = [(g, s) for g in args.gaps for s in args.spins]
    stats = {k: {"ms": [], "cpu": 0.0, "n": 0, "busy": []} for k in settings}
    alone = []  # the busy process's rate with the engine idle and asleep
    spin_before = kernels.get_spin_us()
    try:
        for r in range(args.rounds):
            if busy:
                kernels.set_spin_us(0)
                time.sleep(0.05)
                c0, t0 = counter.value, time.perf_counter()
                time.sleep(args.seconds)
                alone.append((counter.value - c0) / (time.perf_counter() - t0))
            for gap, spin in (settings if r % 2 == 0 else settings[::-1]):
                kernels.set_spin_us(spin)
                engine.forward(ids, mask)
                c0, t0 = counter.value, time.perf_counter()
                ms, cpu, n = run_setting(engine, ids, mask, gap / 1000, args.seconds)
                rate = (counter.value - c0) / (time.perf_counter() - t0)
                s = stats[(gap, spin)]
                s["ms"] += ms
                s["cpu"] += cpu
                s["n"] += n
                s["busy"].append(rate)
            print(f"round {r + 1}/{args.rounds} done", flush=True)
    finally:
        stop.set()
        if busy:
            busy.join()
        kernels.set_spin_us(spin_before)
    base = statistics.median(alone) if alone else None
    rows = []
    for gap, spin in settings:
        s = stats[(gap, spin)]
        rows.append({"gap_ms": gap, "spin_us": spin, "forwards": s["n"],
                     "median_ms": round(statistics.median(s["ms"]), 3),
                     "p90_ms": round(float(np.percentile(s["ms"], 90)), 3),
                     "cpu_ms_per_forward": round(s["cpu"] / s["n"] * 1e3, 3),
                     "busy_progress": round(statistics.median(s["busy"]) / base, 3) if base else None})
    result = {"cpu": _cpu_name(), "cores": os.cpu_count(), "kernel": kernels.get_kernel(), "model": args.model,
              "seq": args.seq, "threads": args.threads, "rounds": args.rounds, "seconds": args.seconds,
              "busy_process": bool(busy), "rows": rows}
    md = to_markdown(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(md)
    print(md)
    return 0


def to_markdown(r: dict) -> str:
    lines = [f"# Idle engine threads: spin budget vs gaps between forwards ({r['model']}, 1 x {r['seq']} tokens, "
             f"{r['threads']} kernel threads)", "",
             f"Machine: {r['cpu']}, {r['cores']} cores, kernel {r['kernel']}. {r['rounds']} interleaved rounds of "
             f"{r['seconds']} s per setting" + (", beside one busy process (the other work)." if r["busy_process"]
                                                 else ", nothing else running."), "",
             "| gap between forwards (ms) | spin (us) | forward median ms | p90 ms | engine CPU ms per forward |"
             " other work's progress (1 = engine idle) |", "|---|---|---|---|---|---|"]
    for x in r["rows"]:
        busy = "" if x["busy_progress"] is None else f"{x['busy_progress']:.2f}"
        lines.append(f"| {x['gap_ms']:g} | {x['spin_us']} | {x['median_ms']} | {x['p90_ms']} | "
                     f"{x['cpu_ms_per_forward']} | {busy} |")
    lines += ["", "Engine CPU is the process's user + system time over the setting (its idle threads' polling "
              "included) per forward. Reproduce: `python benchmarks/idle_spin.py`."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
