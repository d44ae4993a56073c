"""One training loop for teacher fine-tuning and for BiBERT distillation.

    finetune(model, task, out, **options)   full-precision teacher (Hugging Face folders out)
    distill(teacher, task, out, quant=QuantConfig(), distill="dmd", **options)
                                            binarized student (BiBERT folders out)

Both resolve a `TrainConfig` (the task's recipe from SPEC section 5 for distillation; a
standard BERT fine-tuning recipe for the teacher, see FINETUNE_RECIPE), then run
`Trainer`: AdamW (eps 1e-6, weight decay 0.01 except biases and LayerNorm), linear
warm-up over the first 10% of the steps then linear decay, gradient clipping at 1.0,
evaluation every `eval_every` steps keeping the best checkpoint by the task's metric.

The same code runs in one process (CPU or one GPU) or under `torchrun` (DDP; see
bibert.distributed): the data order is a seeded per-epoch permutation
(DistributedSampler), so a run resumed from its last training state
(`resume=True`) takes the same batches, dropout masks and optimizer steps as an
uninterrupted run and ends with the same weights.

Output folder: config.json (this TrainConfig), metrics.jsonl (one line per
evaluation), results.json, training_curves.png, best/ and last/ (model + tokenizer,
loadable by from_pretrained), checkpoint/ (the training state for --resume).
Left out: gradient accumulation, mixed precision other than bf16 autocast, and
multi-node launch beyond torchrun's own.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path
from typing import Callable, ClassVar, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset

from . import distributed
from .checkpoint import STATE_DIR, load_training_state, recover_folder, save_training_state, write_folder_atomically
from .config import QuantConfig
from .data import build_dataset, collate_batch, load_examples
from .errors import BibertError
from .evaluate import predict
from .losses import LayerMap, dmd_distill_loss, standard_distill_loss
from .modeling import (BiBertForSequenceClassification, QuantEmbedding, QuantLinear, _is_quantizer_key, binarize,
                       calibrate_quantizers, load_hf_classifier, read_config)
from .tasks import Task, compute_metrics, get_task

MODES = ("finetune", "distill")
DISTILL_KINDS = ("dmd", "standard")
PRECISIONS = ("fp32", "bf16")
# Teacher fine-tuning: the usual BERT recipe (lr in 2e-5..5e-5, 3 epochs); SPEC 5's
# table is the distillation recipe. Max length and batch size come from the task.
FINETUNE_RECIPE = {"lr": 5e-5, "epochs": 3.0}
LOSS_PARTS = {"finetune": ("loss",), "dmd": ("loss", "pred", "q", "k", "v", "hid"),
              "standard": ("loss", "pred", "att", "hid")}


@dataclass
class TrainConfig:
    """The resolved configuration of one run (saved as OUT/config.json).

    mode: "finetune" (full-precision teacher) or "distill" (binarized student).
    model: the model to fine-tune, or the teacher folder to distil from.
    quant / distill / student_layers: the student (QuantConfig.to_dict()), the
        objective ("dmd" or "standard") and an optional shallower depth (distill only).
    lr, epochs, max_length, batch_size: the recipe; batch_size is per process.
    max_steps: stop after this many optimizer steps (overrides epochs for the schedule).
    eval_every / save_every: steps between evaluations (default: evals_per_epoch times an
        epoch) and between extra training-state checkpoints (default: only at evaluations).
    evals_per_epoch: dev evaluations per epoch when eval_every is not given (the best one
        is kept, as the reference keeps the best of its evaluations every 200 steps).
    init_from: the student's starting weights (distill only; default: the teacher's). A
        BiBERT folder, e.g. the best checkpoint of a 1-1-4 student (multi-step distillation).
    quantizer_lr: peak learning rate of the elastic quantizers' thresholds and scales (no
        weight decay; default: lr).
    max_train_examples / max_eval_examples: seeded random slices of the data.
    dmd_mask_padding: leave padded positions out of DMD's similarity matrices and the hidden
        loss (distill with dmd only; the reference, and the default, keeps them).
    group_by_length: batch examples of similar length together (less padding, so faster
        on CPU: each epoch's shuffled order is cut into windows of 50 batches, each window
        sorted by length and cut into batches, and the batches shuffled again).
    """

    mode: str
    task: str
    model: str
    out: str
    quant: dict | None = None
    distill: str | None = None
    student_layers: int | None = None
    lr: float = FINETUNE_RECIPE["lr"]
    epochs: float = FINETUNE_RECIPE["epochs"]
    max_length: int = 128
    batch_size: int = 16
    max_steps: int | None = None
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    adam_eps: float = 1e-6
    eval_every: int | None = None
    evals_per_epoch: int = 4
    save_every: int | None = None
    log_every: int = 10
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    train_file: str | None = None
    data_dir: str | None = None
    eval_test: bool = False
    group_by_length: bool = False
    dmd_mask_padding: bool = False
    init_from: str | None = None
    quantizer_lr: float | None = None
    seed: int = 42
    device: str = "auto"
    precision: str = "fp32"

    VERSION: ClassVar[int] = 1
    # options that may change between a run and its resumption
    RESUMABLE_CHANGES: ClassVar[tuple[str, ...]] = ("out", "device", "save_every", "eval_test")

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise BibertError(f"unknown mode {self.mode!r}: choose finetune or distill")
        self.task = get_task(self.task).name
        if self.mode == "distill":
            if self.distill not in DISTILL_KINDS:
                raise BibertError(f"unknown distillation {self.distill!r}: choose dmd or standard")
            self.quant = QuantConfig.from_dict(self.quant or {}).to_dict()
        if self.dmd_mask_padding and (self.mode != "distill" or self.distill != "dmd"):
            raise BibertError("--dmd-mask-padding applies to distillation with --distill dmd only")
        if self.precision not in PRECISIONS:
            raise BibertError(f"unknown precision {self.precision!r}: choose fp32 or bf16")
        for name in ("lr", "epochs"):
            if not getattr(self, name) > 0:
                raise BibertError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.mode != "distill" and (self.init_from is not None or self.quantizer_lr is not None):
            raise BibertError("--init-from and --quantizer-lr apply to distillation only")
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
        return QuantConfig.from_dict(self.quant) if self.quant is not None else None

    def to_dict(self) -> dict:
        return {**asdict(self), "version": self.VERSION}

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        version = d.pop("version", 1)
        if not isinstance(version, int) or version > cls.VERSION:
            raise BibertError(f"training config version {version} is newer than this bibert ({cls.VERSION}); upgrade bibert")
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise BibertError(f"unknown training options: {', '.join(sorted(unknown))}")
        return cls(**d)


GROUP_WINDOW = 50  # batches per length-sorted window


def group_by_length(order: list[int], lengths, batch_size: int, seed: int) -> list[int]:
    """`order` rearranged so that each batch_size slice holds examples of similar length.

    The order is cut into windows of GROUP_WINDOW batches; each window is sorted by
    length (longest first) and cut into batches; the batches of all windows are then
    shuffled (seeded), except that the batch holding the longest example goes first, so
    that a run meets its peak memory at once. A permutation of `order`: every example
    is still seen once per epoch.
    """
    window = batch_size * GROUP_WINDOW
    batches = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w:w + window], key=lambda i: -int(lengths[i]))
        batches += [chunk[b:b + batch_size] for b in range(0, len(chunk), batch_size)]
    if not batches:
        return []
    # the last slice of `order` may be short; keep the short batch last so that every
    # other batch stays full
    short = [b for b in batches if len(b) < batch_size]
    full = [b for b in batches if len(b) == batch_size]
    rng = np.random.default_rng(seed)
    perm = [full[i] for i in rng.permutation(len(full))]
    if perm:
        longest = max(range(len(perm)), key=lambda j: int(lengths[perm[j][0]]))
        perm[0], perm[longest] = perm[longest], perm[0]
    return [i for b in perm + short for i in b]


def resolve_config(mode: str, model: str, task: str | Task, out: str | os.PathLike, **options) -> TrainConfig:
    """A TrainConfig with every option left out (or None) taken from the recipe:
    distillation -> the task's SPEC 5 recipe (lr, epochs, max length, batch 16);
    fine-tuning  -> FINETUNE_RECIPE (lr 5e-5, 3 epochs) with the task's max length and batch."""
    task = get_task(task) if isinstance(task, str) else task
    known = {f.name for f in fields(TrainConfig)} - {"mode", "task", "model", "out"}
    unknown = set(options) - known
    if unknown:
        raise BibertError(f"unknown training options: {', '.join(sorted(unknown))}")
    recipe = {"lr": task.lr, "epochs": float(task.epochs)} if mode == "distill" else dict(FINETUNE_RECIPE)
    recipe.update(max_length=task.max_length, batch_size=task.batch_size)
    resolved = {k: v for k, v in options.items() if v is not None}
    for key, value in recipe.items():
        resolved.setdefault(key, value)
    return TrainConfig(mode=mode, task=task.name, model=str(model), out=str(out), **resolved)


