"""`bibert finetune` (full-precision teacher) and `bibert distill` (binarized student).

Thin wrappers of bibert.train.finetune / bibert.train.distill. The training options,
their help and their defaults come from TrainConfig's fields (bibert.config), so they are
stated once; every recipe value left out comes from the recipe (`resolve_config`). Both
run under `torchrun --nproc_per_node N -m bibert.cli ...` as well.
"""
from __future__ import annotations

import argparse
import json
import os
import typing

from ..config import (ACTIVATIONS, ATTENTIONS, BUDGET_EXAMPLES, BUDGET_MAX_EPOCHS, DATA_GROUP, ELASTIC_SCHEDULE,
                      FINETUNE_RECIPE, RECIPE, RECIPE_GROUP, RUN_GROUP, STUDENT_GROUP, VIA_SHARE, QuantConfig,
                      TrainConfig, default_student, elastic_bibert_flags, option_fields)
from ..tasks import TASKS, Task

TASK_HELP = ("a GLUE task (sst2, mnli, ...), rotten_tomatoes or snli; or, with --train-file, a name for a task of "
             "your own data (default: with --train-file, a task of your own data named after the file)")


def _recipe_default(name: str, mode: str) -> str:
    """What --help says a recipe option defaults to."""
    if mode == "finetune" and name in FINETUNE_RECIPE:
        return f"{FINETUNE_RECIPE[name]:g}, the usual BERT fine-tuning recipe"
    examples = ", ".join(f"{t} {getattr(TASKS[t], name):g}" for t in ("sst2", "mnli", "rotten_tomatoes"))
    own = getattr(Task.custom("own", None, pair=False), name)
    if mode != "distill":
        return f"the task's (docs/data.md): {examples}; your own data {own:g}"
    paper = f"with --paper the task's (docs/method.md §5): {examples}; your own data {own:g}"
    if name == "epochs":
        return (f"Elastic BiBERT's budget, {BUDGET_EXAMPLES:,} examples and at most {BUDGET_MAX_EPOCHS:g} epochs; "
                + paper)
    if name in ELASTIC_SCHEDULE:
        return f"{ELASTIC_SCHEDULE[name]:g} for Elastic BiBERT; " + paper
    return f"the task's: {examples}; your own data {own:g}"


def option_help(f, mode: str) -> str:
    """A field's help text and its default, as --help shows them."""
    md = f.metadata
    if f.name in RECIPE:
        default = _recipe_default(f.name, mode)
    elif md["default_text"] is not None:
        default = md["default_text"]
    elif isinstance(f.default, bool):
        default = "on" if f.default else "off"
    else:
        default = f.default
    return f"{md['help']} (default: {default})".replace("%", "%%")


def add_config_options(parser, mode: str, names: typing.Iterable[str] | None = None,
                       sections: dict | None = None) -> list[str]:
    """Add TrainConfig's options of `mode` (or only `names`) to an argparse parser, each with
    its flags, type, choices and help; every default is None ("not given": `resolve_config`
    fills it). sections: {group title: argument group}, to put each option in its group's
    section (made on first use); None puts them on the parser. Returns the fields added."""
    hints = typing.get_type_hints(TrainConfig)
    added = []
    for f in option_fields(mode):
        if names is not None and f.name not in names:
            continue
        md = f.metadata
        group = parser
        if sections is not None:
            if md["group"] not in sections:
                sections[md["group"]] = parser.add_argument_group(md["group"])
            group = sections[md["group"]]
        flags = md["flags"] or (f"--{f.name.replace('_', '-')}",)
        kind = [t for t in typing.get_args(hints[f.name]) if t is not type(None)] or [hints[f.name]]
        kwargs = {"dest": f.name, "default": None, "help": option_help(f, mode)}
        if kind[0] is bool:  # a flag; one whose default is the recipe's can be turned off too
            kwargs["action"] = argparse.BooleanOptionalAction if f.default is None else "store_true"
        else:
            kwargs["type"] = kind[0]
            if md["choices"]:
                kwargs["choices"] = list(md["choices"])
        group.add_argument(*flags, **kwargs)
        added.append(f.name)
    return added


