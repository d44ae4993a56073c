"""Two builds of the native library on the same packed model, interleaved: CPU time and share
of the popcount ceiling end to end, per kernel family and batch size.

The model is a BERT-base shape packed 1-1-1 student with random weights (latency does not
depend on their values), or with --models any of 1-1-1, 1-1-2, 1-1-4, 1-1-2-softmax and
1-1-4-softmax (2- and 4-bit activations, Bi-Attention or softmax attention), sequences of 128
tokens, one thread. Each library runs in its own
worker process (BIBERT_NATIVE_LIB); the workers take turns call by call, so that noise from a
shared machine hits both alike, and each call's CPU time is the worker thread's, which other
processes on the core do not inflate. The popcount ceiling (the register-only XOR + popcount
+ add loop of the active kernel family, one core) is measured in CPU time too, in every round.
The workers also compare their outputs: the logits (with and without the hidden states asked for)
and every hidden state must be bit-identical.

    python benchmarks/native_ab.py --baseline old/_bitkernels.so            # against the installed build
    python benchmarks/native_ab.py --baseline old.so --candidate new.so --families avx512 avx2 portable
    python benchmarks/native_ab.py --baseline old.so --models 1-1-1 1-1-2 1-1-4-softmax --cache /tmp/ab-models

A baseline of another ABI runs with the bibert package it was built with (its ctypes bindings and
engine), given as a source folder: --baseline-src old-checkout/src. The comparison is then of the
whole forward, Python included, as the two versions run it.
"""
from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SHAPE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)


MODELS = ("1-1-1", "1-1-2", "1-1-4", "1-1-2-softmax", "1-1-4-softmax")


def build_model(workdir: Path, name: str = "1-1-1") -> Path:
    """The packed file of the model `name` (MODELS) in workdir (kept there: built once)."""
    path = workdir / f"student-{name}.bibert"
    if path.exists():
        return path
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from bibert import QuantConfig
    from bibert.modeling import binarize
    from bibert.packed import export_packed

    bits = int(name.split("-")[2])
    quant = QuantConfig(1, 1, bits, "softmax") if name.endswith("softmax") else QuantConfig(1, 1, bits)
    torch.manual_seed(0)
    hf = BertForSequenceClassification(BertConfig(**SHAPE, num_labels=2, attn_implementation="eager")).eval()
    folder = workdir / f"student-{name}"
    binarize(hf, quant).save_pretrained(folder)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(hf.config.vocab_size - 5)]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    export_packed(folder, path)
    return path