# ------------------------------------------------------------------------------ models

def load_teacher(path: str, task: Task) -> BiBertForSequenceClassification:
    """The frozen teacher (eval mode, no gradients), exposing Q/K/V and hidden states.

    A Hugging Face BERT classifier becomes the full-precision BiBERT wrapper (computes
    exactly BERT); a BiBERT folder is used as it is (multi-step distillation). Its head
    must match the task: a classifier with the task's number of labels.
    """
    if os.path.isdir(path):
        config = read_config(path)
        if "bibert_format_version" in config:
            teacher = BiBertForSequenceClassification.from_pretrained(path)
        else:
            if not any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or []):
                raise BibertError(
                    f"the teacher {path} has no classification head ({', '.join(config.get('architectures') or ['?'])});"
                    f" fine-tune it on {task.name} first: bibert finetune --model {path} --task {task.name} --out DIR"
                )
            teacher = binarize(load_hf_classifier(path), QuantConfig.full_precision())
    else:  # a hub name
        teacher = binarize(load_hf_classifier(path), QuantConfig.full_precision())
    _check_labels(teacher.config, task, f"the teacher {path}")
    teacher.eval().requires_grad_(False)
    return teacher


def load_student_init(path: str, task: Task) -> nn.Module:
    """The weights a student starts from when they are not the teacher's: a BiBERT folder
    (e.g. an intermediate 1-1-4 student) or a Hugging Face classifier folder."""
    if not os.path.isdir(path):
        raise BibertError(f"--init-from {path}: no such folder; give a student's best/ folder")
    model = BiBertForSequenceClassification.from_pretrained(path) if "bibert_format_version" in read_config(path) \
        else load_hf_classifier(path)
    _check_labels(model.config, task, f"the starting student {path}")
    return model


