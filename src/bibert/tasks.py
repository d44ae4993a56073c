"""The task registry: GLUE's nine tasks, two offline corpora, and user-defined tasks.

A `Task` names its sentence fields, its label set (None for regression), its metrics,
the metric that picks the best checkpoint, its evaluation splits and the training
recipe of the BiBERT reference (docs/method.md §5: batch 16; lr, epochs and max length
per task). `compute_metrics` computes every metric of a task with NumPy (the values of
scikit-learn and scipy, which the runtime install does not have).

Label order follows the GLUE `ClassLabel` names of Hugging Face `datasets`, so an
integer label from there indexes `label_list` directly (MNLI: entailment, neutral,
contradiction). Metrics are fractions in [0, 1] (the paper prints them x100).

Left out: GLUE's diagnostic set (AX) and test-set submission files.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np

from .errors import BibertError

ALL_METRICS = ("accuracy", "f1", "mcc", "pearson", "spearman", "pearson_spearman_mean")
# A task of your own data without a dev file holds out this share of its train file as dev
# data: the examples whose text hashes into the first HELD_OUT_PERCENT of 100 buckets.
HELD_OUT_PERCENT = 10


@dataclass(frozen=True)
class Task:
    """One task: fields, labels, metrics, splits and training recipe.

    name: registry key (lower case, e.g. "sst2").
    text_a / text_b: field names of the first / second sentence (text_b None for
        single-sentence tasks); also the keys of JSONL files written for this task.
    label_list: label names in index order; None for regression.
    metrics: metric keys `compute_metrics` returns; best_metric: the one that selects
        the best checkpoint.
    dev_splits / test_splits: split names used by `bibert evaluate --split dev|test`.
    lr, epochs, max_length, batch_size: recipe defaults (docs/method.md §5).
    glue_dir: folder name in the original GLUE layout (None for non-GLUE tasks).
    hf_config / hf_fields: `datasets.load_dataset("glue", hf_config)` and its column
        names for text_a / text_b (None when the task is not on the hub's GLUE).
    """

    name: str
    text_a: str
    text_b: str | None
    label_list: tuple[str, ...] | None
    metrics: tuple[str, ...]
    best_metric: str
    dev_splits: tuple[str, ...] = ("dev",)
    test_splits: tuple[str, ...] = ("test",)
    lr: float = 1e-4
    epochs: int = 10
    max_length: int = 128
    batch_size: int = 16
    glue_dir: str | None = None
    hf_config: str | None = None
    hf_fields: tuple[str, str | None] | None = None

    @property
    def is_regression(self) -> bool:
        return self.label_list is None

    @property
    def num_labels(self) -> int:
        """Width of the classifier head: 1 for regression."""
        return 1 if self.label_list is None else len(self.label_list)

    @property
    def is_pair(self) -> bool:
        return self.text_b is not None

    @property
    def splits(self) -> tuple[str, ...]:
        return ("train", *self.dev_splits, *self.test_splits)

    def eval_splits(self, split: str) -> tuple[str, ...]:
        """Expand "dev" / "test" to this task's split names (MNLI: matched and mismatched)."""
        if split == "dev":
            return self.dev_splits
        if split == "test":
            return self.test_splits
        if split in self.splits:
            return (split,)
        valid = dict.fromkeys(("dev", "test", *self.splits))  # each name once, in order
        raise BibertError(f"{self.name} has no split {split!r}; valid: {', '.join(valid)}")

    @property
    def registered(self) -> bool:
        """Whether this is a task of the registry (TASKS), which knows where its data come from."""
        return TASKS.get(self.name) == self

    @classmethod
    def custom(cls, name: str, label_list: list[str] | None, pair: bool, text_a: str | None = None,
               text_b: str | None = None) -> "Task":
        """A user task: labels given (classification) or None (regression).

        Fields are text_a (default "sentence", or "sentence1" for pairs) and, for pairs,
        text_b (default "sentence2"): the columns of the task's files. Metrics are accuracy
        and macro F1 (selection: accuracy), or Pearson/Spearman (selection: their mean).
        Recipe: lr 1e-4, 10 epochs, max length 128, batch 16.
        """
        if label_list is not None and len(label_list) < 2:
            raise BibertError(f"task {name!r} needs at least two labels, found {list(label_list)}")
        if pair:
            text_a, text_b = text_a or "sentence1", text_b or "sentence2"
        else:
            text_a, text_b = text_a or "sentence", None
        if label_list is None:
            return cls(name, text_a, text_b, None, ("pearson", "spearman", "pearson_spearman_mean"),
                       "pearson_spearman_mean")
        return cls(name, text_a, text_b, tuple(label_list), ("accuracy", "f1"), "accuracy")

    VERSION = 1  # of to_dict()

    def to_dict(self) -> dict:
        """Every field, as JSON (a run's config.json stores a task of your own data this way)."""
        return {**{k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}, "version": self.VERSION}

    @classmethod
    def from_dict(cls, d: dict) -> "Task":
        d = dict(d)
        version = d.pop("version", 1)
        if not isinstance(version, int) or version > cls.VERSION:
            raise BibertError(f"task version {version} is newer than this bibert understands ({cls.VERSION}); "
                              "upgrade bibert")
        known = {f.name for f in fields(cls)}
        if set(d) - known or "name" not in d:
            raise BibertError(f"not a task: unknown keys {sorted(set(d) - known)}" if set(d) - known
                              else "not a task: no name")
        tuples = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**tuples)