def worker(model: str) -> None:
    """Reads commands from stdin, one JSON object a line; answers one JSON line each."""
    import numpy as np
    from roofline import Ceiling

    from bibert.packed import kernels, load_packed

    engine = load_packed(model, threads=1)
    inputs = {}

    step_fn = getattr(kernels.lib(), "bb_step_times", None)  # a profiling build (roofline.py --steps)
    native = {}
    if step_fn is not None:  # the native call's own CPU and wall time too, around bb_forward
        class Timed:
            def __init__(self, lib):
                self._lib = lib

            def __getattr__(self, name):
                return getattr(self._lib, name)

            def bb_forward(self, *args):
                t, wall = time.thread_time(), time.perf_counter()
                rc = self._lib.bb_forward(*args)
                native.update(cpu_ms=(time.thread_time() - t) * 1e3, wall_ms=(time.perf_counter() - wall) * 1e3)
                return rc

        kernels._lib = Timed(kernels.lib())

    def step_times():
        """The nanoseconds of each forward step since the last call (a profiling build only, else None)."""
        if step_fn is None:
            return None
        out = (ctypes.c_int64 * 32)()
        n = step_fn(out, 32)
        return list(out[:n])
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "family":
            kernels.set_kernel(cmd["family"])
            from bibert.packed import tuning
            tuning.tune_host(engine.hidden, engine.intermediate)
            answer = {"kernel": kernels.get_kernel()}
        elif cmd["op"] == "inputs":
            rng = np.random.default_rng(cmd["seed"])
            ids = rng.integers(5, 30000, (cmd["batch"], cmd["seq"])).astype(np.int64)
            ids[:, 0] = 2
            inputs = {"ids": ids, "mask": np.ones_like(ids)}
            logits, hidden = engine.forward(inputs["ids"], inputs["mask"], output_hidden_states=True)
            digest = hashlib.sha256(logits.tobytes())
            for h in hidden:
                digest.update(h.tobytes())
            digest.update(engine.forward(inputs["ids"], inputs["mask"]).tobytes())  # the logits without hidden states
            answer = {"digest": digest.hexdigest()}
        elif cmd["op"] == "forward":
            steps = step_times()  # a profiling build (roofline.py --steps): its steps start from zero
            t, wall = time.thread_time(), time.perf_counter()
            engine.forward(inputs["ids"], inputs["mask"])
            answer = {"cpu_ms": (time.thread_time() - t) * 1e3, "wall_ms": (time.perf_counter() - wall) * 1e3}
            if steps is not None:
                answer.update(steps_ns=step_times(), native_cpu_ms=native["cpu_ms"], native_wall_ms=native["wall_ms"])
        elif cmd["op"] == "ceiling":  # about cmd["seconds"] of the loop
            ceiling = Ceiling(kernels.get_kernel())
            iters = 1 << 12
            while True:
                t = time.thread_time()
                macs = ceiling.run(iters)
                dt = time.thread_time() - t
                if dt >= cmd["seconds"] / 4:
                    break
                iters *= 4
            answer = {"macs_per_s": macs / dt}
        else:
            break
        print(json.dumps(answer), flush=True)