def _check_labels(config, task: Task, what: str) -> None:
    if config.num_labels != task.num_labels:
        kind = "a regressor (1 output)" if config.num_labels == 1 else f"{config.num_labels} labels"
        raise BibertError(f"{what} has {kind}, but {task.name} needs {task.num_labels}; "
                          f"use a teacher fine-tuned on {task.name}")
    names = [config.id2label[i] for i in sorted(config.id2label)] if getattr(config, "id2label", None) else []
    generic = all(str(n) == f"LABEL_{i}" for i, n in enumerate(names))
    if task.label_list is not None and names and not generic and tuple(map(str, names)) != task.label_list:
        raise BibertError(f"{what} predicts labels {names}, but {task.name}'s labels are {list(task.label_list)}")


def shrink_student(student: BiBertForSequenceClassification, layers: int) -> BiBertForSequenceClassification:
    """Keep `layers` encoder layers: student layer i starts from teacher layer (i+1)k-1,
    the layer it is matched to (SPEC 4's depth mapping)."""
    keep = LayerMap(layers, student.config.num_hidden_layers).layers
    student.bert.encoder.layer = nn.ModuleList(student.bert.encoder.layer[i] for i in keep)
    student.config.num_hidden_layers = layers
    return student


def binarized_signs(model: nn.Module) -> dict[str, torch.Tensor]:
    """sign(W - rowmean(W)) >= 0 of every 1-bit weight and word-embedding table (bool)."""
    out = {}
    for name, m in model.named_modules():
        bits = m.weight_bits if isinstance(m, QuantLinear) else m.bits if isinstance(m, QuantEmbedding) else None
        if bits == 1:
            w = m.weight.detach()
            out[name] = (w - w.mean(-1, keepdim=True)) >= 0
    return out


def flip_ratio(model: nn.Module, reference: dict[str, torch.Tensor]) -> float:
    """Fraction of binarized weight signs that differ from `reference`."""
    now = binarized_signs(model)
    changed = sum(int((now[k] != ref.to(now[k].device)).sum()) for k, ref in reference.items())
    total = sum(ref.numel() for ref in reference.values())
    return changed / total if total else 0.0


def take_slice(examples: list, limit: int | None, seed: int) -> list:
    """A seeded random subset of `limit` examples, in their original order (all if None)."""
    if limit is None or limit >= len(examples):
        return examples
    pick = np.sort(np.random.default_rng(seed).permutation(len(examples))[:limit])
    return [examples[i] for i in pick]


# -------------------------------------------------------------------------- objectives

class FinetuneObjective:
    """The model's own loss: cross-entropy (MSE for regression) against the labels."""

    parts = LOSS_PARTS["finetune"]

    def __call__(self, model, batch: dict) -> dict[str, torch.Tensor]:
        return {"loss": model(**batch).loss}


