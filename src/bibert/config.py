"""The configurations: `QuantConfig` (the student) and `TrainConfig` (one training run).

`QuantConfig`: which parts of the BERT are quantized, and to how many bits. A versioned
dataclass that round-trips through `to_dict` / `from_dict` (it is stored inside every
student's config.json). The default is the BiBERT student: 1-bit weights, 1-bit word
embedding, 1-bit activations and Bi-Attention.

`TrainConfig`: everything one run of `bibert.train` does, stored as OUT/config.json.
Each field states its help text and option group in its metadata, so that the command
line (`bibert finetune`, `bibert distill`) is generated from it; `resolve_config` fills
the fields left out from the recipe (the task's, docs/method.md §5, for distillation;
FINETUNE_RECIPE for fine-tuning).
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields
from typing import ClassVar

from .errors import BibertError
from .tasks import HELD_OUT_PERCENT, Task, get_task

SUPPORTED_BITS = (1, 2, 4, 8, 32)
ATTENTIONS = ("bi", "softmax", "bi-max")
ACTIVATIONS = ("sign", "elastic")


@dataclass(frozen=True)
class QuantConfig:
    """Bit widths W-E-A and the attention kind.

    weight_bits:     bits of every encoder Linear and the pooler (1 = BiBERT's binarizer).
    embedding_bits:  bits of the word-embedding table (position/token-type stay fp32).
    activation_bits: bits of every input of a quantized Linear (1 = sign, no scale).
    attention:       "bi" = Bi-Attention (bool of the scores, docs/method.md §3);
                     "bi-max" = Bi-Attention relative to each query's best key: 1 for the
                     keys within a learned per-head margin of the row's maximum score
                     (elastic activations only; docs/method.md §7);
                     "softmax" = the straightforward baseline: standard attention with
                     quantized probabilities (docs/method.md §3).
    activations:     how 1-bit activations are binarized: "sign" = the paper's sign(x)
                     with no scale; "elastic" = learned per-channel thresholds and scales,
                     {0, 1} levels for the FFN-out input (beyond the paper, after BiT;
                     docs/method.md). Needs activation_bits = 1.
    32 bits means full precision; 32-32-32 with "softmax" is exactly BERT.
    """

    weight_bits: int = 1
    embedding_bits: int = 1
    activation_bits: int = 1
    attention: str = "bi"
    activations: str = "sign"

    VERSION: ClassVar[int] = 2  # 2: `activations`

    def __post_init__(self) -> None:
        for name in ("weight_bits", "embedding_bits", "activation_bits"):
            value = getattr(self, name)
            if isinstance(value, bool) or value not in SUPPORTED_BITS:
                raise BibertError(
                    f"unsupported {name}={value!r}: choose one of {', '.join(map(str, SUPPORTED_BITS))}"
                    " (32 = full precision)"
                )
        if self.attention not in ATTENTIONS:
            raise BibertError(f"unknown attention {self.attention!r}: choose one of {', '.join(ATTENTIONS)}")
        if self.attention == "bi-max" and self.activations != "elastic":
            raise BibertError("attention 'bi-max' learns its margins: it needs activations='elastic'")
        if self.activations not in ACTIVATIONS:
            raise BibertError(f"unknown activations {self.activations!r}: choose 'sign' or 'elastic'")
        if self.activations == "elastic" and self.activation_bits != 1:
            raise BibertError(f"elastic binarization applies to 1-bit activations, not {self.activation_bits}-bit ones;"
                              " use activations='sign' or --bits W-E-1")

    @classmethod
    def full_precision(cls) -> "QuantConfig":
        """32-32-32 with softmax attention: computes exactly what BERT computes."""
        return cls(32, 32, 32, "softmax")

    @classmethod
    def from_bits(cls, bits: str, attention: str = "bi", activations: str = "sign") -> "QuantConfig":
        """Parse a W-E-A string such as "1-1-1" or "1-1-4"."""
        parts = str(bits).split("-")
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            raise BibertError(f"bits must look like W-E-A, for example 1-1-1 or 1-1-4; got {bits!r}")
        w, e, a = (int(p) for p in parts)
        return cls(w, e, a, attention, activations)

    @property
    def bits(self) -> str:
        return f"{self.weight_bits}-{self.embedding_bits}-{self.activation_bits}"

    @property
    def binary_attention(self) -> bool:
        """Attention weights in {0, 1} (Bi-Attention, either form)."""
        return self.attention in ("bi", "bi-max")

    @property
    def elastic(self) -> bool:
        return self.activations == "elastic"

    @property
    def is_full_precision(self) -> bool:
        return self == QuantConfig.full_precision()

    def to_dict(self) -> dict:
        return {**asdict(self), "version": self.VERSION}

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        d = dict(d)
        version = d.pop("version", 1)
        if not isinstance(version, int) or version > cls.VERSION:
            raise BibertError(
                f"quantization config version {version} is newer than this bibert understands"
                f" ({cls.VERSION}); upgrade bibert"
            )
        unknown = set(d) - {"weight_bits", "embedding_bits", "activation_bits", "attention", "activations"}
        if unknown:
            raise BibertError(f"unknown quantization config keys: {sorted(unknown)}")
        return cls(**d)


# ----------------------------------------------------------------------------- training

MODES = ("finetune", "distill")
DISTILL_KINDS = ("dmd", "standard")  # the first is the default
PRECISIONS = ("fp32", "bf16", "auto")
# Teacher fine-tuning: the usual BERT recipe (lr in 2e-5..5e-5, 3 epochs); docs/method.md
# §5's table is the distillation recipe. Max length and batch size come from the task.
FINETUNE_RECIPE = {"lr": 5e-5, "epochs": 3.0}
RECIPE = ("lr", "epochs", "max_length", "batch_size")  # options whose default is the recipe's
# Elastic BiBERT, the most accurate 1-1-1 recipe (beyond the paper, docs/method.md §7) and the
# default of `bibert distill` and `bibert demo`: QuantConfig(activations, attention) and the
# distill options. `--paper` distils the paper's BiBERT with the task's recipe instead.
ELASTIC_BIBERT = {"activations": "elastic", "attention": "bi-max", "pred_weight": 5.0, "precision": "auto"}
# A 1-1-2 / 1-1-4 student without --paper: softmax attention on its k-bit Q, K, V and the standard
# objective with prediction weight 1, the recipe of the measured k-bit rows (snli at 2,500 steps:
# 72.1 / 80.3; with Bi-Attention a 1-1-4 student scored 48.0; docs/results.md, docs/method.md §9).
KBIT_RECIPE = {"attention": "softmax", "distill": "standard", "pred_weight": 1.0}
# Elastic BiBERT's schedule (docs/method.md §7, docs/results.md): peak lr, batch, length-grouped
# batches, and a budget of BUDGET_EXAMPLES training examples (at most BUDGET_MAX_EPOCHS epochs)
# when --epochs and --max-steps are left out: 2,500 steps of 32 on a large train split.
ELASTIC_SCHEDULE = {"lr": 5e-4, "batch_size": 32, "group_by_length": True}
BUDGET_EXAMPLES = 80_000
BUDGET_MAX_EPOCHS = 10.0
VIA_SHARE = 0.5  # multi-step distillation: the --via stage's share of the epochs (docs/method.md §8)


def budget_epochs(train_examples: int) -> float:
    """The default budget's epochs for a train split of this size: BUDGET_EXAMPLES examples in
    all, at most BUDGET_MAX_EPOCHS epochs (so a small file is seen 10 times, not 80,000/n)."""
    return min(BUDGET_MAX_EPOCHS, BUDGET_EXAMPLES / max(1, train_examples))


def default_student(paper: bool = False, activation_bits: int = 1) -> QuantConfig:
    """The student `bibert distill` builds when no --bits/--attention/--activations is given:
    Elastic BiBERT (1-1-1, elastic, bi-max); with `paper` the paper's BiBERT (sign, bi).
    A k-bit student (activation_bits > 1) has sign activations, and softmax attention
    (KBIT_RECIPE), or Bi-Attention with `paper`."""
    if paper:
        return QuantConfig(activation_bits=activation_bits)
    if activation_bits != 1:
        return QuantConfig(activation_bits=activation_bits, attention=KBIT_RECIPE["attention"])
    return QuantConfig(activations=ELASTIC_BIBERT["activations"], attention=ELASTIC_BIBERT["attention"])


def elastic_bibert_flags() -> str:
    """ELASTIC_BIBERT as `bibert distill` flags."""
    return " ".join(f"--{k.replace('_', '-')} {format(v, 'g') if isinstance(v, float) else v}"
                    for k, v in ELASTIC_BIBERT.items())

# option groups of the command line
RECIPE_GROUP = "recipe"
STUDENT_GROUP = "student (distill only)"
DATA_GROUP = "data"
RUN_GROUP = "evaluation, checkpoints, hardware"


def option(default=None, help: str = "", group: str = RUN_GROUP, modes: tuple[str, ...] = MODES,
           flags: tuple[str, ...] = (), default_text: str | None = None, choices: tuple | None = None,
           shared: bool = False):
    """A TrainConfig field with what the command line needs to know about it.

    help: the option's help text; group: its section in --help; modes: the commands that
    have it; flags: its option strings (default: --the-name); default_text: what --help
    says the default is, where it is not the field's default (None: the field's default);
    choices: the values allowed; shared: `finetune_and_distill` gives it to both stages
    (it describes the data or the machine, not one stage's recipe).
    """
    return field(default=default, metadata={"help": help, "group": group, "modes": modes, "flags": flags,
                                            "default_text": default_text, "choices": choices, "shared": shared})


@dataclass
class TrainConfig:
    """The resolved configuration of one run (saved as OUT/config.json).

    mode: "finetune" (full-precision teacher) or "distill" (binarized student).
    task: the task (a registry task, or one of your own data: `bibert.data.resolve_task`).
    model: the model to fine-tune, or the teacher folder to distil from.
    out: the output folder.
    quant: the student (distill only; default QuantConfig(), BiBERT 1-1-1).
    The other fields are options; each one's help text is in its metadata.
    """

    mode: str
    task: Task
    model: str
    out: str
    quant: QuantConfig | None = None
    distill: str | None = option(
        None, "objective: dmd = Direction-Matching Distillation (docs/method.md §4); standard = TinyBERT/BinaryBERT's",
        STUDENT_GROUP, ("distill",), default_text=f"{DISTILL_KINDS[0]}; {KBIT_RECIPE['distill']} for a 1-1-2 / 1-1-4 "
        "student without --paper", choices=DISTILL_KINDS)
    student_layers: int | None = option(
        None, "a shallower student (the teacher's depth must be a multiple of it)", STUDENT_GROUP, ("distill",),
        default_text="the teacher's depth")
    paper: bool = option(
        False, "the paper's BiBERT instead of Elastic BiBERT: sign activations, Bi-Attention, prediction weight 1, "
        "fp32, and the task's recipe from the paper (docs/method.md §5: lr, epochs, batch 16)", STUDENT_GROUP,
        ("distill",))
    lr: float = option(FINETUNE_RECIPE["lr"], "peak learning rate", RECIPE_GROUP)
    epochs: float | None = option(FINETUNE_RECIPE["epochs"], "training epochs", RECIPE_GROUP)
    max_length: int = option(128, "tokens per example (longer ones are truncated)", RECIPE_GROUP)
    batch_size: int = option(16, "examples per step and process", RECIPE_GROUP)
    max_steps: int | None = option(None, "stop after this many optimizer steps (the schedule ends there too)",
                                   RECIPE_GROUP, default_text="the epochs'")
    weight_decay: float = option(0.01, "AdamW weight decay, except biases and LayerNorms", RECIPE_GROUP)
    warmup_ratio: float = option(0.1, "share of the steps with linear warm-up (then linear decay)", RECIPE_GROUP)
    max_grad_norm: float = option(1.0, "gradient clipping norm", RECIPE_GROUP)
    adam_eps: float = option(1e-6, "AdamW epsilon", RECIPE_GROUP)
    eval_every: int | None = option(None, "steps between dev evaluations",
                                    default_text="an epoch divided by --evals-per-epoch")
    evals_per_epoch: int = option(4, "dev evaluations per epoch when --eval-every is not given; the best one is kept")
    save_every: int | None = option(None, "steps between extra training-state checkpoints",
                                    default_text="only at evaluations")
    log_every: int = option(10, "steps between logged loss averages")
    max_train_examples: int | None = option(None, "train on a seeded random slice of this size", DATA_GROUP,
                                            default_text="all", shared=True)
    max_eval_examples: int | None = option(None, "evaluate on a seeded random slice of this size", DATA_GROUP,
                                           default_text="all", shared=True)
    train_file: str | None = option(
        None, "train on this .csv/.tsv/.jsonl/.parquet file (your own data, or e.g. `bibert augment`'s output); "
        "without --task, a task of your own data: labels (any values) from this file, or regression when they are "
        "numbers that are not all whole", DATA_GROUP, flags=("--train-file", "--file"),
        default_text="the task's train split")
    data_dir: str | None = option(None, "GLUE folder in the original TSV layout (e.g. glue_data/SST-2)", DATA_GROUP,
                                  default_text="the task's own data: the offline corpora, else Hugging Face datasets",
                                  shared=True)
    eval_test: bool = option(False, "score the best checkpoint on the labeled test split (or --test-file)")
    group_by_length: bool | None = option(
        None, "batch examples of similar length together: less padding, so faster steps on CPU (each epoch's "
        "shuffled order is cut into windows of 50 batches, each sorted by length and cut into batches, and the "
        "batches shuffled again)", DATA_GROUP, default_text="on for Elastic BiBERT; off for finetune and --paper")
    dmd_mask_padding: bool = option(
        False, "leave padded positions out of DMD and the hidden loss (--distill dmd; the reference keeps them, "
        "docs/method.md §4)", STUDENT_GROUP, ("distill",))
    init_from: str | None = option(
        None, "start the student from this BiBERT folder (e.g. an intermediate 1-1-4 student's best/)",
        STUDENT_GROUP, ("distill",), default_text="the teacher's weights")
    pred_weight: float | None = option(
        None, "weight of the prediction loss (soft cross-entropy against the teacher, plus half the label "
        "cross-entropy under dmd) beside the attention/DMD and hidden-state terms, each of weight 1",
        STUDENT_GROUP, ("distill",), default_text=f"{ELASTIC_BIBERT['pred_weight']:g} for Elastic BiBERT; "
        f"{KBIT_RECIPE['pred_weight']:g} with --paper or for a 1-1-2 / 1-1-4 student")
    phase_in: float = option(
        0.0, "progressive binarization (elastic activations): the share of the steps over which every activation "
        "hardens from its STE's clipped-linear surrogate to binary levels, linearly (docs/method.md §7); 0 = binary "
        "from the first step", STUDENT_GROUP, ("distill",))
    quantizer_lr: float | None = option(
        None, "peak learning rate of the elastic thresholds and scales (no weight decay; docs/method.md §7)",
        STUDENT_GROUP, ("distill",), default_text="--lr")
    seed: int = option(42, "seed of the data order, a new head and dropout", shared=True)
    device: str = option("auto", "auto, cpu, cuda or cuda:N", shared=True)
    precision: str | None = option(
        None, "fp32; bf16 = mixed precision: bf16 autocast for the matrix products (the binarized ones stay exact), "
        "about 2x faster steps where the hardware has bf16 arithmetic (CPUs with AVX512-BF16 or AMX, recent GPUs) "
        "and slower where it does not; auto = bf16 where the device has it, else fp32",
        choices=PRECISIONS, shared=True, default_text="auto for Elastic BiBERT; fp32 for finetune and --paper")
    dev_file: str | None = option(
        None, "dev data: a .csv/.tsv/.jsonl/.parquet file with the train file's columns", DATA_GROUP,
        default_text=f"the task's dev split; for your own data, a fixed {HELD_OUT_PERCENT}% of --train-file (by a hash "
        "of the text)",
        shared=True)
    test_file: str | None = option(None, "labeled test data for --eval-test, with the train file's columns",
                                   DATA_GROUP, default_text="the task's test split", shared=True)
    text_column: str | None = option(None, "column of the first text in --train-file, --dev-file, --test-file",
                                     DATA_GROUP, default_text="the task's field, e.g. sentence; text for your own "
                                     "data", shared=True)
    text_pair_column: str | None = option(None, "column of the second text, for sentence pairs", DATA_GROUP,
                                          flags=("--text-pair-column", "--pair-column"),
                                          default_text="the task's field; none for your own data", shared=True)
    label_column: str | None = option(None, "column of the label", DATA_GROUP, default_text="label", shared=True)
    # the share of the default budget (`budget_epochs`) this run trains when epochs is None: a --via
    # stage and the final stage after it each take their share (docs/method.md §8); not a flag
    budget_share: float = 1.0

    VERSION: ClassVar[int] = 2  # 2: task of your own data (a dict), dev/test files and columns
    # options that may change between a run and its resumption
    RESUMABLE_CHANGES: ClassVar[tuple[str, ...]] = ("out", "device", "save_every", "eval_test")

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise BibertError(f"unknown mode {self.mode!r}: choose finetune or distill")
        if isinstance(self.task, str):
            self.task = get_task(self.task)
        elif isinstance(self.task, dict):
            self.task = Task.from_dict(self.task)
        if isinstance(self.quant, dict):
            self.quant = QuantConfig.from_dict(self.quant)
        elastic_recipe = self.mode == "distill" and not self.paper
        if self.group_by_length is None:
            self.group_by_length = elastic_recipe and ELASTIC_SCHEDULE["group_by_length"]
        if self.precision is None:
            self.precision = ELASTIC_BIBERT["precision"] if elastic_recipe else "fp32"
        kbit_recipe = elastic_recipe and self.quant is not None and self.quant.activation_bits > 1
        if self.pred_weight is None:
            self.pred_weight = KBIT_RECIPE["pred_weight"] if kbit_recipe else \
                ELASTIC_BIBERT["pred_weight"] if elastic_recipe else 1.0
        if self.paper and self.mode != "distill":
            raise BibertError("--paper applies to distillation only")
        if self.mode == "distill":
            if self.distill is None:
                self.distill = KBIT_RECIPE["distill"] if kbit_recipe else DISTILL_KINDS[0]
            if self.distill not in DISTILL_KINDS:
                raise BibertError(f"unknown distillation {self.distill!r}: choose dmd or standard")
            self.quant = self.quant or default_student(self.paper)
        if self.dmd_mask_padding and (self.mode != "distill" or self.distill != "dmd"):
            raise BibertError("--dmd-mask-padding applies to distillation with --distill dmd only")
        if self.precision not in PRECISIONS:
            raise BibertError(f"unknown precision {self.precision!r}: choose fp32, bf16 or auto")
        if self.epochs is None and (self.mode != "distill" or self.paper):
            raise BibertError("--epochs must be given: only Elastic BiBERT's distillation chooses them from the data")
        for name in ("lr", "epochs"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise BibertError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.mode != "distill" and (self.init_from is not None or self.quantizer_lr is not None):
            raise BibertError("--init-from and --quantizer-lr apply to distillation only")
        if not (self.pred_weight >= 0 and math.isfinite(self.pred_weight)):
            raise BibertError(f"--pred-weight must be a finite number >= 0, got {self.pred_weight}")
        if self.mode != "distill" and self.pred_weight != 1.0:
            raise BibertError("--pred-weight applies to distillation only")
        if not 0.0 < self.budget_share <= 1.0:
            raise BibertError(f"budget_share is a share of the default budget in (0, 1], got {self.budget_share}")
        if not 0.0 <= self.phase_in < 1.0:
            raise BibertError(f"--phase-in is a share of the steps in [0, 1), got {self.phase_in}")
        if self.phase_in and not (self.mode == "distill" and self.quant.elastic):
            raise BibertError("--phase-in hardens elastic activations: it needs a distilled student with "
                              "--activations elastic")
        if self.quantizer_lr is not None and not self.quantizer_lr > 0:
            raise BibertError(f"--quantizer-lr must be positive, got {self.quantizer_lr}")
        for name in ("max_length", "batch_size", "log_every", "max_steps", "eval_every", "evals_per_epoch", "save_every",
                     "max_train_examples", "max_eval_examples", "student_layers"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise BibertError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise BibertError(f"--warmup-ratio must lie in [0, 1), got {self.warmup_ratio}")

    @property
    def quant_config(self) -> QuantConfig | None:
        """The student's QuantConfig (the same as `quant`; kept for older callers)."""
        return self.quant

    def to_dict(self) -> dict:
        """JSON: a registry task by its name, a task of your own data whole (Task.to_dict)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["task"] = self.task.name if self.task.registered else self.task.to_dict()
        d["quant"] = self.quant.to_dict() if self.quant is not None else None
        return {**d, "version": self.VERSION}

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Read `to_dict`'s output, or an older version's (version 1: the task by name)."""
        d = dict(d)
        version = d.pop("version", 1)
        if not isinstance(version, int) or version > cls.VERSION:
            raise BibertError(f"training config version {version} is newer than this bibert ({cls.VERSION}); upgrade bibert")
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise BibertError(f"unknown training options: {', '.join(sorted(unknown))}")
        return cls(**d)


def option_fields(mode: str | None = None) -> list:
    """The option fields of TrainConfig (those with help text), of one mode's command or all."""
    return [f for f in fields(TrainConfig) if f.metadata.get("help") and (mode is None or mode in f.metadata["modes"])]


def recipe_defaults(mode: str, task: Task, paper: bool = False) -> dict:
    """The defaults that come from the recipe: for distillation Elastic BiBERT's schedule
    (ELASTIC_SCHEDULE; epochs None: the budget, `budget_epochs`, once the data is known), or
    with `paper` the task's (docs/method.md §5); for fine-tuning FINETUNE_RECIPE; the task's
    max length, and its batch size where the recipe has none."""
    if mode != "distill":
        recipe = dict(FINETUNE_RECIPE)
    elif paper:
        recipe = {"lr": task.lr, "epochs": float(task.epochs)}
    else:
        recipe = {"lr": ELASTIC_SCHEDULE["lr"], "epochs": None, "batch_size": ELASTIC_SCHEDULE["batch_size"]}
    return {"max_length": task.max_length, "batch_size": task.batch_size, **recipe}


def resolve_config(mode: str, model: str, task: str | Task | None, out: str | os.PathLike, **options) -> TrainConfig:
    """A TrainConfig with every option left out (or None) taken from the recipe
    (`recipe_defaults`). `model` may be a folder, a hub name or `teacher` (the offline
    teacher, `bibert.data.resolve_model`); `task` a Task, a registry name, or None / a name
    of your own with `train_file` (`bibert.data.resolve_task`: for distillation the labels
    are the teacher's)."""
    from .checkpoint import model_labels
    from .data import resolve_model, resolve_task

    known = {f.name for f in fields(TrainConfig)} - {"mode", "task", "model", "out"}
    unknown = set(options) - known
    if unknown:
        raise BibertError(f"unknown training options: {', '.join(sorted(unknown))}")
    resolved = {k: v for k, v in options.items() if v is not None}
    model = resolve_model(str(model))
    labels, regression = model_labels(model) if mode == "distill" else (None, None)  # a teacher's labels stay
    task = resolve_task(task, labels=labels, regression=regression, **{
        k: resolved.get(k) for k in ("train_file", "text_column", "text_pair_column", "label_column")})
    for key, value in recipe_defaults(mode, task, bool(resolved.get("paper"))).items():
        resolved.setdefault(key, value)  # epochs None: Elastic BiBERT's budget, from the train split's size
    return TrainConfig(mode=mode, task=task, model=model, out=str(out), **resolved)
