"""The packed engine against the engines a user would pick instead, interleaved in one run.

Variants (BERT-base shape, random weights: latency does not depend on their values):

    packed 1-1-1         this engine, sign activations (bibert.packed)
    packed elastic       this engine, elastic binarization (thresholds and scales)
    packed 1-1-2/1-1-4   this engine, 2- and 4-bit activations, bit-serially, Bi-Attention
    packed 1-1-k softmax the same with softmax attention (the accurate students on sentence pairs)
    ort fp32             ONNX Runtime, all graph optimizations
    ort int8 dynamic     ONNX Runtime, dynamic int8 quantization of the MatMuls
    openvino fp32        OpenVINO, f32 inference precision
    openvino int8        OpenVINO with NNCF post-training int8 quantization

The peers come with the optional `bench` extra (`pip install -e .[bench]`); a peer that is
not installed, or that fails to build, is left out and says why. Each setting (batch, threads)
times every variant once per round, rounds interleaved, so that noise from a shared machine
hits them alike; the table has medians. The popcount ceiling of the host is measured in the
same run (a register-only XOR + popcount + add loop, one core, the active kernel family), and
the 1-1-1 rows say which share of it the engine reaches end to end.

    python benchmarks/engines.py                  # writes benchmarks/results/engines.json and .md
    python benchmarks/engines.py --quick          # fewer rounds, batch 1 only
    python benchmarks/engines.py --threads 1 --variants "packed" "openvino int8"   # only those rows
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import BertConfig, BertForSequenceClassification

from bibert import QuantConfig
from bibert.modeling import binarize
from bibert.packed import export_packed, kernels, load_packed, tuning
from roofline import forward_macs, popcount_roofline

RESULTS = Path(__file__).resolve().parent / "results"
SHAPE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)


def cpu_description() -> dict:
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line
                break
    except OSError:
        pass
    wanted = ("avx512f", "avx512_vpopcntdq", "avx512_vnni", "avx512_bf16", "avx2", "amx_tile")
    return {"model": tuning.cpu_model(), "cores": os.cpu_count(), "flags": [f for f in wanted if f" {f}" in flags],
            "kernel": kernels.get_kernel()}


def words(n: int) -> list[str]:
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(n - 5)]


PACKED = (("packed 1-1-1", QuantConfig()), ("packed elastic", QuantConfig(activations="elastic")),
          ("packed 1-1-2", QuantConfig(1, 1, 2)), ("packed 1-1-2 softmax", QuantConfig(1, 1, 2, "softmax")),
          ("packed 1-1-4", QuantConfig(1, 1, 4)), ("packed 1-1-4 softmax", QuantConfig(1, 1, 4, "softmax")))
PEERS = ("ort fp32", "ort int8 dynamic", "openvino fp32", "openvino int8")


def selector(prefixes: list[str] | None):
    """Whether a variant is asked for: every one without --variants, else those whose name
    starts with one of the prefixes."""
    return lambda name: not prefixes or any(name.startswith(p) for p in prefixes)


def build_packed(workdir: Path, hf, wanted=selector(None)) -> dict[str, Path]:
    """The packed files of the students of one teacher that are asked for."""
    out = {}
    vocab = "\n".join(words(hf.config.vocab_size)) + "\n"
    for name, quant in PACKED:
        if not wanted(name):
            continue
        student = binarize(hf, quant)
        if quant.elastic:
            with torch.no_grad():
                for pname, p in student.named_parameters():
                    if pname.endswith("quantizer.threshold"):
                        p.normal_(0, 0.05)
        folder = workdir / name.replace(" ", "_")
        student.save_pretrained(folder)
        (folder / "vocab.txt").write_text(vocab)
        export_packed(folder, workdir / f"{folder.name}.bibert")
        out[name] = workdir / f"{folder.name}.bibert"
    return out


def onnx_file(hf, workdir: Path) -> Path:
    path = workdir / "bert.onnx"
    ids = torch.ones((1, 128), dtype=torch.int64)
    torch.onnx.export(hf, (ids, torch.ones_like(ids)), str(path), input_names=["input_ids", "attention_mask"],
                      output_names=["logits"], dynamic_axes={n: {0: "batch", 1: "seq"} for n in
                                                             ("input_ids", "attention_mask")},
                      opset_version=17, dynamo=False)
    return path


def peers(hf, workdir: Path, threads: int, wanted=selector(None)) -> tuple[dict, dict, dict]:
    """The peer engines' callables for this thread count (those asked for), their file sizes, and
    why any is missing."""
    fns, sizes, missing = {}, {}, {}
    if not any(wanted(name) for name in PEERS):
        return fns, sizes, missing
    try:
        import onnxruntime as ort
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as exc:
        missing["ort"] = f"not installed ({exc.name}); pip install -e .[bench]"
        ort = None
    try:
        import openvino as ov
    except ImportError as exc:
        missing["openvino"] = f"not installed ({exc.name}); pip install -e .[bench]"
        ov = None
    if ort is None and ov is None:
        return fns, sizes, missing
    model = workdir / "bert.onnx"
    if not model.exists():
        try:
            onnx_file(hf, workdir)
        except Exception as exc:  # an exporter that cannot run here
            missing["onnx export"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            return fns, sizes, missing
    sizes["onnx fp32"] = model.stat().st_size
    if ort is not None:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if wanted("ort fp32"):
            fp32 = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
            fns["ort fp32"] = lambda ids, mask, s=fp32: s.run(None, {"input_ids": ids, "attention_mask": mask})[0]
        q = workdir / "bert.int8.onnx"
        if not wanted("ort int8 dynamic"):
            pass
        elif not q.exists():
            quantize_dynamic(str(model), str(q), weight_type=QuantType.QInt8,
                             extra_options={"DefaultTensorType": 1})  # FLOAT
        if wanted("ort int8 dynamic"):
            sizes["ort int8 dynamic"] = q.stat().st_size
            int8 = ort.InferenceSession(str(q), opts, providers=["CPUExecutionProvider"])
            fns["ort int8 dynamic"] = lambda ids, mask, s=int8: s.run(None, {"input_ids": ids,
                                                                             "attention_mask": mask})[0]
    if ov is not None:
        core = ov.Core()
        config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
        if wanted("openvino fp32"):
            f32 = core.compile_model(str(model), "CPU", config)
            fns["openvino fp32"] = lambda ids, mask, m=f32: m({"input_ids": ids, "attention_mask": mask})[0]
        qpath = workdir / "bert.ov-int8.xml"
        try:
            if not wanted("openvino int8"):
                raise LookupError
            if not qpath.exists():
                import nncf

                rng = np.random.default_rng(0)
                samples = [{"input_ids": rng.integers(5, hf.config.vocab_size, (1, 128)).astype(np.int64),
                            "attention_mask": np.ones((1, 128), np.int64)} for _ in range(16)]
                quantized = nncf.quantize(core.read_model(str(model)), nncf.Dataset(samples),
                                          model_type=nncf.ModelType.TRANSFORMER, subset_size=16)
                ov.save_model(quantized, str(qpath))
            sizes["openvino int8"] = qpath.stat().st_size + qpath.with_suffix(".bin").stat().st_size
            i8 = core.compile_model(str(qpath), "CPU", {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"})
            fns["openvino int8"] = lambda ids, mask, m=i8: m({"input_ids": ids, "attention_mask": mask})[0]
        except LookupError:  # not asked for
            pass
        except ImportError as exc:
            missing["openvino int8"] = f"not installed ({exc.name}); pip install -e .[bench]"
        except Exception as exc:
            missing["openvino int8"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    return fns, sizes, missing


def time_round_robin(fns: dict, ids: np.ndarray, mask: np.ndarray, rounds: int, pause: float) -> dict:
    """Per variant over `rounds` rounds (one call of each variant per round): the median and
    best wall-clock ms, and the median CPU ms of the process (on a shared machine the CPU time
    of a one-thread call is what the call costs, whatever else the scheduler runs). Each round
    starts one variant further down the list: a call that follows another engine finds the
    caches full of that engine's data, so no variant is always the one to follow a given one
    (in a fixed order, packed 1-1-1, always after OpenVINO int8, took 11.7 CPU ms at batch 1,
    the elastic model after it 10.8)."""
    times = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    for fn in fns.values():  # warm-up
        fn(ids, mask)
    names = list(fns)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn = fns[name]
            if pause:
                time.sleep(pause)
            c = time.process_time()
            t = time.perf_counter()
            fn(ids, mask)
            times[name].append((time.perf_counter() - t) * 1e3)
            cpu[name].append((time.process_time() - c) * 1e3)
    return {k: {"ms": round(statistics.median(v), 2), "ms_min": round(min(v), 2),
                "cpu_ms": round(statistics.median(cpu[k]), 2)} for k, v in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds, batch 1 only")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--pause", type=float, default=0.02, help="idle seconds before each timed call")
    ap.add_argument("--out", type=Path, default=RESULTS / "engines.json")
    ap.add_argument("--variants", nargs="+", metavar="PREFIX",
                    help="only the variants whose name starts with one of these (e.g. 'packed 1-1' 'openvino int8'); "
                         "the ratios need 'packed 1-1-1'")
    args = ap.parse_args(argv)
    wanted = selector(args.variants)
    rounds = args.rounds or (5 if args.quick else 11)
    batches = [1] if args.quick else args.batches
    torch.set_num_threads(1)
    kernels.lib()
    kernels.set_threads(1)
    roof_before = popcount_roofline(1.0)
    load_before = os.getloadavg()[0]
    result = {"command": "python benchmarks/" + Path(__file__).name + " " + " ".join(argv or sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d"), "machine": {**cpu_description(), "python": platform.python_version(),
                                                             "torch": torch.__version__},
              "seq": args.seq, "rounds": rounds, "rows": [], "sizes": {}, "missing": {}}
    with tempfile.TemporaryDirectory(prefix="bibert-engines-") as tmp:
        workdir = Path(tmp)
        torch.manual_seed(0)
        hf = BertForSequenceClassification(BertConfig(**SHAPE, num_labels=2, attn_implementation="eager")).eval()
        packed_files = build_packed(workdir, hf, wanted)
        result["sizes"] = {name: path.stat().st_size for name, path in packed_files.items()}
        engines = {name: load_packed(path) for name, path in packed_files.items()}
        rng = np.random.default_rng(0)
        for threads in args.threads:
            peer_fns, peer_sizes, missing = peers(hf, workdir, threads, wanted)
            result["sizes"].update(peer_sizes)
            result["missing"].update(missing)

            def packed_fn(engine, threads=threads):
                def run(ids, mask):
                    kernels.set_threads(threads)
                    return engine.forward(ids, mask)
                return run

            fns = {name: packed_fn(e) for name, e in engines.items()}
            fns.update(peer_fns)
            for batch in batches:
                ids = rng.integers(5, hf.config.vocab_size, (batch, args.seq)).astype(np.int64)
                ids[:, 0] = 2
                mask = np.ones_like(ids)
                timed = time_round_robin(fns, ids, mask, rounds, args.pause)
                for name, t in timed.items():
                    row = {"variant": name, "batch": batch, "threads": threads, **t}
                    result["rows"].append(row)
                print(f"batch {batch} threads {threads}: " + ", ".join(f"{k} {v['ms']}" for k, v in timed.items()),
                      flush=True)
            del peer_fns, fns
        # a batch of mixed lengths costs what its tokens cost (padded positions are not computed)
        kernels.set_threads(1)
        e = engines.get("packed 1-1-1")
        if e is not None:
            lengths = [128, 96, 64, 32, 128, 16, 80, 48]
            ids = rng.integers(5, hf.config.vocab_size, (8, 128)).astype(np.int64)
            mask = (np.arange(128)[None] < np.array(lengths)[:, None]).astype(np.int64)
            full = np.ones_like(mask)
            mixed = time_round_robin({"mixed": lambda i, m: e.forward(i, m), "full": lambda i, m: e.forward(i, full)},
                                     ids, mask, rounds, args.pause)
            result["mixed_batch"] = {"lengths": lengths, "tokens_share": round(sum(lengths) / (8 * 128), 3),
                                     "ms_mixed": mixed["mixed"]["ms"], "ms_full": mixed["full"]["ms"],
                                     "time_share": round(mixed["mixed"]["ms"] / mixed["full"]["ms"], 3)}
    roof_after = popcount_roofline(1.0)
    roof = max(roof_before, roof_after)
    result["roofline_tmacs_1thread"] = round(roof / 1e12, 3)
    result["load_average"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    # the binary MACs the engine computes (the last layer past its keys and values on each sequence's
    # first row only), and the whole model's
    result["gmacs"] = [round(forward_macs(args.seq) / 1e9, 2), round(forward_macs(args.seq, False) / 1e9, 2)]
    for row in result["rows"]:
        if row["variant"] == "packed 1-1-1" and row["threads"] == 1:
            macs = forward_macs(args.seq) * row["batch"]
            row["roofline_share"] = round(macs / (row["ms"] / 1e3) / roof, 3)
            row["roofline_share_cpu"] = round(macs / (row["cpu_ms"] / 1e3) / roof, 3)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [f"# The packed engine against ONNX Runtime and OpenVINO (BERT-base shape, sequence {r['seq']})", "",
             f"`{r['command'].strip()}`, {r['date']}. Host: {m['model']}, {m['cores']} cores "
             f"({', '.join(m['flags'])}); kernel family {m['kernel']}; torch {m['torch']}. Popcount ceiling of one "
             f"core on this host, measured in the same run: {r['roofline_tmacs_1thread']} T binary MAC/s. Medians of "
             f"{r['rounds']} interleaved rounds, wall clock; the machine is shared (load average "
             f"{r['load_average'][0]} at the start, {r['load_average'][1]} at the end, on {m['cores']} cores), so the "
             "one-thread rows also give the median CPU time of each call, which the other processes do not inflate.",
             ""]
    variants = list(dict.fromkeys(row["variant"] for row in r["rows"]))
    settings = list(dict.fromkeys((row["batch"], row["threads"]) for row in r["rows"]))
    lines += ["| variant | " + " | ".join(f"batch {b}, {t} thr ms" for b, t in settings) + " | file MB |",
              "|---|" + "---|" * (len(settings) + 1)]
    table = {(row["variant"], row["batch"], row["threads"]): row for row in r["rows"]}
    base = {s: table[("packed 1-1-1",) + s]["ms"] for s in settings if ("packed 1-1-1",) + s in table}
    for v in variants:
        cells = []
        for s in settings:
            row = table.get((v,) + s)
            if row is None:
                cells.append("-")
                continue
            ratio = row["ms"] / base[s] if s in base else None
            extra = f" ({ratio:.1f}x)" if ratio and v != "packed 1-1-1" else ""
            cells.append(f"{row['ms']}{extra}")
        size = r["sizes"].get(v) or r["sizes"].get("onnx fp32" if v in ("ort fp32", "openvino fp32") else "")
        lines.append(f"| {v} | " + " | ".join(cells) + f" | {size / 1e6:.1f} |" if size else f"| {v} | "
                     + " | ".join(cells) + " | - |")
    lines += ["", "(x) = time relative to the packed 1-1-1 engine in the same setting.", "",
              "One thread, median CPU ms per call:", "",
              "| variant | " + " | ".join(f"batch {b}" for b, t in settings if t == 1) + " |",
              "|---|" + "---|" * sum(1 for _, t in settings if t == 1)]
    for v in variants:
        cells = []
        for b, t in settings:
            if t != 1:
                continue
            row = table.get((v, b, t))
            base_cpu = table.get(("packed 1-1-1", b, t))
            if row is None:
                cells.append("-")
                continue
            ratio = f" ({row['cpu_ms'] / base_cpu['cpu_ms']:.1f}x)" if base_cpu and v != "packed 1-1-1" else ""
            cells.append(f"{row['cpu_ms']}{ratio}")
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    shares = [row for row in r["rows"] if "roofline_share" in row]
    if shares:
        gmacs = r.get("gmacs", [11.17, 11.17])
        lines += ["", f"Packed 1-1-1, one thread, share of the popcount ceiling end to end ({gmacs[0]} G binary MACs "
                  f"computed per sequence, of the model's {gmacs[1]} G: without hidden states only the pooler reads the "
                  "last layer, whose rows but the first stop after their keys and values), by wall-clock median / by "
                  "CPU-time median: "
                  + ", ".join(f"batch {row['batch']}: {100 * row['roofline_share']:.0f}% / "
                              f"{100 * row['roofline_share_cpu']:.0f}% ({row['cpu_ms'] / row['batch']:.2f} CPU ms a "
                              "sequence)" for row in shares) + "."]
    goals = []
    for b, t in settings:
        ov, base_cpu = table.get(("openvino int8", b, t)), table.get(("packed 1-1-1", b, t))
        for v in variants:
            row = table.get((v, b, t))
            if t != 1 or row is None or not v.startswith("packed 1-1-4"):
                continue
            goals.append(f"batch {b}: {v} {row['cpu_ms'] / base_cpu['cpu_ms']:.2f}x the 1-1-1 time" if base_cpu
                         else f"batch {b}: {v}")
            if ov:
                goals[-1] += f", openvino int8 {ov['cpu_ms'] / row['cpu_ms']:.2f}x its time"
    if goals:
        lines += ["", "One thread, CPU time: " + "; ".join(goals) + "."]
    mb = r.get("mixed_batch")
    if mb:
        lines += ["", f"A batch of 8 of mixed lengths {mb['lengths']} ({100 * mb['tokens_share']:.0f}% of the "
                  f"positions are tokens): {mb['ms_mixed']} ms against {mb['ms_full']} ms for 8 x 128 tokens "
                  f"({100 * mb['time_share']:.0f}% of the time; padded positions are not computed)."]
    if r.get("missing"):
        lines += ["", "Left out: " + "; ".join(f"{k}: {v}" for k, v in r["missing"].items()) + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
