"""A trained student against its packed file: identical predictions on a task's split, and the
packed file's latency against another packed file (interleaved rounds, medians and ratios).

Both sides get the same token ids (the packed file's tokenizer, the task's max length, batches
of 64), so that the comparison is of the models alone: the simulated student (PyTorch, float32)
and the bitwise engine.

    python benchmarks/packed_agreement.py --student runs/student/best --task rotten_tomatoes \
        [--split test] [--versus runs/other/best] [--rounds 15] [--threads 1] [--out result.json]

--versus exports a second student folder (e.g. an elastic "bi" student of the same shape) and
times both files on the split's first sentences, batch 1 and batch 32, alternating the files
within every round; the machine's other load hits both alike.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bibert.data import load_examples
from bibert.modeling import BiBertForSequenceClassification
from bibert.packed import export_packed, kernels, load_packed
from bibert.tasks import get_task


def encode(tokenizer, examples, max_length: int, batch: int):
    for s in range(0, len(examples), batch):
        part = examples[s:s + batch]
        pairs = [e.text_b for e in part] if part[0].text_b is not None else None
        enc = tokenizer([e.text_a for e in part], pairs, truncation=True, max_length=max_length, padding=True,
                        return_tensors="np")
        types = enc.get("token_type_ids")
        yield enc["input_ids"], enc["attention_mask"], np.zeros_like(enc["input_ids"]) if types is None else types


def agreement(student, engine, examples, max_length: int) -> dict:
    packed_ids, student_ids, gold = [], [], np.array([e.label for e in examples])
    largest = 0.0
    for ids, mask, types in encode(engine.tokenizer, examples, max_length, 64):
        got = engine.forward(ids, mask, types)
        with torch.no_grad():
            want = student(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(types)).logits.numpy()
        packed_ids.append(got.argmax(1))
        student_ids.append(want.argmax(1))
        largest = max(largest, float(np.abs(got - want).max()))
    packed_ids, student_ids = np.concatenate(packed_ids), np.concatenate(student_ids)
    return {"examples": len(examples), "agreement": float(np.mean(packed_ids == student_ids)),
            "disagreements": int(np.sum(packed_ids != student_ids)),
            "packed_accuracy": float(np.mean(packed_ids == gold)), "student_accuracy": float(np.mean(student_ids == gold)),
            "largest_logit_difference": largest}


def interleaved_latency(engines: dict, examples, max_length: int, rounds: int, sentences: int) -> dict:
    """Per file and batch size: median seconds per sentence over `rounds` interleaved rounds,
    wall clock and the calling thread's CPU time (with one kernel thread, the engine runs on the
    calling thread: its CPU time leaves out the time the machine's other load takes)."""
    result = {}
    for batch in (1, 32):
        inputs = list(encode(next(iter(engines.values())).tokenizer, examples[:sentences], max_length, batch))
        for engine in engines.values():  # warm-up
            for ids, mask, types in inputs[:3]:
                engine.forward(ids, mask, types)
        times = {name: [] for name in engines}
        cpu = {name: [] for name in engines}
        for r in range(rounds):
            order = list(engines) if r % 2 == 0 else list(engines)[::-1]
            for name in order:
                t0, c0 = time.perf_counter(), time.thread_time()
                for ids, mask, types in inputs:
                    engines[name].forward(ids, mask, types)
                cpu[name].append((time.thread_time() - c0) / sentences)
                times[name].append((time.perf_counter() - t0) / sentences)
        medians = {name: statistics.median(v) for name, v in times.items()}
        cpu_medians = {name: statistics.median(v) for name, v in cpu.items()}
        first, second = list(engines)
        result[f"batch {batch}"] = {
            "median_ms_per_sentence": {name: 1e3 * m for name, m in medians.items()},
            "ratio": medians[first] / medians[second],
            "round_ratios": [a / b for a, b in zip(times[first], times[second])],
            "median_cpu_ms_per_sentence": {name: 1e3 * m for name, m in cpu_medians.items()},
            "cpu_ratio": cpu_medians[first] / cpu_medians[second],
        }
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--student", type=Path, required=True, help="a student folder (save_pretrained)")
    ap.add_argument("--task", required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--versus", type=Path, help="a second student folder to time against")
    ap.add_argument("--no-agreement", action="store_true", help="time only")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--sentences", type=int, default=256, help="sentences per timed pass")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    task = get_task(args.task)
    examples = load_examples(task, args.split)
    with tempfile.TemporaryDirectory() as tmp:
        report = export_packed(args.student, Path(tmp) / "student.bibert")
        print(report)
        engine = load_packed(report.path, threads=args.threads)
        student = BiBertForSequenceClassification.from_pretrained(args.student).eval()
        summary = {"student": str(args.student), "task": task.name, "split": args.split,
                   "quantization": student.quant.to_dict(), "kernel": kernels.get_kernel(), "threads": args.threads}
        if not args.no_agreement:
            summary["agreement"] = agreement(student, engine, examples, task.max_length)
            print(json.dumps(summary["agreement"], indent=2))
        if args.versus:
            other = export_packed(args.versus, Path(tmp) / "versus.bibert")
            engines = {"student": engine, "versus": load_packed(other.path, threads=args.threads)}
            summary["versus"] = str(args.versus)
            summary["latency"] = interleaved_latency(engines, examples, task.max_length, args.rounds, args.sentences)
            for setting, r in summary["latency"].items():
                ms = r["median_ms_per_sentence"]
                print(f"{setting}: {ms['student']:.3f} ms vs {ms['versus']:.3f} ms per sentence, "
                      f"ratio {r['ratio']:.3f} (round ratios {min(r['round_ratios']):.3f} to "
                      f"{max(r['round_ratios']):.3f}); CPU time ratio {r['cpu_ratio']:.3f}")
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