class Worker:
    def __init__(self, library: str | None, model: Path, src: Path | None = None):
        env = dict(os.environ, BIBERT_THREADS="1")
        if src:  # the bibert package this library goes with (its ctypes bindings and engine)
            env["PYTHONPATH"] = os.pathsep.join([str(Path(src).resolve()), env.get("PYTHONPATH", "")])
        if library:
            env["BIBERT_NATIVE_LIB"] = str(Path(library).resolve())
        else:
            env.pop("BIBERT_NATIVE_LIB", None)
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", str(model)], env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def ask(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("a worker stopped (see its error above)")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def markdown(r: dict) -> str:
    lines = [f"# Native library A/B ({r['baseline']} -> {r['candidate']})", "",
             f"`{r['command']}`, {r['date']}. Host: {r['cpu']}, {r['cores']} cores; load average "
             f"{r['load_average'][0]} at the start, {r['load_average'][1]} at the end. BERT-base shape packed "
             f"{', '.join(r.get('models', ['1-1-1']))}, sequences of {r['seq']} tokens, one thread; medians of "
             f"{r['rounds']} interleaved rounds of CPU time per forward. Ceiling: the family's popcount loop on one "
             f"core, CPU time, median of the rounds (the share of it: 1-1-1 only, by the binary MACs this version "
             f"computes, {r.get('gmacs', 11.17)} G a sequence; a build from before the last layer computed the first "
             f"rows only computes 11.17 G). "
             f"Outputs: the logits (with and without the hidden states asked for) and every hidden state of the two "
             "builds.", "",
             "| model | family | batch | ceiling T MAC/s | baseline CPU ms | candidate CPU ms | ratio | baseline % of "
             "ceiling | candidate % of ceiling | outputs |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        pct = (lambda k: f"{row[k]}%" if row.get(k) is not None else "-")
        lines.append(f"| {row.get('model', '1-1-1')} | {row['family']} | {row['batch']} | {row['ceiling_tmacs']} | "
                     f"{row['baseline_ms']} | {row['candidate_ms']} | {row['ratio']} | {pct('baseline_pct')} | "
                     f"{pct('candidate_pct')} | {'bit-identical' if row['identical'] else 'DIFFER'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", required=True, help="the library to compare against")
    ap.add_argument("--candidate", help="the library to measure (default: the installed build)")
    ap.add_argument("--baseline-src", type=Path,
                    help="the source folder (holding bibert/) of the package the baseline library belongs to, when "
                         "its Python side differs (another ABI); default: the package this script imports")
    ap.add_argument("--labels", nargs=2, metavar=("BASELINE", "CANDIDATE"), help="names of the two builds in the report")
    ap.add_argument("--families", nargs="+", default=["auto"], help="kernel families (auto, avx512, avx2, portable)")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--models", nargs="+", default=["1-1-1"], choices=MODELS,
                    help="packed models to run (bits; -softmax: softmax attention)")
    ap.add_argument("--cache", type=Path, help="a folder that keeps the built models between runs")
    ap.add_argument("--out", type=Path, default=RESULTS / "native_ab.json")
    args = ap.parse_args(argv)
    from bibert.packed import tuning

    load_start = os.getloadavg()[0]
    result = {"command": "python benchmarks/" + Path(__file__).name + " " + " ".join(argv or sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d"), "cpu": tuning.cpu_model(), "cores": os.cpu_count(),
              "baseline": args.labels[0] if args.labels else Path(args.baseline).name,
              "candidate": args.labels[1] if args.labels else Path(args.candidate).name if args.candidate else
              "installed build", "seq": args.seq, "rounds": args.rounds, "models": args.models, "rows": []}
    from roofline import forward_macs
    result["gmacs"] = round(forward_macs(args.seq) / 1e9, 2)
    with tempfile.TemporaryDirectory(prefix="bibert-native-ab-") as tmp:
        folder = args.cache or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for name in args.models:
            run_model(args, result, name, build_model(folder, name))
    result["load_average"] = [round(load_start, 2), round(os.getloadavg()[0], 2)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0 if all(row["identical"] for row in result["rows"]) else 1


def run_model(args, result: dict, name: str, model: Path) -> None:
    """The rows of one model: each family and batch, the two builds interleaved."""
    from roofline import forward_macs
    base, cand = Worker(args.baseline, model, args.baseline_src), Worker(args.candidate, model)
    try:
        for family in args.families:
            kernel = base.ask(op="family", family=family)["kernel"]
            cand.ask(op="family", family=family)
            for batch in args.batches:
                same = (base.ask(op="inputs", batch=batch, seq=args.seq, seed=batch)["digest"]
                        == cand.ask(op="inputs", batch=batch, seq=args.seq, seed=batch)["digest"])
                times = {"baseline": [], "candidate": []}
                ceilings = []
                for w in (base, cand):  # warm-up
                    w.ask(op="forward")
                for i in range(args.rounds):
                    order = ((base, "baseline"), (cand, "candidate"))
                    for w, build in (order if i % 2 == 0 else order[::-1]):
                        times[build].append(w.ask(op="forward")["cpu_ms"])
                    ceilings.append(cand.ask(op="ceiling", seconds=0.02)["macs_per_s"])
                roof = statistics.median(ceilings)
                macs = forward_macs(args.seq) * batch  # as this engine computes them (roofline.step_macs)
                med = {k: statistics.median(v) for k, v in times.items()}
                share = (lambda ms: round(100 * macs / (ms / 1e3) / roof, 1) if name == "1-1-1" else None)
                row = {"model": name, "family": kernel, "batch": batch, "ceiling_tmacs": round(roof / 1e12, 3),
                       "baseline_ms": round(med["baseline"], 2), "candidate_ms": round(med["candidate"], 2),
                       "ratio": round(med["candidate"] / med["baseline"], 3),
                       "baseline_pct": share(med["baseline"]), "candidate_pct": share(med["candidate"]),
                       "identical": same}
                result["rows"].append(row)
                print(row, flush=True)
    finally:
        base.close()
        cand.close()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(sys.argv[2])
    else:
        sys.exit(main())
