"""One training loop for teacher fine-tuning and for BiBERT distillation.

    finetune(model, task, out, **options)   full-precision teacher (Hugging Face folders out)
    distill(teacher, task, out, quant=QuantConfig(), distill="dmd", **options)
                                            binarized student (BiBERT folders out)
    finetune_and_distill(model, task, out)  both, the teacher's best checkpoint distilled
    run(TrainConfig)                        a resolved configuration (e.g. OUT/config.json)

Each resolves a `TrainConfig` (bibert.config: every option, its default and help; the
task's recipe, docs/method.md §5, for distillation; FINETUNE_RECIPE for the teacher),
then runs `Trainer`: AdamW (eps 1e-6, weight decay 0.01 except biases and LayerNorm),
linear warm-up over the first 10% of the steps then linear decay, gradient clipping at
1.0, evaluation every `eval_every` steps keeping the best checkpoint by the task's
metric. The objective is bibert.losses' (`FinetuneObjective`, `DistillObjective`), the
data bibert.data's (`load_split`, `take_slice`, `group_by_length`), the teacher and the
starting student bibert.modeling's, the files bibert.checkpoint's.

The same code runs in one process (CPU or one GPU) or under `torchrun` (DDP; see
bibert.distributed): the data order is a seeded per-epoch permutation
(DistributedSampler), so a run resumed from its last training state
(`resume=True`) takes the same batches, dropout masks and optimizer steps as an
uninterrupted run and ends with the same weights.

Output folder (bibert.checkpoint): config.json (this TrainConfig), metrics.jsonl (one
line per evaluation), results.json, training_curves.png, best/ and last/ (model +
tokenizer, loadable by from_pretrained), checkpoint/ (the training state for --resume).
Left out: gradient accumulation, mixed precision other than bf16 autocast, and
multi-node launch beyond torchrun's own.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset

from . import distributed
from .batches import build_dataset, collate_batch
from .checkpoint import (BEST_DIR, CALIBRATION_NAME, CURVES_NAME, LAST_DIR, METRICS_NAME, RESULTS_NAME,
                         RUN_CONFIG_NAME, STATE_DIR, WEIGHTS_NAME, append_jsonl, load_training_state,
                         read_json_if_exists, recover_folder, save_training_state, write_folder_atomically, write_json,
                         write_jsonl)
from .config import (KBIT_RECIPE, VIA_SHARE, QuantConfig, TrainConfig, budget_epochs, default_student,
                     option_fields, resolve_config)
from .data import describe_task, group_by_length, is_task_name, load_split, take_slice
from .errors import BibertError
from .evaluate import predict
from .losses import DistillObjective, FinetuneObjective, LayerMap
from .modeling import (BiBertForSequenceClassification, _is_quantizer_key, binarize, binarized_signs,
                       calibrate_quantizers, flip_ratio, load_hf_classifier, load_student_init, load_teacher,
                       set_activation_hardness, shrink_student)
from .tasks import Task, compute_metrics

__all__ = ["finetune", "distill", "finetune_and_distill", "run", "Trainer", "TrainConfig", "resolve_config",
           "VIA_SHARE"]

ESTIMATE_AFTER = (3, 13)  # the time estimate printed at the start: the steps it times (after a warm-up)


# ----------------------------------------------------------------------------- trainer

@contextlib.contextmanager
def _binary_activations(model: nn.Module):
    """Evaluation sees binary activations whatever the phase-in has reached; restored after."""
    from .modeling import ActQuantizer

    quantizers = [m for m in model.modules() if isinstance(m, ActQuantizer)]
    saved = [m.hardness for m in quantizers]
    for m in quantizers:
        m.hardness = 1.0
    try:
        yield
    finally:
        for m, h in zip(quantizers, saved):
            m.hardness = h


def _adamw(groups: list[dict], **options) -> torch.optim.AdamW:
    """AdamW with the fused kernel where torch has it for these parameters (one pass over
    each tensor instead of about ten: a distillation step about 1.15x faster on CPU, the
    same update up to float rounding); the per-tensor loop elsewhere."""
    try:
        return torch.optim.AdamW(groups, fused=True, **options)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, **options)


Hook = Callable[["Trainer"], None]


class Trainer:
    """Runs one TrainConfig; `run()` returns the results dict (also OUT/results.json).

    hooks: callables run after every optimizer step (and its evaluation or checkpoint)
    with the trainer (its `step`, `model`, ...), e.g. to stop early or inspect training.
    """

    def __init__(self, config: TrainConfig, hooks: Sequence[Hook] = ()):
        self.config, self.hooks = config, list(hooks)
        self.task = config.task
        self.out = Path(config.out)
        # a dev (test) file stands for the task's first dev (test) split
        self.dev_splits = self.task.dev_splits[:1] if config.dev_file else self.task.dev_splits
        self.test_splits = self.task.test_splits[:1] if config.test_file else self.task.test_splits

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
            student = binarize(source, cfg.quant)
            # quantizers the source did not have start from data (calibrate_quantizers)
            self.fresh_quantizers = not (isinstance(source, BiBertForSequenceClassification) and source.quant.elastic)
            if cfg.student_layers:
                student = shrink_student(student, cfg.student_layers)
            self.model = student
            layer_map = LayerMap(student.config.num_hidden_layers, self.teacher.config.num_hidden_layers)
            self.layer_map = layer_map
            self.objective = DistillObjective(self.teacher, cfg.distill, layer_map, task.is_regression,
                                              cfg.dmd_mask_padding, cfg.pred_weight)
        self.model.to(self.ctx.device).train()
        from transformers import AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(cfg.model)
        except (OSError, ValueError) as exc:
            raise BibertError(f"cannot load the tokenizer of {cfg.model}: {str(exc).splitlines()[0]}") from None

    def _examples(self, split: str) -> list:
        cfg = self.config
        return load_split(self.task, split, train_file=cfg.train_file, dev_file=cfg.dev_file, test_file=cfg.test_file,
                          data_dir=cfg.data_dir, text_column=cfg.text_column, text_pair_column=cfg.text_pair_column,
                          label_column=cfg.label_column)

    def _dataset(self, split: str, limit: int | None):
        cfg = self.config
        examples = take_slice(self._examples(split), limit, cfg.seed)
        return build_dataset(examples, self.tokenizer, cfg.max_length, self.task)

    def _build_data(self) -> None:
        cfg = self.config
        self.train_set = self._dataset("train", cfg.max_train_examples)
        self.dev_sets = {s: self._dataset(s, cfg.max_eval_examples) for s in self.dev_splits}
        self.sampler = DistributedSampler(self.train_set, num_replicas=self.ctx.world_size, rank=self.ctx.rank,
                                          shuffle=True, seed=cfg.seed, drop_last=False)
        self.steps_per_epoch = math.ceil(len(self.sampler) / cfg.batch_size)
        if cfg.epochs is None:  # Elastic BiBERT's budget, from the train split's size (saved in config.json)
            cfg.epochs = round(budget_epochs(len(self.train_set)) * cfg.budget_share, 4)
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
        self.optimizer = _adamw(groups, lr=cfg.lr, eps=cfg.adam_eps)
        warmup, total = int(cfg.warmup_ratio * self.total_steps), self.total_steps

        def schedule(step: int) -> float:  # linear warm-up, then linear decay to 0
            if step < warmup:
                return (step + 1) / warmup
            return max(0.0, (total - step) / max(1, total - warmup))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)

    def _start_or_resume(self, resume: bool) -> None:
        """Fresh state, or the saved one; checks that a resumed run has the same options."""
        config_path = self.out / RUN_CONFIG_NAME
        saved = None
        if resume and not config_path.exists() and self.ctx.is_main:
            print(f"--resume: {self.out} holds no run yet, so this starts a new one", flush=True)
        if config_path.exists():
            saved = TrainConfig.from_dict(read_json_if_exists(config_path))
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
            for name in (STATE_DIR, BEST_DIR, LAST_DIR):
                recover_folder(self.out / name)
        distributed.barrier(self.ctx)
        state = load_training_state(self.out, self.model) if saved is not None else None
        if state is None:
            if self.fresh_quantizers:
                self.calibration = self._calibrate()
            self.flip_reference = binarized_signs(self.model)
            if self.ctx.is_main:
                if saved is not None:
                    print(f"{self.out} has no checkpoint yet: the run starts again from step 0", flush=True)
                self.out.mkdir(parents=True, exist_ok=True)
                write_json(config_path, self.config.to_dict())
                write_jsonl(self.out / METRICS_NAME, [])  # no lines left from a run that never checkpointed
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
            write_jsonl(self.out / METRICS_NAME, self.evaluations)

    def _calibrate(self) -> dict:
        """Windows and scales of fresh elastic quantizers from the first training batch
        (the same on every process: the seeded order of epoch 0; no RNG is drawn)."""
        batch = next(self._batches(0, 0))
        with self._autocast():
            report = calibrate_quantizers(self.model, batch, self.teacher, self.layer_map)
        if self.ctx.is_main and report:
            self.out.mkdir(parents=True, exist_ok=True)
            write_json(self.out / CALIBRATION_NAME, report)
        return report

    # ---- evaluation and saving -----------------------------------------------------------

    def _autocast(self):
        return torch.autocast(self.ctx.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

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
                with self._autocast(), _binary_activations(model):  # the model as exported, also in a phase-in
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
        return metrics[self.dev_splits[0]][self.task.best_metric]

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
            append_jsonl(self.out / METRICS_NAME, entry)
            if improved:
                self._save_model(BEST_DIR)
            self._plot()
            shown = "  ".join(f"{s} " + " ".join(f"{k}={v:.4f}" for k, v in m.items()) for s, m in metrics.items())
            bar.write(f"step {self.step}: {shown}" + ("  (best)" if improved else ""))

    def _plot(self) -> None:
        from .plotting import plot_training_curves

        split, metric = self.dev_splits[0], self.task.best_metric
        curve = [{"step": e["step"], metric: e[split][metric]} for e in self.evaluations]
        plot_training_curves(self.history, curve, metric, self.out / CURVES_NAME)

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
        if cfg.phase_in:  # progressive binarization: hardness 1 / n ... 1 over the first phase_in of the steps
            set_activation_hardness(self.unwrapped, min(1.0, (self.step + 1) / (cfg.phase_in * self.total_steps)))
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
        self.precision = distributed.resolve_precision(self.config.precision, self.ctx.device)
        try:
            return self._run(resume)
        finally:
            distributed.teardown(self.ctx)

    def _run(self, resume: bool) -> dict:
        cfg, ctx = self.config, self.ctx
        if ctx.is_main and not self.task.registered:
            print(f"task {describe_task(self.task)}", flush=True)
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

        if ctx.is_main:
            print(self._plan(), flush=True)
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not ctx.is_main, dynamic_ncols=True,
                   desc=f"{cfg.mode} {self.task.name}")
        flip = None
        tic = time.perf_counter()
        first_step, timed_from = self.step, None
        try:
            while self.step < self.total_steps:
                epoch, start = divmod(self.step, self.steps_per_epoch)
                for batch in self._batches(epoch, start):
                    values = self._train_step(batch)
                    self.step += 1
                    if self.step == first_step + ESTIMATE_AFTER[0]:
                        timed_from = time.perf_counter()
                    elif self.step == first_step + ESTIMATE_AFTER[1] and timed_from is not None and ctx.is_main:
                        per_step = (time.perf_counter() - timed_from) / (ESTIMATE_AFTER[1] - ESTIMATE_AFTER[0])
                        left = per_step * (self.total_steps - self.step) / 60
                        bar.write(f"{per_step:.2f} s a step here: about {left:.0f} min of training left "
                                  f"(evaluations besides)")
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

    def _plan(self) -> str:
        """What the run will do, stated when it starts: the model, the steps and the data."""
        cfg = self.config
        if cfg.mode == "finetune":
            what = "fine-tuning the full-precision teacher"
        else:
            q = cfg.quant
            kind = "Elastic BiBERT" if q.elastic and q.attention == "bi-max" else \
                "the paper's BiBERT" if (q.activations, q.attention, q.activation_bits) == ("sign", "bi", 1) else "student"
            what = f"distilling {kind} {q.bits} ({q.activations} activations, {q.attention} attention, {cfg.distill})"
        n = len(self.train_set)
        return (f"{what}: {self.total_steps:,} steps of {cfg.batch_size * self.ctx.world_size} examples "
                f"({self.total_steps / self.steps_per_epoch:.2f} epochs of {n:,}), lr {cfg.lr:g}, max length "
                f"{cfg.max_length}, {self.precision}{', length-grouped batches' if cfg.group_by_length else ''}; "
                f"step {self.step} now")

    def _finish(self) -> dict:
        """Last evaluation if missing, last/, test metrics, results.json and the plot
        (idempotent: a run resumed after it finished only redoes this)."""
        cfg = self.config
        if not self.evaluations or self.evaluations[-1]["step"] != self.step:
            from tqdm.auto import tqdm

            self._evaluate_and_keep_best(tqdm(disable=True))
            self._save_state()
        if self.ctx.is_main:
            self._save_model(LAST_DIR)
        test = None
        if cfg.eval_test:
            from safetensors.torch import load_file

            distributed.barrier(self.ctx)  # best/ is complete
            best = load_file(str(self.out / BEST_DIR / WEIGHTS_NAME), device=str(self.ctx.device))
            self.unwrapped.load_state_dict(best)
            test = self.evaluate(self.unwrapped, self._test_sets())
        last = self.evaluations[-1]
        results = {
            "task": self.task.name, "mode": cfg.mode, "metric": self.task.best_metric,
            "best": self.best, "last": {"step": last["step"], "metrics": {s: last[s] for s in self.dev_splits}},
            "test": test, "teacher": self.teacher_metrics, "steps": self.step,
            "epochs": round(self.step / self.steps_per_epoch, 4), "train_examples": len(self.train_set),
            "world_size": self.ctx.world_size, "precision": self.precision,
            "train_seconds": round(self.train_seconds, 3),
            "train_examples_per_s": round(self.step * cfg.batch_size * self.ctx.world_size / max(self.train_seconds, 1e-9), 2),
            "out": str(self.out),
        }
        if self.ctx.is_main:
            write_json(self.out / RESULTS_NAME, results)
            self._plot()
        distributed.barrier(self.ctx)  # leave together: no rank tears the group down while another still works
        return results

    def _test_sets(self) -> dict:
        sets = {}
        for split in self.test_splits:
            examples = self._examples(split)
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


def distill(teacher: str, task: str | Task | None, out: str | os.PathLike, *, quant: QuantConfig | None = None,
            distill: str | None = None, student_layers: int | None = None, resume: bool = False,
            via: str | QuantConfig | None = None, via_share: float = VIA_SHARE,
            hooks: Sequence[Hook] = (), **options) -> dict:
    """Build a quantized student from a fine-tuned teacher folder and train it with DMD
    ("dmd", the default) or the standard objective ("standard").

    The default student and recipe is Elastic BiBERT (1-1-1, elastic binarization, bi-max
    Bi-Attention, prediction weight 5, bf16 where the CPU has it, lr 5e-4, batch 32,
    length-grouped batches; docs/method.md §7) for a budget of 80,000 examples, at most 10
    epochs (`config.budget_epochs`), unless epochs or max_steps are given; `paper=True`
    gives the paper's BiBERT (sign activations, Bi-Attention) with the task's recipe.

    The paper's ablation: softmax+standard (baseline), bi+standard, softmax+dmd, bi+dmd.
    best/ and last/ are BiBERT folders (BiBertForSequenceClassification.from_pretrained).
    A task of your own data (task None or a name of your own, with train_file) keeps the
    teacher's labels.

    via (multi-step distillation, after BiT; docs/method.md §8): first distil an
    intermediate student with these bits (e.g. "1-1-4") into OUT/via-<bits>/, for `via_share`
    of the training; then the final student starts from its best checkpoint and trains for
    the rest, against the same teacher, each stage with its own schedule. The total is the
    single-stage run's (the default budget, epochs or max_steps), split. Without `paper` the
    intermediate student trains the k-bit recipe (KBIT_RECIPE: softmax attention, the
    standard objective, prediction weight 1), as a 1-1-k student on its own would; with
    `paper` it keeps the final stage's attention (Bi-Attention) and objective. Each stage
    resumes on its own; a finished stage is kept. Returns the results dict of the final stage
    (also written to out/results.json), with the intermediate stage's under "via".
    """
    final = resolve_config("distill", teacher, task, out, quant=quant, distill=distill, student_layers=student_layers,
                           **options)
    if via is None:
        return Trainer(final, hooks).run(resume)
    if not 0 < via_share < 1:
        raise BibertError(f"--via-share must lie strictly between 0 and 1, got {via_share}")
    if options.get("init_from") is not None:
        raise BibertError("--via starts the final student from the intermediate one: leave out --init-from (or "
                          "--via)")
    max_steps = options.get("max_steps")
    if max_steps is not None and max_steps < 2:
        raise BibertError(f"--via splits --max-steps between two stages: give at least 2, got {max_steps}")
    if isinstance(via, QuantConfig):
        middle = via
    elif final.paper:  # the paper's objective throughout: k-bit activations, Bi-Attention
        middle = QuantConfig.from_bits(via, "bi" if final.quant.attention == "bi-max" else final.quant.attention)
    else:
        middle = QuantConfig.from_bits(via, KBIT_RECIPE["attention"])
    if middle.activation_bits <= final.quant.activation_bits:
        raise BibertError(f"--via {middle.bits} must have wider activations than the student ({final.quant.bits})")
    if final.paper:
        own = {"distill": final.distill, "pred_weight": final.pred_weight}
    else:  # the k-bit recipe; options of the elastic student alone (phase-in, DMD's padding mask) stay with it
        own = {"distill": KBIT_RECIPE["distill"], "pred_weight": KBIT_RECIPE["pred_weight"], "phase_in": 0.0,
               "dmd_mask_padding": False}

    def share(first: bool) -> dict:  # a stage's part of --max-steps, of --epochs, or of the default budget
        if max_steps is not None:
            steps = min(max_steps - 1, max(1, round(max_steps * via_share)))
            return {"max_steps": steps if first else max_steps - steps}
        part = via_share if first else 1 - via_share
        return {"epochs": final.epochs * part} if final.epochs is not None else {"budget_share": part}

    def stage(stage_out, stage_quant: QuantConfig, **stage_options) -> dict:
        config = resolve_config("distill", final.model, final.task, stage_out, quant=stage_quant,
                                student_layers=student_layers, **stage_options)
        return Trainer(config, hooks).run(resume)

    stage_out = Path(out) / f"via-{middle.bits}"
    first = read_json_if_exists(stage_out / RESULTS_NAME) or stage(stage_out, middle,
                                                                  **{**options, **own, **share(True)})
    second = stage(out, final.quant, **{**options, "distill": final.distill, "pred_weight": final.pred_weight,
                                        **share(False), "init_from": str(stage_out / BEST_DIR)})
    second["via"] = first
    if int(os.environ.get("RANK", "0")) == 0:
        write_json(Path(out) / RESULTS_NAME, second)
    return second


def finetune_and_distill(model: str, task: str | Task | None, out: str | os.PathLike, *, resume: bool = False,
                         teacher_options: dict | None = None, **distill_options) -> dict:
    """The whole recipe: fine-tune `model` into OUT/teacher, then distil its best
    checkpoint into OUT/student. teacher_options go to `finetune`, the rest to `distill`
    (quant, distill, student_layers and any training option); the options that describe
    the data and the machine (TrainConfig fields marked shared) go to both, and so does
    train_file for a task of your own data. Returns {"teacher": results, "student": results}."""
    out = Path(out)
    own_data = not task.registered if isinstance(task, Task) else task is None or not is_task_name(task)
    keys = {f.name for f in option_fields() if f.metadata["shared"]} | ({"train_file"} if own_data else set())
    shared = {k: distill_options[k] for k in keys if k in distill_options}
    teacher = finetune(model, task, out / "teacher", resume=resume, **{**shared, **(teacher_options or {})})
    student = distill(str(out / "teacher" / BEST_DIR), task, out / "student", resume=resume, **distill_options)
    return {"teacher": teacher, "student": student}


def run(config: TrainConfig, resume: bool = False, hooks: Sequence[Hook] = ()) -> dict:
    """Run a resolved TrainConfig (e.g. TrainConfig.from_dict(json.load(open("OUT/config.json"))))."""
    return Trainer(config, hooks).run(resume)
