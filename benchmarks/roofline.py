"""The popcount ceiling of one core, for the benchmarks (engines.py, latency.py): a register-only
XOR + popcount + add loop per kernel family of the packed engine (benchmarks/csrc/popcount_ceiling.c),
built with the system C compiler on first use (into build/benchmarks/, once per version of the
source and compiler; CC picks the compiler) and loaded with ctypes. Not part of the bibert library.

    from roofline import Ceiling, popcount_roofline
    popcount_roofline(1.0)            # binary MACs per second, the active kernel family, one core
    Ceiling("avx2").run(iters)        # one timed run of the loop: binary MACs done

As a script, where the time of a packed 1-1-1 forward goes, step by step (a profiling build of the
library, -DBB_STEP_TIMES), against that ceiling; with --against, the sources at another commit
too, interleaved (writes benchmarks/results/roofline_steps.json and .md):

    python benchmarks/roofline.py --steps
    python benchmarks/roofline.py --steps --against HEAD~3 --cache /tmp/models
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import time
from pathlib import Path

from bibert.packed import kernels

SOURCE = Path(__file__).resolve().parent / "csrc" / "popcount_ceiling.c"
BUILD = Path(__file__).resolve().parent.parent / "build" / "benchmarks"
FAMILIES = {"portable": 1, "avx512": 2, "avx2": 3}  # the engine's kernel family numbers

_lib = None


def library() -> ctypes.CDLL:
    """The ceiling loops, compiled on first use (and again whenever the source changes)."""
    global _lib
    if _lib is not None:
        return _lib
    compiler = os.environ.get("CC", "cc")
    flags = ["-O3", "-std=gnu11", "-fPIC", "-shared"]
    version = hashlib.sha256(SOURCE.read_bytes() + " ".join([compiler, *flags]).encode()).hexdigest()[:12]
    target = BUILD / f"popcount_ceiling-{version}.so"
    if not target.exists():
        BUILD.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            subprocess.run([compiler, *flags, "-o", str(tmp), str(SOURCE)], check=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            raise RuntimeError(f"cannot build {SOURCE.name} with {compiler!r} ({exc}); set CC to a C compiler") from None
        os.replace(tmp, target)
    lib = ctypes.CDLL(str(target))
    lib.popcount_ceiling.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.POINTER(ctypes.c_int64)]
    lib.popcount_ceiling.restype = ctypes.c_int64
    _lib = lib
    return lib


class Ceiling:
    """One kernel family's ceiling loop (default: the engine's active family)."""

    def __init__(self, family: str | None = None):
        self.family = family or kernels.get_kernel()
        if self.family not in FAMILIES:
            raise ValueError(f"unknown kernel family {self.family!r}")
        if self.family not in kernels.available_kernels():
            raise ValueError(f"this CPU has no {self.family} kernels")
        self._checksum = ctypes.c_int64()
        self.macs_per_iter = self.run(1)

    def run(self, iters: int) -> int:
        """Runs `iters` iterations on this thread: the binary MACs done."""
        macs = library().popcount_ceiling(FAMILIES[self.family], int(iters), ctypes.byref(self._checksum))
        if macs < 0:
            raise ValueError(f"invalid iteration count {iters}")
        return macs


def popcount_roofline(seconds: float = 0.2, family: str | None = None) -> float:
    """Measured XOR + popcount + add ceiling of one core in a kernel family (default: the
    active one), binary MACs per second: the best of the timed runs within `seconds`."""
    ceiling = Ceiling(family)
    iters, best = 1 << 16, 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t = time.perf_counter()
        macs = ceiling.run(iters)
        dt = time.perf_counter() - t
        if dt < 0.005:
            iters *= 2
            continue
        best = max(best, macs / dt)
    return best


# ---------------------------------------------------------------------------------------------
# where a forward's time goes against the ceiling (python benchmarks/roofline.py --steps)

CSRC = Path(__file__).resolve().parent.parent / "src" / "bibert" / "csrc"
RESULTS = Path(__file__).resolve().parent / "results"
# bb_forward's steps, in the order of BB_STEP_* (src/bibert/csrc/bb_internal.h)
STEPS = ("embeddings", "Q/K/V Linear", "key-valid bits", "attention gather", "attention rows", "attention-output Linear",
         "LayerNorm 1", "FFN-in Linear", "FFN-out Linear", "LayerNorm 2", "pooler", "rest of the native call")


def step_macs(layers: int = 12, rows: int = 128, hidden: int = 768, heads: int = 12, intermediate: int = 3072,
              first_rows_last: bool = True) -> dict:
    """Binary MACs of each step of one sequence's forward (BERT-base at 128 tokens: 11.17 G in the
    whole model). first_rows_last: as the engine's forward without hidden states computes it, the
    last layer past its keys and values on the first row only (10.47 G)."""
    full, last = (layers - 1, 1) if first_rows_last else (layers, 0)  # layers of every row; the last one's rows
    rows_past_kv = full * rows + last  # rows through the attention output, LayerNorms and FFN
    return {"Q/K/V Linear": layers * rows * hidden * 3 * hidden,
            "attention rows": 2 * rows * hidden * rows_past_kv,
            "attention-output Linear": rows_past_kv * hidden * hidden,
            "FFN-in Linear": rows_past_kv * hidden * intermediate, "FFN-out Linear": rows_past_kv * intermediate * hidden}


def forward_macs(seq: int = 128, first_rows_last: bool = True) -> int:
    """Binary MACs of one BERT-base forward of `seq` tokens (step_macs)."""
    return sum(step_macs(rows=seq, first_rows_last=first_rows_last).values())


def step_library(csrc: Path) -> Path:
    """A profiling build of the library from the C sources in csrc (its .c files and isa/*.c, the
    flags of setup.py) with -DBB_STEP_TIMES: the forward records each step's time (bb_step_times)."""
    compiler = os.environ.get("CC", "cc")
    sources = sorted(csrc.glob("*.c")) + sorted(csrc.glob("isa/*.c"))
    flags = ["-O3", "-std=gnu11", "-pthread", "-fno-strict-aliasing", "-ffp-contract=off", "-fPIC", "-shared",
             "-DBB_STEP_TIMES"]
    digest = hashlib.sha256(" ".join([compiler, *flags]).encode())
    for path in sorted(csrc.glob("*.[ch]")) + sorted(csrc.glob("isa/*.[ch]")):
        digest.update(path.name.encode() + path.read_bytes())
    target = BUILD / f"bitkernels-steps-{digest.hexdigest()[:12]}.so"
    if not target.exists():
        BUILD.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        subprocess.run([compiler, *flags, "-o", str(tmp), *map(str, sources)], check=True)
        os.replace(tmp, target)
    return target


def cpu_name() -> str:
    """The CPU's model name with its family and model numbers (/proc/cpuinfo; the name alone
    where those are not there), e.g. "AMD EPYC (family 25, model 17)"."""
    from bibert.packed import tuning

    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = tuning.cpu_model()
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def sources_at(ref: str, into: Path) -> Path:
    """The C sources of the engine at git commit `ref`, extracted into a folder."""
    repo = CSRC.parent.parent.parent
    archive = subprocess.run(["git", "-C", str(repo), "archive", ref, "src/bibert/csrc"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into / "src" / "bibert" / "csrc"


def steps_main(argv=None) -> int:
    import argparse
    import json
    import statistics
    import sys
    import tempfile

    import native_ab

    ap = argparse.ArgumentParser(description="Where the time of a packed 1-1-1 BERT-base forward goes (batch 1, "
                                 "128 tokens, one thread), step by step, against the popcount ceiling; with "
                                 "--against, the same for the engine's sources at another commit, interleaved.")
    ap.add_argument("--steps", action="store_true", required=True)
    ap.add_argument("--against", metavar="REF", help="a git commit whose sources to profile too (the 'before')")
    ap.add_argument("--rounds", type=int, default=60, help="forwards of each build (interleaved)")
    ap.add_argument("--cache", type=Path, help="a folder that keeps the built model between runs")
    ap.add_argument("--out", type=Path, default=RESULTS / "roofline_steps.json")
    args = ap.parse_args(argv)
    load_start = os.getloadavg()[0]
    result = {"command": "python benchmarks/" + Path(__file__).name + " " + " ".join(argv or sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d"), "cpu": cpu_name(), "cores": os.cpu_count(),
              "rounds": args.rounds, "builds": {}}
    with tempfile.TemporaryDirectory(prefix="bibert-steps-") as tmp:
        builds, first_rows_last = {}, {}
        if args.against:
            csrc = sources_at(args.against, Path(tmp))
            builds[f"at {args.against}"] = step_library(csrc)
            # sources from before the last layer computed the first rows only compute every row
            first_rows_last[f"at {args.against}"] = "first_rows_last" in (csrc / "encoder.c").read_text()
        builds["this tree"] = step_library(CSRC)
        first_rows_last["this tree"] = True
        folder = args.cache or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        model = native_ab.build_model(folder, "1-1-1")
        workers = {name: native_ab.Worker(str(lib), model) for name, lib in builds.items()}
        try:
            for w in workers.values():
                result["kernel"] = w.ask(op="family", family="auto")["kernel"]
                w.ask(op="inputs", batch=1, seq=128, seed=1)
                w.ask(op="forward")  # warm-up
            runs = {name: [] for name in workers}
            ceilings = []
            for i in range(args.rounds):
                order = list(workers.items())
                for name, w in (order if i % 2 == 0 else order[::-1]):
                    runs[name].append(w.ask(op="forward"))
                if i % 4 == 0:
                    ceilings.append(next(iter(workers.values())).ask(op="ceiling", seconds=0.02)["macs_per_s"])
        finally:
            for w in workers.values():
                w.close()
    roof = statistics.median(ceilings)
    result["ceiling_tmacs"] = round(roof / 1e12, 3)
    for name, forwards in runs.items():
        macs = step_macs(first_rows_last=first_rows_last[name])
        # Under load the steps' wall times include preemptions, each landing in one step of a forward:
        # a step's low quantile over the forwards (the 20th percentile) is its time without one. The
        # native call's median CPU time is shared out in proportion to those; the Python side is the
        # forward's CPU time less the native call's (median).
        quantile = [statistics.quantiles([f["steps_ns"][s] for f in forwards], n=5)[0] for s in range(len(STEPS))]
        native_ms = statistics.median(f["native_cpu_ms"] for f in forwards)
        python_ms = statistics.median(f["cpu_ms"] - f["native_cpu_ms"] for f in forwards)
        cpu_ms = native_ms + python_ms
        rows = []
        for s, step in enumerate(STEPS):
            ms = native_ms * quantile[s] / sum(quantile)
            row = {"step": step, "ms": round(ms, 3)}
            if step in macs:
                ideal = macs[step] / roof * 1e3
                row.update(gmacs=round(macs[step] / 1e9, 3), ceiling_pct=round(100 * ideal / ms, 1) if ms else None,
                           over_ceiling_ms=round(ms - ideal, 3))
            else:
                row["over_ceiling_ms"] = round(ms, 3)
            rows.append(row)
        rows.append({"step": "outside the native call (Python)", "ms": round(python_ms, 3),
                     "over_ceiling_ms": round(python_ms, 3)})
        total = sum(r["ms"] for r in rows)
        for r in rows:
            r["share_pct"] = round(100 * r["ms"] / total, 1)
        result["builds"][name] = {"gmacs": round(sum(macs.values()) / 1e9, 3), "cpu_ms": round(cpu_ms, 3),
                                  "ceiling_pct": round(100 * sum(macs.values()) / roof / (cpu_ms / 1e3), 1),
                                  "ideal_ms": round(sum(macs.values()) / roof * 1e3, 3), "steps": rows}
    result["load_average"] = [round(load_start, 2), round(os.getloadavg()[0], 2)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    args.out.with_suffix(".md").write_text(steps_markdown(result))
    print(steps_markdown(result))
    return 0


def steps_markdown(r: dict) -> str:
    names = list(r["builds"])
    lines = ["# Where a packed 1-1-1 forward's time goes, against the popcount ceiling", "",
             f"`{r['command'].strip()}`, {r['date']}. Host: {r['cpu']}, {r['cores']} cores; kernel family "
             f"{r['kernel']}; load average {r['load_average'][0]} at the start, {r['load_average'][1]} at the end. "
             "BERT-base shape, batch 1, 128 tokens, one thread, a profiling build of the library (-DBB_STEP_TIMES: "
             "each step of bb_forward timed with the monotonic clock); "
             f"{r['rounds']} forwards of each build, builds interleaved. A step's share: its 20th percentile over the "
             "forwards (under load a preemption lands in one step of a forward and inflates its wall time) against "
             "the sum of all steps' 20th percentiles; its time: that share of the native call's median CPU time. "
             "The Python side: the forward's CPU time less the native call's (median). Ceiling: the active family's "
             "register-only XOR + popcount + add loop on one core, CPU time: "
             f"{r['ceiling_tmacs']} T binary MAC/s. 'Over the ceiling': the step's time less the time its "
             "binary MACs take at the ceiling (all of it for a step without binary MACs). Binary MACs a forward "
             "computes: " + ", ".join(f"{b['gmacs']} G for {n}" for n, b in r["builds"].items())
             + " (11.17 G in the whole model; a forward without hidden states needs the last layer's first row only "
             "past its keys and values).", ""]
    head = "| step |" + "".join(f" {n} ms | share | % of ceiling | over the ceiling ms |" for n in names)
    lines += [head, "|---|" + "---|---|---|---|" * len(names)]
    for i, row in enumerate(r["builds"][names[0]]["steps"]):
        cells = []
        for n in names:
            s = r["builds"][n]["steps"][i]
            pct = f"{s['ceiling_pct']}%" if s.get("ceiling_pct") is not None else "-"
            cells.append(f" {s['ms']} | {s['share_pct']}% | {pct} | {s['over_ceiling_ms']} |")
        lines.append(f"| {row['step']} |" + "".join(cells))
    lines.append("| whole forward (CPU time) |" + "".join(
        f" {r['builds'][n]['cpu_ms']} | 100% | {r['builds'][n]['ceiling_pct']}% | "
        f"{round(r['builds'][n]['cpu_ms'] - r['builds'][n]['ideal_ms'], 3)} |" for n in names))
    lines += ["", "88% of the ceiling (the binary MACs a build computes at the ceiling, divided by 0.88) would be "
              + "; ".join(f"{round(b['ideal_ms'] / 0.88, 2)} ms for {n}, {round(b['cpu_ms'] - b['ideal_ms'] / 0.88, 2)} "
                          "ms less than it took" for n, b in r["builds"].items()) + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(steps_main())
