"""Why does a student sit at the majority class? Probe its features.

For the teacher (full precision), the freshly binarized student and trained students,
on the first N dev examples: the spread of the logits and of the final [CLS] hidden
state across examples, and how well a logistic regression fitted on 3/4 of the examples
predicts the labels of the rest from [CLS], the pooler output and the mean hidden state.
A collapsed student maps every input to nearly the same [CLS] vector.

    python benchmarks/feature_probe.py --teacher TEACHER_DIR STUDENT_DIR [STUDENT_DIR ...]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from transformers import AutoTokenizer

from bibert.config import QuantConfig
from bibert.data import load_examples
from bibert.modeling import BiBertForSequenceClassification, binarize
from bibert.tasks import get_task


def probe(model, enc, labels: np.ndarray) -> dict:
    model.eval()
    with torch.no_grad():
        out = model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], output_hidden_states=True)
        last = out.hidden_states[-1]  # (B, T, hidden)
        pooled = torch.tanh(model.bert.pooler.dense(last[:, 0]))  # (B, hidden)
    mask = enc["attention_mask"][..., None].float()
    features = {"cls": last[:, 0], "pooled": pooled, "mean_hidden": (last * mask).sum(1) / mask.sum(1)}
    split = 3 * len(labels) // 4
    result = {"logit_std": out.logits.std(0).mean().item(), "cls_std": last[:, 0].std(0).mean().item(),
              "predicted_class_counts": np.bincount(out.logits.argmax(-1).numpy(), minlength=out.logits.shape[-1]).tolist()}
    for name, f in features.items():
        clf = LogisticRegression(max_iter=3000).fit(f[:split].numpy(), labels[:split])
        result[f"probe_{name}"] = clf.score(f[split:].numpy(), labels[split:])
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("students", nargs="*", help="trained student folders (BiBERT checkpoints)")
    p.add_argument("--teacher", required=True, help="fine-tuned teacher folder")
    p.add_argument("--task", default="rotten_tomatoes")
    p.add_argument("--examples", type=int, default=400)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--out", default="benchmarks/results/feature_probe.json")
    args = p.parse_args(argv)
    task = get_task(args.task)
    examples = load_examples(task, "dev")[: args.examples]
    tok = AutoTokenizer.from_pretrained(args.teacher)
    enc = tok([e.text_a for e in examples], [e.text_b for e in examples] if task.is_pair else None,
              padding=True, truncation=True, max_length=args.max_length, return_tensors="pt")
    labels = np.array([e.label for e in examples])
    models = {"teacher": binarize(args.teacher, QuantConfig.full_precision()), "student at init": binarize(args.teacher)}
    models.update({s: BiBertForSequenceClassification.from_pretrained(s) for s in args.students})
    rows = {name: probe(m, enc, labels) for name, m in models.items()}
    print(f"{'model':<60}{'logit std':>10}{'CLS std':>9}{'probe CLS':>10}{'probe pooled':>13}{'probe mean':>11}")
    for name, r in rows.items():
        print(f"{name[-60:]:<60}{r['logit_std']:>10.3f}{r['cls_std']:>9.3f}{r['probe_cls']:>10.3f}"
              f"{r['probe_pooled']:>13.3f}{r['probe_mean_hidden']:>11.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"task": task.name, "examples": len(examples), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