class DistillObjective:
    """DMD (SPEC 4) or the standard TinyBERT/BinaryBERT objective against a frozen teacher."""

    def __init__(self, teacher: nn.Module, kind: str, layer_map: LayerMap, is_regression: bool,
                 mask_padding: bool = False):
        self.teacher, self.kind, self.layer_map, self.is_regression = teacher, kind, layer_map, is_regression
        self.mask_padding = mask_padding
        self.parts = LOSS_PARTS[kind]

    def __call__(self, model, batch: dict) -> dict[str, torch.Tensor]:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
        want = dict(output_hidden_states=True, output_qkv=self.kind == "dmd",
                    output_attention_scores=self.kind == "standard")
        with torch.no_grad():
            t = self.teacher(**inputs, **want)
        s = model(**inputs, **want)
        if self.kind == "dmd":
            mask = batch["attention_mask"] if self.mask_padding else None
            return dmd_distill_loss(s, t, batch.get("labels"), self.is_regression, self.layer_map, mask)
        return standard_distill_loss(s, t, batch["attention_mask"], self.is_regression, self.layer_map)


# ----------------------------------------------------------------------------- trainer

Hook = Callable[["Trainer"], None]


class Trainer:
    """Runs one TrainConfig; `run()` returns the results dict (also OUT/results.json).

    hooks: callables run after every optimizer step (and its evaluation or checkpoint)
    with the trainer (its `step`, `model`, ...), e.g. to stop early or inspect training.
    """

    def __init__(self, config: TrainConfig, hooks: Sequence[Hook] = ()):
        self.config, self.hooks = config, list(hooks)
        self.task = get_task(config.task)
        self.out = Path(config.out)

    # ---- set-up -----------------------------------------------------------------------

    def _build_models(self) -> None:
        cfg, task = self.config, self.task
        torch.manual_seed(cfg.seed)  # the same fresh head on every process
        if cfg.mode == "finetune":
            extra = {} if task.label_list is None else {
                "id2label": dict(enumerate(task.label_list)), "label2id": {n: i for i, n in enumerate(task.label_list)}}
            self.model = load_hf_classifier(cfg.model, num_labels=task.num_labels, ignore_mismatched_sizes=True, **extra)
            self.teacher, self.layer_map = None, None
            self.fresh_quantizers = False
            self.objective = FinetuneObjective()
        else:
            self.teacher = load_teacher(cfg.model, task).to(self.ctx.device)
            source = self.teacher if cfg.init_from is None else load_student_init(cfg.init_from, task)
            student = binarize(source, cfg.quant_config)
            # quantizers the source did not have start from data (calibrate_quantizers)
            self.fresh_quantizers = not (isinstance(source, BiBertForSequenceClassification) and source.quant.elastic)
            if cfg.student_layers:
                student = shrink_student(student, cfg.student_layers)
            self.model = student
            layer_map = LayerMap(student.config.num_hidden_layers, self.teacher.config.num_hidden_layers)
            self.layer_map = layer_map
            self.objective = DistillObjective(self.teacher, cfg.distill, layer_map, task.is_regression,
                                              cfg.dmd_mask_padding)
        self.model.to(self.ctx.device).train()
        from transformers import AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(cfg.model)
        except (OSError, ValueError) as exc:
            raise BibertError(f"cannot load the tokenizer of {cfg.model}: {str(exc).splitlines()[0]}") from None

    def _dataset(self, split: str, limit: int | None, file: str | None = None):
        cfg = self.config
        examples = take_slice(load_examples(self.task, split, data_dir=cfg.data_dir, file=file), limit, cfg.seed)
        return build_dataset(examples, self.tokenizer, cfg.max_length, self.task)

    def _build_data(self) -> None:
        cfg = self.config
        self.train_set = self._dataset("train", cfg.max_train_examples, cfg.train_file)
        self.dev_sets = {s: self._dataset(s, cfg.max_eval_examples) for s in self.task.dev_splits}
        self.sampler = DistributedSampler(self.train_set, num_replicas=self.ctx.world_size, rank=self.ctx.rank,
                                          shuffle=True, seed=cfg.seed, drop_last=False)
        self.steps_per_epoch = math.ceil(len(self.sampler) / cfg.batch_size)
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * self.steps_per_epoch))
        self.eval_every = cfg.eval_every or max(1, math.ceil(self.steps_per_epoch / cfg.evals_per_epoch))

    def _build_optimizer(self) -> None:
        cfg = self.config
        decay, no_decay, quantizers = [], [], []
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                group = quantizers if _is_quantizer_key(name) else \
                    no_decay if name.endswith("bias") or "LayerNorm" in name else decay
                group.append(p)
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if quantizers:  # elastic thresholds and scales: own learning rate, no weight decay
            groups.append({"params": quantizers, "weight_decay": 0.0, "lr": cfg.quantizer_lr or cfg.lr})
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, eps=cfg.adam_eps)
        warmup, total = int(cfg.warmup_ratio * self.total_steps), self.total_steps

        def schedule(step: int) -> float:  # linear warm-up, then linear decay to 0
            if step < warmup:
                return (step + 1) / warmup
            return max(0.0, (total - step) / max(1, total - warmup))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)

    def _start_or_resume(self, resume: bool) -> None:
        """Fresh state, or the saved one; checks that a resumed run has the same options."""
        config_path = self.out / "config.json"
        saved = None
        if resume and not config_path.exists() and self.ctx.is_main:
            print(f"--resume: {self.out} holds no run yet, so this starts a new one", flush=True)
        if config_path.exists():
            saved = TrainConfig.from_dict(json.loads(config_path.read_text()))
            if not resume:
                raise BibertError(f"{self.out} already holds a run; pass --resume to continue it or choose another --out")
            ours, theirs = self.config.to_dict(), saved.to_dict()
            diff = [k for k in ours if k not in TrainConfig.RESUMABLE_CHANGES and ours[k] != theirs.get(k)]
            if diff:
                changes = ", ".join(f"{k}: {theirs.get(k)!r} -> {ours[k]!r}" for k in diff)
                raise BibertError(f"cannot resume {self.out} with different options ({changes}); "
                                  "run with the original options or choose another --out")
        self.step, self.best, self.evaluations, self.history = 0, None, [], []
        self.train_seconds, self.teacher_metrics = 0.0, None
        self.log_sums, self.log_count = {}, 0  # training losses since the last logged average
        distributed.barrier(self.ctx)  # every process has looked at OUT before rank 0 changes it
        if saved is not None and self.ctx.is_main:
            for name in (STATE_DIR, "best", "last"):
                recover_folder(self.out / name)
        distributed.barrier(self.ctx)
        state = load_training_state(self.out, self.model) if saved is not None else None
        if state is None:
            if self.fresh_quantizers:
                self.calibration = self._calibrate()
            self.flip_reference = binarized_signs(self.model)
            if self.ctx.is_main:
                self.out.mkdir(parents=True, exist_ok=True)
                _write_json(config_path, self.config.to_dict())
            return
        if state["world_size"] != self.ctx.world_size:
            raise BibertError(f"{self.out} was trained with {state['world_size']} processes; resume it with the same number")
        self.model.to(self.ctx.device)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.best = state["step"], state["best"]
        self.evaluations, self.history = state["evaluations"], state["history"]
        self.train_seconds, self.teacher_metrics = state["train_seconds"], state["teacher_metrics"]
        self.flip_reference = state["flip_reference"]
        self.log_sums, self.log_count = state.get("log_sums", {}), state.get("log_count", 0)
        if self.ctx.is_main:
            print(f"resuming {self.out} from step {self.step} of {self.total_steps}", flush=True)
        rng = state["rng"][self.ctx.rank]
        torch.set_rng_state(rng["cpu"])
        if rng.get("cuda") is not None and self.ctx.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.ctx.device)
        if self.ctx.is_main:  # the log holds exactly the evaluations up to the saved step
            _write_lines(self.out / "metrics.jsonl", self.evaluations)

    def _calibrate(self) -> dict:
        """Windows and scales of fresh elastic quantizers from the first training batch
        (the same on every process: the seeded order of epoch 0; no RNG is drawn)."""
        batch = next(self._batches(0, 0))
        with self._autocast():
            report = calibrate_quantizers(self.model, batch, self.teacher, self.layer_map)
        if self.ctx.is_main and report:
            (self.out / "calibration.json").parent.mkdir(parents=True, exist_ok=True)
            _write_json(self.out / "calibration.json", report)
        return report

    # ---- evaluation and saving -----------------------------------------------------------

    def _autocast(self):
        return torch.autocast(self.ctx.device.type, dtype=torch.bfloat16, enabled=self.config.precision == "bf16")

    def evaluate(self, model: nn.Module, datasets: dict) -> dict[str, dict[str, float]]:
        """{split: metrics}; each process predicts every world_size-th example, and the
        predictions are gathered so every process computes the same metrics."""
        out = {}
        for split, ds in datasets.items():
            idx = list(range(self.ctx.rank, len(ds), self.ctx.world_size))
            preds, labels = np.zeros(0), np.zeros(0)
            if idx:
                loader = DataLoader(Subset(ds, idx), batch_size=max(64, self.config.batch_size),
                                    collate_fn=partial(collate_batch, pad_token_id=ds.pad_token_id),
                                    generator=torch.Generator())  # leaves the global RNG (dropout) alone
                with self._autocast():
                    preds, labels = predict(model, loader, self.task)
            gathered = distributed.all_gather_objects((idx, preds, labels), self.ctx)
            order = np.concatenate([np.asarray(g[0], dtype=np.int64) for g in gathered])
            preds = np.concatenate([g[1] for g in gathered])[np.argsort(order)]
            labels = np.concatenate([g[2] for g in gathered])[np.argsort(order)]
            if not self.task.is_regression:
                preds, labels = preds.astype(np.int64), labels.astype(np.int64)
            out[split] = compute_metrics(self.task, preds, labels)
        return out

    def _score(self, metrics: dict) -> float:
        return metrics[self.task.dev_splits[0]][self.task.best_metric]

    def _save_model(self, name: str) -> None:
        def write(folder: Path) -> None:
            self.unwrapped.save_pretrained(folder)
            self.tokenizer.save_pretrained(folder)

        write_folder_atomically(self.out / name, write)

    def _save_state(self) -> None:
        rng = {"cpu": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state(self.ctx.device) if self.ctx.device.type == "cuda" else None}
        rngs = distributed.all_gather_objects(rng, self.ctx)
        if not self.ctx.is_main:
            return
        save_training_state(self.out, self.unwrapped, {
            "step": self.step, "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "rng": [{k: (v.cpu() if v is not None else None) for k, v in r.items()} for r in rngs],
            "best": self.best, "evaluations": self.evaluations, "history": self.history,
            "train_seconds": self.train_seconds, "teacher_metrics": self.teacher_metrics,
            "flip_reference": self.flip_reference, "world_size": self.ctx.world_size,
            "log_sums": self.log_sums, "log_count": self.log_count})

    def _evaluate_and_keep_best(self, bar) -> None:
        metrics = self.evaluate(self.unwrapped, self.dev_sets)
        score = self._score(metrics)
        entry = {"step": self.step, "epoch": round(self.step / self.steps_per_epoch, 4), **metrics}
        since = self.evaluations[-1]["step"] if self.evaluations else 0
        recent = [h for h in self.history if h["step"] > since]
        if recent:  # the training losses logged since the previous evaluation, averaged
            entry["train"] = {k: float(np.mean([h[k] for h in recent if k in h])) for k in recent[-1] if k != "step"}
        self.evaluations.append(entry)
        improved = self.best is None or score > self.best["score"]
        if improved:
            self.best = {"score": score, "step": self.step, "metrics": metrics}
        if self.ctx.is_main:
            _append_line(self.out / "metrics.jsonl", entry)
            if improved:
                self._save_model("best")
            self._plot()
            shown = "  ".join(f"{s} " + " ".join(f"{k}={v:.4f}" for k, v in m.items()) for s, m in metrics.items())
            bar.write(f"step {self.step}: {shown}" + ("  (best)" if improved else ""))

    def _plot(self) -> None:
        from .plotting import plot_training_curves

        split, metric = self.task.dev_splits[0], self.task.best_metric
        curve = [{"step": e["step"], metric: e[split][metric]} for e in self.evaluations]
        plot_training_curves(self.history, curve, metric, self.out / "training_curves.png")

    # ---- the loop -------------------------------------------------------------------------

    def _batches(self, epoch: int, start: int):
        """Batches of one epoch from batch index `start`: the seeded permutation of this
        epoch, this process's share of it, cut into batch_size slices."""
        self.sampler.set_epoch(epoch)
        order = list(self.sampler)
        bs = self.config.batch_size
        if self.config.group_by_length:
            order = group_by_length(order, np.diff(self.train_set.offsets), bs, seed=self.config.seed + epoch)
        for b in range(start, self.steps_per_epoch):
            batch = collate_batch([self.train_set[i] for i in order[b * bs:(b + 1) * bs]], self.train_set.pad_token_id)
            yield {k: v.to(self.ctx.device) for k, v in batch.items()}

    def _train_step(self, batch: dict) -> dict[str, float]:
        cfg = self.config
        with self._autocast():
            parts = self.objective(self.model, batch)
        parts["loss"].backward()
        names = self.objective.parts
        values = distributed.all_reduce_mean(torch.stack([parts[n].detach().float() for n in names]), self.ctx)
        values = dict(zip(names, values.tolist()))
        if not math.isfinite(values["loss"]):
            kept = f"{self.out / STATE_DIR} (step {self._saved_step})" if self._saved_step else "none was written yet"
            raise BibertError(
                f"the loss became {values['loss']} at step {self.step + 1} ({', '.join(f'{k}={v:.4g}' for k, v in values.items())});"
                f" training stopped. Last good checkpoint: {kept}. Lower --lr or use --precision fp32.")
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return values

    def run(self, resume: bool = False) -> dict:
        self.ctx = distributed.setup(self.config.device)
        try:
            return self._run(resume)
        finally:
            distributed.teardown(self.ctx)

    def _run(self, resume: bool) -> dict:
        cfg, ctx = self.config, self.ctx
        self._build_models()
        self._build_data()
        self._build_optimizer()
        self._start_or_resume(resume)
        self.unwrapped = self.model
        if self.teacher is not None and self.teacher_metrics is None:
            self.teacher_metrics = self.evaluate(self.teacher, self.dev_sets)
        if self.step == 0:  # a fresh run: dropout masks from seed + rank (a resumed one restored its RNG)
            torch.manual_seed(cfg.seed + ctx.rank)
        if ctx.distributed:
            self.model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
        self._saved_step = self.step

        from tqdm.auto import tqdm

        bar = tqdm(total=self.total_steps, initial=self.step, disable=not ctx.is_main, dynamic_ncols=True,
                   desc=f"{cfg.mode} {self.task.name}")
        flip = None
        tic = time.perf_counter()
        try:
            while self.step < self.total_steps:
                epoch, start = divmod(self.step, self.steps_per_epoch)
                for batch in self._batches(epoch, start):
                    values = self._train_step(batch)
                    self.step += 1
                    for k, v in values.items():
                        self.log_sums[k] = self.log_sums.get(k, 0.0) + v
                    self.log_count += 1
                    if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                        if self.flip_reference:
                            flip = flip_ratio(self.unwrapped, self.flip_reference)
                        self.history.append({"step": self.step,
                                             **{k: v / self.log_count for k, v in self.log_sums.items()},
                                             "lr": self.scheduler.get_last_lr()[0],
                                             **({"flip": flip} if flip is not None else {})})
                        self.log_sums, self.log_count = {}, 0
                    bar.update(1)
                    bar.set_postfix({k: f"{v:.3f}" for k, v in values.items()}
                                    | ({"flip": f"{flip:.4f}"} if flip is not None else {}), refresh=False)
                    at_eval = self.step % self.eval_every == 0 or self.step == self.total_steps
                    if at_eval or (cfg.save_every and self.step % cfg.save_every == 0):
                        self.train_seconds += time.perf_counter() - tic
                        if at_eval:
                            self._evaluate_and_keep_best(bar)
                        self._save_state()
                        self._saved_step = self.step
                        tic = time.perf_counter()
                    for hook in self.hooks:
                        hook(self)
                    if self.step >= self.total_steps:
                        break
        finally:
            bar.close()
        return self._finish()

    def _finish(self) -> dict:
        """Last evaluation if missing, last/, test metrics, results.json and the plot
        (idempotent: a run resumed after it finished only redoes this)."""
        cfg = self.config
        if not self.evaluations or self.evaluations[-1]["step"] != self.step:
            from tqdm.auto import tqdm

            self._evaluate_and_keep_best(tqdm(disable=True))
            self._save_state()
        if self.ctx.is_main:
            self._save_model("last")
        test = None
        if cfg.eval_test:
            from safetensors.torch import load_file

            distributed.barrier(self.ctx)  # best/ is complete
            best = load_file(str(self.out / "best" / "model.safetensors"), device=str(self.ctx.device))
            self.unwrapped.load_state_dict(best)
            test = self.evaluate(self.unwrapped, self._test_sets())
        last = self.evaluations[-1]
        results = {
            "task": self.task.name, "mode": cfg.mode, "metric": self.task.best_metric,
            "best": self.best, "last": {"step": last["step"], "metrics": {s: last[s] for s in self.task.dev_splits}},
            "test": test, "teacher": self.teacher_metrics, "steps": self.step,
            "epochs": round(self.step / self.steps_per_epoch, 4), "train_examples": len(self.train_set),
            "world_size": self.ctx.world_size, "train_seconds": round(self.train_seconds, 3),
            "train_examples_per_s": round(self.step * cfg.batch_size * self.ctx.world_size / max(self.train_seconds, 1e-9), 2),
            "out": str(self.out),
        }
        if self.ctx.is_main:
            _write_json(self.out / "results.json", results)
            self._plot()
        distributed.barrier(self.ctx)  # leave together: no rank tears the group down while another still works
        return results

    def _test_sets(self) -> dict:
        sets = {}
        for split in self.task.test_splits:
            examples = load_examples(self.task, split, data_dir=self.config.data_dir)
            if all(ex.label is not None for ex in examples):
                sets[split] = build_dataset(examples, self.tokenizer, self.config.max_length, self.task)
        if not sets:
            raise BibertError(f"{self.task.name}'s test split has no labels here; drop --eval-test")
        return sets


