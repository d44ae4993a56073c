"""Start-up cost of the packed runtime: wall time and peak memory (max RSS) of one
`bibert predict --model M.bibert "text"` and of the refusal of a bad file, each a fresh
process, before and after the runtime stopped loading torch and transformers.

    python benchmarks/startup.py [--model M.bibert] [--reps 7]

"after" runs `python -m bibert.cli ...` as the runtime does now (NumPy, tokenizers and the
native engine only); "before" runs the same command in a process that imports torch and
transformers first (`python -c "import torch, transformers; from bibert.cli import main;
..."`), which is what every CLI call paid before. The two are interleaved, run for run, in
the same session; the table gives the median of --reps runs. Without --model, a
MiniLM-shaped 1-1-1 model with random weights and the offline teacher's tokenizer is built
(as in batch_predict_throughput.py). One untimed run of each kind comes first (the kernel
tuning cache and the file cache warm up). Writes benchmarks/results/startup.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bibert.packed.tuning import cpu_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TEXT = "a gripping, funny film"
BEFORE = ("import torch, transformers, sys; from bibert.cli import main; sys.argv[0] = 'bibert'; "
          "sys.exit(main(sys.argv[1:]))")


# A small launcher (python -S: no site packages, a few MiB) runs each command and reports its
# wall time and peak RSS: Linux keeps a process's RSS high-water mark across fork and exec,
# so a child spawned by this (large) process would report at least this process's own.
LAUNCHER = """
import os, sys, time
start = time.perf_counter()
null = os.open(os.devnull, os.O_WRONLY)
pid = os.posix_spawn(sys.argv[1], sys.argv[1:], os.environ, file_actions=[(os.POSIX_SPAWN_DUP2, null, 1)])
_, status, usage = os.wait4(pid, 0)
print(time.perf_counter() - start, usage.ru_maxrss, os.waitstatus_to_exitcode(status))
"""


def run_once(argv: list[str]) -> tuple[float, float, int, str]:
    """Wall time, max RSS in MiB, exit status and last stderr line of one fresh process."""
    proc = subprocess.run([sys.executable, "-S", "-c", LAUNCHER, *argv], capture_output=True, text=True,
                          check=True)
    wall, rss_kib, code = proc.stdout.split()
    last = (proc.stderr.strip().splitlines() or [""])[-1]
    return float(wall), int(rss_kib) / 1024, int(code), last


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a packed model (default: build a MiniLM-shaped one)")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--out", default=str(RESULTS / "startup.md"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bibert-startup-") as tmp:
        model = Path(args.model) if args.model else None
        if model is None:
            from batch_predict_throughput import build_model

            model = build_model("minilm", Path(tmp))
        bad = Path(tmp) / "bad.bibert"
        bad.write_bytes(b"not a packed model, just bytes\n" * 4)
        py = sys.executable
        cases = {
            ("predict", "before"): [py, "-c", BEFORE, "predict", "--model", str(model), TEXT],
            ("predict", "after"): [py, "-m", "bibert.cli", "predict", "--model", str(model), TEXT],
            ("bad file", "before"): [py, "-c", BEFORE, "predict", "--model", str(bad), TEXT],
            ("bad file", "after"): [py, "-m", "bibert.cli", "predict", "--model", str(bad), TEXT],
        }
        for argv in cases.values():  # warm-up: tuning cache, page cache
            run_once(argv)
        samples = {k: [] for k in cases}
        answers = {}
        for _ in range(args.reps):  # interleaved
            for key, argv in cases.items():
                wall, rss, code, last = run_once(argv)
                samples[key].append((wall, rss))
                answers[key] = (code, last.replace(str(bad), "bad.bibert"))

    rows = []
    for (what, when), values in samples.items():
        wall = statistics.median(v[0] for v in values)
        rss = statistics.median(v[1] for v in values)
        rows.append((what, when, wall, rss, *answers[(what, when)]))
    cpu = cpu_model()
    lines = [
        "# Start-up of `bibert predict` (one fresh process per call)",
        "",
        f"CPU: {cpu} ({os.cpu_count()} logical CPUs); Python {platform.python_version()}; "
        f"{time.strftime('%Y-%m-%d')}; median of {args.reps} interleaved runs after one warm-up each; "
        f"model: {'`' + str(args.model) + '`' if args.model else 'MiniLM-shaped 1-1-1 (6 layers, hidden 384), random weights, the offline teacher tokenizer'}.",
        "",
        "`before`: the same command in a process that imports torch and transformers first, as every CLI "
        "call did before the runtime split; `after`: `python -m bibert.cli` (NumPy, tokenizers, the native "
        "engine). Each command runs under a small launcher (`python -S`) that reads its peak RSS from "
        "`wait4`; 8 MiB of it is the launcher's own, which Linux carries across exec. The machine's 2 cores "
        "were shared with two training runs (nice 10) while this ran.",
        "",
        "| command | | wall s | max RSS MiB | exit | stderr |",
        "|---|---|---:|---:|---:|---|",
    ]
    for what, when, wall, rss, code, last in rows:
        lines.append(f"| `predict --model {'M.bibert' if what == 'predict' else 'bad.bibert'} \"text\"` | {when} | "
                     f"{wall:.2f} | {rss:.0f} | {code} | {last[:100]} |")
    for what in ("predict", "bad file"):
        b = next(r for r in rows if r[0] == what and r[1] == "before")
        a = next(r for r in rows if r[0] == what and r[1] == "after")
        lines.append("")
        lines.append(f"- {what}: {b[2] / a[2]:.1f}x faster to answer, {b[3] / a[3]:.1f}x less memory.")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
