"""`bibert finetune` (full-precision teacher) and `bibert distill` (binarized student).

Thin wrappers of bibert.train.finetune / bibert.train.distill; every recipe value left
out comes from the task's preset (see `bibert.train.resolve_config`). Both run under
`torchrun --nproc_per_node N -m bibert.cli ...` as well.
"""
from __future__ import annotations

import json
import os

TRAIN_OPTIONS = ("lr", "epochs", "max_length", "batch_size", "max_steps", "weight_decay", "warmup_ratio",
                 "max_grad_norm", "eval_every", "save_every", "log_every", "max_train_examples",
                 "max_eval_examples", "train_file", "data_dir", "eval_test", "group_by_length", "dmd_mask_padding",
                 "seed", "device", "precision", "evals_per_epoch", "init_from", "quantizer_lr")


def _common(p) -> None:
    p.add_argument("--task", required=True, help="task name: a GLUE task (sst2, mnli, ...), rotten_tomatoes or snli")
    p.add_argument("--out", required=True, help="output folder (best/, last/, metrics.jsonl, results.json, ...)")
    r = p.add_argument_group("recipe (defaults: the task's preset)")
    r.add_argument("--lr", type=float, help="peak learning rate")
    r.add_argument("--epochs", type=float, help="training epochs")
    r.add_argument("--max-length", type=int, help="tokens per example (longer ones are truncated)")
    r.add_argument("--batch-size", type=int, help="examples per step and process")
    r.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    r.add_argument("--weight-decay", type=float, help="AdamW weight decay except biases and LayerNorm (0.01)")
    r.add_argument("--warmup-ratio", type=float, help="share of the steps with linear warm-up (0.1)")
    r.add_argument("--max-grad-norm", type=float, help="gradient clipping norm (1.0)")
    r.add_argument("--seed", type=int, help="seed of the data order, the new head and dropout (42)")
    d = p.add_argument_group("data")
    d.add_argument("--train-file", help="train on this .jsonl/.csv/.tsv (e.g. from `bibert augment`) instead of the task's train split")
    d.add_argument("--data-dir", help="GLUE folder in the original TSV layout")
    d.add_argument("--max-train-examples", type=int, help="train on a seeded random slice of this size")
    d.add_argument("--max-eval-examples", type=int, help="evaluate on a seeded random slice of this size")
    d.add_argument("--group-by-length", action="store_true", default=None,
                   help="batch examples of similar length together: less padding, faster steps (off by default)")
    e = p.add_argument_group("evaluation, checkpoints, hardware")
    e.add_argument("--eval-every", type=int, help="steps between dev evaluations (default: see --evals-per-epoch)")
    e.add_argument("--evals-per-epoch", type=int,
                   help="dev evaluations per epoch when --eval-every is not given; the best is kept (4)")
    e.add_argument("--save-every", type=int, help="steps between training-state checkpoints (default: at each evaluation)")
    e.add_argument("--log-every", type=int, help="steps between logged loss averages (10)")
    e.add_argument("--eval-test", action="store_true", default=None, help="score the best checkpoint on the labeled test split")
    e.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    e.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    e.add_argument("--precision", choices=["fp32", "bf16"], help="bf16 autocast (GPU) or fp32 (default)")
    e.add_argument("--json", action="store_true", help="print the results as JSON")


def register(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a full-precision BERT teacher on a task",
                       description="Fine-tune a BERT classifier (a local folder or a hub name) on a task. "
                       "best/ and last/ are standard Hugging Face folders (weights + tokenizer). "
                       "Default recipe: lr 5e-5, 3 epochs, the task's max length and batch 16.")
    p.add_argument("--model", required=True, help="BERT model: a folder or a Hugging Face hub name")
    _common(p)
    p.set_defaults(func=run_finetune)

    p = sub.add_parser("distill", help="distil a binarized student (BiBERT) from a fine-tuned teacher",
                       description="Build a quantized student from a fine-tuned teacher and train it with "
                       "Direction-Matching Distillation (--distill dmd) or the standard TinyBERT/BinaryBERT "
                       "objective (--distill standard). Ablation rows: baseline = --attention softmax "
                       "--distill standard; +Bi-Attention = bi + standard; +DMD = softmax + dmd; BiBERT = bi + dmd. "
                       "Default recipe: the task's preset from the BiBERT paper (SPEC section 5).")
    p.add_argument("--teacher", required=True, help="fine-tuned teacher folder (from `bibert finetune`) or hub name")
    p.add_argument("--bits", default="1-1-1", help="student bits W-E-A (default 1-1-1)")
    p.add_argument("--attention", choices=["bi", "softmax"], default="bi", help="Bi-Attention (default) or softmax")
    p.add_argument("--distill", choices=["dmd", "standard"], default="dmd", help="objective (default dmd)")
    p.add_argument("--student-layers", type=int, help="a shallower student (the teacher's depth must be a multiple)")
    p.add_argument("--dmd-mask-padding", action="store_true", default=None,
                   help="leave padded positions out of DMD and the hidden loss (the reference keeps them)")
    p.add_argument("--activations", choices=["sign", "elastic"], default="sign",
                   help="1-bit activations: sign = the paper's (default); elastic = learned thresholds and scales, "
                        "{0,1} FFN-out input (beyond the paper, after BiT; see docs/method.md)")
    p.add_argument("--quantizer-lr", type=float, help="peak learning rate of the elastic thresholds and scales (--lr)")
    p.add_argument("--via", metavar="W-E-A",
                   help="multi-step distillation: first distil a student with these bits (e.g. 1-1-4) into OUT/via-W-E-A, "
                        "then start the final student from it; the epochs are split between the two stages")
    p.add_argument("--via-share", type=float, default=0.5, help="share of the epochs given to the --via stage (0.5)")
    p.add_argument("--init-from", help="start the student from this BiBERT folder instead of the teacher's weights")
    _common(p)
    p.set_defaults(func=run_distill)


def _options(args) -> dict:
    return {k: getattr(args, k) for k in TRAIN_OPTIONS if getattr(args, k, None) is not None}


def _report(results: dict, as_json: bool) -> None:
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 prints
        return
    if as_json:
        print(json.dumps(results, indent=2))
        return
    best = results["best"]
    print(f"{results['mode']} {results['task']}: best {results['metric']} {best['score']:.4f} at step {best['step']}"
          f" ({results['train_examples_per_s']:.1f} examples/s); outputs in {results['out']}")
    if results.get("teacher"):
        print("teacher: " + json.dumps(results["teacher"]))
    if results.get("test"):
        print("test (best checkpoint): " + json.dumps(results["test"]))


def run_finetune(args) -> int:
    from ..train import finetune

    results = finetune(args.model, args.task, args.out, resume=args.resume, **_options(args))
    _report(results, args.json)
    return 0


def run_distill(args) -> int:
    from ..config import QuantConfig
    from ..train import distill

    quant = QuantConfig.from_bits(args.bits, args.attention, args.activations)
    results = distill(args.teacher, args.task, args.out, quant=quant, distill=args.distill,
                      student_layers=args.student_layers, resume=args.resume, via=args.via, via_share=args.via_share,
                      **_options(args))
    _report(results, args.json)
    return 0