# -------------------------------------------------------------------------- public API

def finetune(model: str, task: str | Task, out: str | os.PathLike, *, resume: bool = False,
             hooks: Sequence[Hook] = (), **options) -> dict:
    """Fine-tune a full-precision BERT classifier (a folder or hub name) on `task`.

    best/ and last/ in `out` are standard Hugging Face folders (config, weights,
    tokenizer) with the task's label names. options: any TrainConfig field (lr, epochs,
    max_length, batch_size, max_steps, eval_every, max_train_examples, seed, device, ...).
    Returns the results dict (also written to out/results.json).
    """
    return Trainer(resolve_config("finetune", model, task, out, **options), hooks).run(resume)


def distill(teacher: str, task: str | Task, out: str | os.PathLike, *, quant: QuantConfig | None = None,
            distill: str = "dmd", student_layers: int | None = None, resume: bool = False,
            via: str | QuantConfig | None = None, via_share: float = 0.5,
            hooks: Sequence[Hook] = (), **options) -> dict:
    """Build a quantized student (default BiBERT 1-1-1, Bi-Attention) from a fine-tuned
    teacher folder and train it with DMD ("dmd") or the standard objective ("standard").

    The paper's ablation: softmax+standard (baseline), bi+standard, softmax+dmd, bi+dmd.
    best/ and last/ are BiBERT folders (BiBertForSequenceClassification.from_pretrained).

    via (multi-step distillation, after BiT): first distil an intermediate student with
    these bits (e.g. "1-1-4": same attention and objective, wider activations) into
    OUT/via-<bits>/, for `via_share` of the epochs; then the final student starts from its
    best checkpoint and trains for the rest, against the same teacher. The total number of
    steps is the single-stage run's. Each stage resumes on its own; a finished stage is kept.
    Returns the results dict of the final stage (also written to out/results.json), with the
    intermediate stage's under "via".
    """
    quant = quant or QuantConfig()

    def stage(stage_out, stage_quant: QuantConfig, **stage_options) -> dict:
        config = resolve_config("distill", teacher, task, stage_out, quant=stage_quant.to_dict(), distill=distill,
                                student_layers=student_layers, **stage_options)
        return Trainer(config, hooks).run(resume)

    if via is None:
        return stage(out, quant, **options)
    if not 0 < via_share < 1:
        raise BibertError(f"--via-share must lie strictly between 0 and 1, got {via_share}")
    if options.get("max_steps") is not None or options.get("init_from") is not None:
        raise BibertError("--via splits the epochs between the stages: leave out --max-steps and --init-from")
    middle = via if isinstance(via, QuantConfig) else QuantConfig.from_bits(via, quant.attention)
    epochs = options.get("epochs") or float((get_task(task) if isinstance(task, str) else task).epochs)
    stage_out = Path(out) / f"via-{middle.bits}"
    first_options = {**options, "epochs": epochs * via_share}
    first = _finished(stage_out) or stage(stage_out, middle, **first_options)
    second = stage(out, quant, **{**options, "epochs": epochs * (1 - via_share), "init_from": str(stage_out / "best")})
    second["via"] = first
    if int(os.environ.get("RANK", "0")) == 0:
        _write_json(Path(out) / "results.json", second)
    return second