def _quant_options(group) -> None:
    elastic, paper = default_student(), default_student(paper=True)
    group.add_argument("--bits", help=f"student bits W-E-A, e.g. 1-1-1 or 1-1-4 (default: {elastic.bits})")
    group.add_argument("--attention", choices=list(ATTENTIONS),
                       help="bi = Bi-Attention; bi-max = Bi-Attention relative to each query's best key (elastic "
                            "activations only); softmax = the baseline's (default: "
                            f"{elastic.attention}; {paper.attention} with --paper or sign activations; "
                            f"{default_student(activation_bits=2).attention} for 1-1-2 / 1-1-4 without --paper)")
    group.add_argument("--activations", choices=list(ACTIVATIONS),
                       help="1-bit activations: sign = the paper's; elastic = learned thresholds and scales, {0,1} "
                            "FFN-out input (beyond the paper, after BiT; docs/method.md §7) "
                            f"(default: {elastic.activations}; {paper.activations} with --paper or k-bit activations)")
    group.add_argument("--via", metavar="W-E-A",
                       help="multi-step distillation (docs/method.md §8): first distil a student with these bits (e.g. "
                            "1-1-4; without --paper it trains the 1-1-k recipe: softmax attention, standard KD) into "
                            "OUT/via-W-E-A, then start the final student from it; the training (the default budget, "
                            "--epochs or --max-steps) is split between the two stages (default: one stage)")
    group.add_argument("--via-share", type=float, default=VIA_SHARE,
                       help=f"share of the training given to the --via stage (default: {VIA_SHARE})")


def _common(p, mode: str) -> None:
    p.add_argument("--task", help=TASK_HELP)
    p.add_argument("--out", required=True, help="output folder (best/, last/, metrics.jsonl, results.json, ...)")
    titles = (RECIPE_GROUP, STUDENT_GROUP, DATA_GROUP, RUN_GROUP) if mode == "distill" else \
        (RECIPE_GROUP, DATA_GROUP, RUN_GROUP)
    sections = {title: p.add_argument_group(title) for title in titles}
    if mode == "distill":
        _quant_options(sections[STUDENT_GROUP])
    add_config_options(p, mode, sections=sections)
    run = sections[RUN_GROUP]
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    run.add_argument("--json", action="store_true", help="print the results as JSON")


def register(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a full-precision BERT teacher on a task",
                       description="Fine-tune a BERT classifier (a local folder, a hub name, or `teacher`: the "
                       "offline all-MiniLM-L6-v2) on a task or on your own data (--train-file with --text-column and "
                       "--label-column). best/ and last/ are standard Hugging Face folders (weights + tokenizer, "
                       "the label names in config.json). The recipe's defaults are shown with each option.")
    p.add_argument("--model", required=True, help="BERT model: a folder, a Hugging Face hub name or `teacher`")
    _common(p, "finetune")
    p.set_defaults(func=run_finetune)

    p = sub.add_parser("distill", help="distil a binarized student (BiBERT) from a fine-tuned teacher",
                       description="Build a quantized student from a fine-tuned teacher and train it with "
                       "Direction-Matching Distillation (--distill dmd) or the standard TinyBERT/BinaryBERT "
                       "objective (--distill standard). The default is the most accurate 1-1-1 recipe, Elastic "
                       f"BiBERT (beyond the paper, docs/method.md §7: {elastic_bibert_flags()}, lr "
                       f"{ELASTIC_SCHEDULE['lr']:g}, batch {ELASTIC_SCHEDULE['batch_size']}, length-grouped batches) "
                       f"for a budget of {BUDGET_EXAMPLES:,} training examples, at most {BUDGET_MAX_EPOCHS:g} epochs "
                       "(stated with an estimate of the time when the run starts). --paper gives the paper's BiBERT "
                       "with the task's recipe (docs/method.md §5); its ablation rows: baseline = --paper "
                       "--attention softmax --distill standard; +Bi-Attention = --paper --distill standard; +DMD = "
                       "--paper --attention softmax; BiBERT = --paper. A student of your own data keeps the "
                       "teacher's labels.")
    p.add_argument("--teacher", required=True, help="fine-tuned teacher folder (from `bibert finetune`) or hub name")
    _common(p, "distill")
    p.set_defaults(func=run_distill)


def _options(args, mode: str) -> dict:
    return {f.name: getattr(args, f.name) for f in option_fields(mode) if getattr(args, f.name, None) is not None}


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

    results = finetune(args.model, args.task, args.out, resume=args.resume, **_options(args, "finetune"))
    _report(results, args.json)
    return 0


def student_quant(bits: str | None, attention: str | None, activations: str | None,
                  paper: bool = False) -> QuantConfig | None:
    """The student of --bits/--attention/--activations, each left out taken from the recipe's
    student (`default_student`: Elastic BiBERT, or with --paper the paper's BiBERT); None when
    all three are left out (the recipe's student)."""
    if bits is None and attention is None and activations is None:
        return None
    bits = bits or "1-1-1"
    student = default_student(paper, QuantConfig.from_bits(bits).activation_bits)
    activations = activations or student.activations
    attention = attention or (student.attention if activations == student.activations else "bi")
    return QuantConfig.from_bits(bits, attention, activations)


def run_distill(args) -> int:
    from ..train import distill

    quant = student_quant(args.bits, args.attention, args.activations, bool(args.paper))
    options = _options(args, "distill")
    results = distill(args.teacher, args.task, args.out, quant=quant, resume=args.resume, via=args.via,
                      via_share=args.via_share, **options)
    _report(results, args.json)
    return 0