_ACC = ("accuracy",)
_ACC_F1 = ("accuracy", "f1")
_CORR = ("pearson", "spearman", "pearson_spearman_mean")
_BIN = ("0", "1")
_NLI3 = ("entailment", "neutral", "contradiction")
_NLI2 = ("entailment", "not_entailment")

TASKS: dict[str, Task] = {t.name: t for t in [
    Task("cola", "sentence", None, _BIN, ("mcc", "accuracy"), "mcc", lr=1e-4, epochs=50,
         max_length=64, glue_dir="CoLA", hf_config="cola", hf_fields=("sentence", None)),
    Task("sst2", "sentence", None, _BIN, _ACC, "accuracy", lr=1e-4, epochs=10, max_length=64,
         glue_dir="SST-2", hf_config="sst2", hf_fields=("sentence", None)),
    Task("mrpc", "sentence1", "sentence2", _BIN, _ACC_F1, "accuracy", lr=2e-4, epochs=20,
         glue_dir="MRPC", hf_config="mrpc", hf_fields=("sentence1", "sentence2")),
    Task("stsb", "sentence1", "sentence2", None, _CORR, "pearson_spearman_mean", lr=1e-4,
         epochs=20, glue_dir="STS-B", hf_config="stsb", hf_fields=("sentence1", "sentence2")),
    Task("qqp", "question1", "question2", _BIN, _ACC_F1, "accuracy", lr=1e-4, epochs=5,
         glue_dir="QQP", hf_config="qqp", hf_fields=("question1", "question2")),
    Task("mnli", "sentence1", "sentence2", _NLI3, _ACC, "accuracy",
         dev_splits=("dev_matched", "dev_mismatched"), test_splits=("test_matched", "test_mismatched"),
         lr=5e-5, epochs=5, glue_dir="MNLI", hf_config="mnli", hf_fields=("premise", "hypothesis")),
    Task("qnli", "question", "sentence", _NLI2, _ACC, "accuracy", lr=1e-4, epochs=10,
         glue_dir="QNLI", hf_config="qnli", hf_fields=("question", "sentence")),
    Task("rte", "sentence1", "sentence2", _NLI2, _ACC, "accuracy", lr=1e-5, epochs=20,
         glue_dir="RTE", hf_config="rte", hf_fields=("sentence1", "sentence2")),
    # WNLI is not in the reference recipe table: RTE's size and shape, QNLI's lr.
    Task("wnli", "sentence1", "sentence2", _BIN, _ACC, "accuracy", lr=1e-4, epochs=20,
         glue_dir="WNLI", hf_config="wnli", hf_fields=("sentence1", "sentence2")),
    # Offline corpora (see docs/data.md for their splits): SST-2's and MNLI's recipes.
    Task("rotten_tomatoes", "sentence", None, ("rotten", "fresh"), _ACC, "accuracy",
         lr=1e-4, epochs=10, max_length=64),
    Task("snli", "sentence1", "sentence2", _NLI3, _ACC, "accuracy", lr=5e-5, epochs=5),
]}

def _normalise(name: str) -> str:
    return name.strip().lower().replace("-", "").replace("_", "")