def _finished(out: Path) -> dict | None:
    """results.json of a finished run in `out`, else None."""
    path = out / "results.json"
    return json.loads(path.read_text()) if path.is_file() else None


def finetune_and_distill(model: str, task: str | Task, out: str | os.PathLike, *, resume: bool = False,
                         teacher_options: dict | None = None, **distill_options) -> dict:
    """The whole recipe: fine-tune `model` into OUT/teacher, then distil its best
    checkpoint into OUT/student. teacher_options go to `finetune`, the rest to `distill`
    (quant, distill, student_layers and any training option). Returns
    {"teacher": results, "student": results}."""
    out = Path(out)
    shared = {k: distill_options[k] for k in ("max_train_examples", "max_eval_examples", "data_dir",
                                              "seed", "device", "precision") if k in distill_options}
    teacher = finetune(model, task, out / "teacher", resume=resume, **{**shared, **(teacher_options or {})})
    student = distill(str(out / "teacher" / "best"), task, out / "student", resume=resume, **distill_options)
    return {"teacher": teacher, "student": student}


def run(config: TrainConfig, resume: bool = False, hooks: Sequence[Hook] = ()) -> dict:
    """Run a resolved TrainConfig (e.g. TrainConfig.from_dict(json.load(open("OUT/config.json"))))."""
    return Trainer(config, hooks).run(resume)


# ----------------------------------------------------------------------------- helpers

def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _write_lines(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def _append_line(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
