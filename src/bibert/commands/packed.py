"""`bibert export` (student folder -> packed 1-bit file) and `bibert predict` (packed file -> labels)."""
from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="write the packed 1-bit model of a BiBERT student",
        description="Pack a fully binarized (1-1-1, Bi-Attention) student folder into one file: sign bits "
        "for every binarized weight and the word embedding, per-row scales, full-precision side parameters, "
        "config, tokenizer, format version and SHA-256 checksum (docs/packed_format.md). Prints the size "
        "against the student's fp32 safetensors.",
    )
    p.add_argument("--model", required=True, metavar="STUDENT_DIR", help="folder written by save_pretrained")
    p.add_argument("--out", required=True, metavar="PATH", help="packed file to write (e.g. model.bibert)")
    p.add_argument("--side-dtype", choices=["float32", "float16"], default="float32",
                   help="dtype of the full-precision parts and scales: float32 computes exactly what the "
                   "student computes; float16 is smaller (default: %(default)s)")
    p.add_argument("--tokenizer", metavar="DIR", help="take the tokenizer files from DIR instead of STUDENT_DIR")
    p.set_defaults(func=run_export)

    p = subparsers.add_parser(
        "predict",
        help="classify texts with a packed model on the bitwise engine",
        description="Run a packed model (bibert export) on one or more texts with the native XOR/popcount "
        "kernels; prints one line per text: label and class scores.",
    )
    p.add_argument("--model", required=True, metavar="PATH", help="packed model file")
    p.add_argument("texts", nargs="+", metavar="TEXT", help="text(s) to classify")
    p.add_argument("--pair", action="append", metavar="TEXT",
                   help="second segment of a sentence pair; give one --pair per TEXT")
    p.add_argument("--threads", type=int, help="kernel threads (default: BIBERT_THREADS or all cores)")
    p.add_argument("--kernel", choices=["auto", "avx512", "avx2", "portable"],
                   help="force a kernel family (default: BIBERT_KERNEL or auto)")
    p.add_argument("--max-length", type=int, help="truncate inputs to this many tokens")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of text lines")
    p.set_defaults(func=run_predict)


def run_export(args: argparse.Namespace) -> int:
    from ..packed import export_packed

    report = export_packed(args.model, args.out, side_dtype=args.side_dtype, tokenizer_dir=args.tokenizer)
    print(report)
    return 0


def run_predict(args: argparse.Namespace) -> int:
    from ..packed import load_packed

    model = load_packed(args.model, threads=args.threads, kernel=args.kernel)
    pred = model.predict(args.texts, pairs=args.pair, max_length=args.max_length)
    rows = []
    for text, label, score in zip(args.texts, pred.labels, pred.scores):
        scores = {model.labels[i]: float(s) for i, s in enumerate(score)} if score.ndim else {"value": float(score)}
        rows.append({"text": text, "label": label, "scores": scores})
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(f"{r['label']}\t" + " ".join(f"{k}={v:.4f}" for k, v in r["scores"].items()) + f"\t{r['text']}")
    return 0