def get_task(name: str | Task) -> Task:
    """Look a task up by name, ignoring case, "-" and "_": "SST-2", "sst-2", "sst2" all work
    (a Task is returned as it is)."""
    if isinstance(name, Task):
        return name
    by_key = {_normalise(key): task for key, task in TASKS.items()}
    if _normalise(name) not in by_key:
        raise BibertError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    return by_key[_normalise(name)]


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson's r, computed as scipy.stats.pearsonr does (centred, scaled by the largest
    deviation before the norms so that nothing overflows, clipped to [-1, 1])."""
    xm, ym = x - x.mean(), y - y.mean()
    xmax, ymax = np.abs(xm).max(), np.abs(ym).max()
    r = float(np.dot(xm / (xmax * np.linalg.norm(xm / xmax)), ym / (ymax * np.linalg.norm(ym / ymax))))
    r = min(1.0, max(-1.0, r))
    return float(round(r)) if len(x) == 2 else r


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given their average rank (scipy.stats.rankdata's default)."""
    order = np.argsort(x, kind="mergesort")
    ordered = x[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])  # first index of each run of ties
    bounds = np.r_[starts, len(x)]
    group = np.cumsum(np.r_[True, ordered[1:] != ordered[:-1]]) - 1
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = 0.5 * (bounds[group] + bounds[group + 1] + 1)
    return ranks


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho: Pearson's correlation of the average ranks (as scipy.stats.spearmanr)."""
    return float(np.corrcoef(_average_ranks(x), _average_ranks(y))[0, 1])


def _correlation(fn, preds: np.ndarray, labels: np.ndarray) -> float:
    """A correlation, with 0.0 where it is undefined (constant predictions or labels)."""
    if np.isnan(preds).any() or np.isnan(labels).any():
        return float("nan")
    if np.ptp(preds) == 0 or np.ptp(labels) == 0:
        return 0.0
    return fn(preds, labels)


def _f1(labels: np.ndarray, preds: np.ndarray, positive) -> float:
    """F1 of one class: 2 TP / (2 TP + FP + FN), 0.0 when the class is neither predicted nor present."""
    tp = int(np.sum((preds == positive) & (labels == positive)))
    fp = int(np.sum((preds == positive) & (labels != positive)))
    fn = int(np.sum((preds != positive) & (labels == positive)))
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def _matthews(labels: np.ndarray, preds: np.ndarray) -> float:
    """Matthews correlation (multi-class form, from the confusion matrix; 0.0 where undefined),
    computed as scikit-learn's matthews_corrcoef does."""
    classes = np.unique(np.concatenate([labels, preds]))
    k = len(classes)
    t, p = np.searchsorted(classes, labels), np.searchsorted(classes, preds)
    confusion = np.bincount(t * k + p, minlength=k * k).reshape(k, k)
    t_sum = confusion.sum(axis=1, dtype=np.float64)
    p_sum = confusion.sum(axis=0, dtype=np.float64)
    n_correct = np.trace(confusion, dtype=np.float64)
    n = p_sum.sum()
    cov_tp = n_correct * n - np.dot(t_sum, p_sum)
    cov_pp_tt = (n ** 2 - np.dot(p_sum, p_sum)) * (n ** 2 - np.dot(t_sum, t_sum))
    return 0.0 if cov_pp_tt == 0 else float(cov_tp / np.sqrt(cov_pp_tt))


def compute_metrics(task: Task, preds, labels) -> dict[str, float]:
    """Every metric of `task` on predictions and gold labels (fractions, not percent).

    preds: class indices (classification) or scores (regression), same length as labels.
    Keys: accuracy, f1 (binary F1 of class 1, or macro F1 beyond two classes), mcc
    (Matthews correlation), pearson, spearman, pearson_spearman_mean (their mean); the
    dict always holds `task.best_metric`. NumPy only (the runtime install scores files
    with a packed model): the values are scikit-learn's and scipy's (tests/test_tasks.py).
    """
    preds, labels = np.asarray(preds), np.asarray(labels)
    if preds.shape != labels.shape or preds.size == 0:
        raise BibertError(f"cannot score {preds.size} predictions against {labels.size} labels")
    out: dict[str, float] = {}
    for metric in task.metrics:
        if metric == "accuracy":
            out[metric] = float(np.mean(labels == preds))
        elif metric == "f1":
            if task.num_labels == 2:
                out[metric] = _f1(labels, preds, 1)
            else:  # macro: every class of the task counts, one absent everywhere as 0
                out[metric] = float(np.mean([_f1(labels, preds, c) for c in range(task.num_labels)]))
        elif metric == "mcc":
            out[metric] = _matthews(labels, preds)
        elif metric == "pearson":
            out[metric] = _correlation(_pearson, preds.astype(float), labels.astype(float))
        elif metric == "spearman":
            out[metric] = _correlation(_spearman, preds.astype(float), labels.astype(float))
        elif metric == "pearson_spearman_mean":
            out[metric] = (_correlation(_pearson, preds.astype(float), labels.astype(float))
                           + _correlation(_spearman, preds.astype(float), labels.astype(float))) / 2
        else:
            raise BibertError(f"unknown metric {metric!r}; known: {', '.join(ALL_METRICS)}")
    return out
