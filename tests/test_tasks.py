import dataclasses
import math

import numpy as np
import pytest

from bibert.errors import BibertError
from bibert.tasks import TASKS, Task, compute_metrics, get_task

GLUE = ["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"]


def test_registry_has_glue_and_offline_tasks():
    assert set(GLUE) | {"rotten_tomatoes", "snli"} == set(TASKS)


@pytest.mark.parametrize("name,key", [("SST-2", "sst2"), ("sst-2", "sst2"), ("sst2", "sst2"),
                                      ("STS-B", "stsb"), ("CoLA", "cola"), ("MNLI", "mnli"),
                                      ("Rotten_Tomatoes", "rotten_tomatoes"), ("rotten-tomatoes", "rotten_tomatoes")])
def test_get_task_is_forgiving_about_spelling(name, key):
    assert get_task(name).name == key


def test_unknown_task_lists_valid_names():
    with pytest.raises(BibertError, match="valid tasks: cola, sst2.*snli"):
        get_task("glue")


def test_recipes_follow_the_reference_table():
    table = {"cola": (1e-4, 50, 64), "mnli": (5e-5, 5, 128), "mrpc": (2e-4, 20, 128),
             "sst2": (1e-4, 10, 64), "stsb": (1e-4, 20, 128), "qqp": (1e-4, 5, 128),
             "qnli": (1e-4, 10, 128), "rte": (1e-5, 20, 128)}
    for name, (lr, epochs, max_length) in table.items():
        t = get_task(name)
        assert (t.lr, t.epochs, t.max_length, t.batch_size) == (lr, epochs, max_length, 16), name
    rt, snli = get_task("rotten_tomatoes"), get_task("snli")
    assert (rt.lr, rt.epochs, rt.max_length) == (1e-4, 10, 64)
    assert (snli.lr, snli.epochs, snli.max_length) == (5e-5, 5, 128)


def test_fields_labels_and_splits():
    mnli = get_task("mnli")
    assert mnli.label_list == ("entailment", "neutral", "contradiction")  # datasets' ClassLabel order
    assert mnli.dev_splits == ("dev_matched", "dev_mismatched")
    assert mnli.eval_splits("dev") == mnli.dev_splits
    assert mnli.eval_splits("test") == ("test_matched", "test_mismatched")
    stsb = get_task("stsb")
    assert stsb.is_regression and stsb.num_labels == 1 and stsb.label_list is None
    assert get_task("sst2").text_b is None and not get_task("sst2").is_pair
    assert (get_task("qnli").text_a, get_task("qnli").text_b) == ("question", "sentence")
    assert get_task("rotten_tomatoes").label_list == ("rotten", "fresh")
    with pytest.raises(BibertError, match="no split 'validation'"):
        get_task("sst2").eval_splits("validation")


def test_best_metrics():
    best = {t: get_task(t).best_metric for t in GLUE}
    assert best["cola"] == "mcc" and best["stsb"] == "pearson_spearman_mean"
    assert all(best[t] == "accuracy" for t in GLUE if t not in ("cola", "stsb"))
    assert "f1" in get_task("mrpc").metrics and "f1" in get_task("qqp").metrics


def test_accuracy_by_hand():
    assert compute_metrics(get_task("sst2"), [1, 0, 1, 1], [1, 0, 0, 1]) == {"accuracy": 0.75}


def test_f1_and_accuracy_by_hand():
    # TP 2, FP 1, FN 1: precision = recall = 2/3, F1 = 2/3; 3 of 5 right.
    m = compute_metrics(get_task("mrpc"), [1, 1, 0, 0, 1], [1, 0, 0, 1, 1])
    assert m["f1"] == pytest.approx(2 / 3) and m["accuracy"] == pytest.approx(0.6)


def test_matthews_by_hand():
    # TP 2, TN 2, FP 1, FN 1: (2*2 - 1*1) / sqrt(3*3*3*3) = 1/3.
    m = compute_metrics(get_task("cola"), [1, 1, 0, 0, 1, 0], [1, 0, 0, 1, 1, 0])
    assert m["mcc"] == pytest.approx(1 / 3)


def test_correlations_by_hand():
    # x = [1,2,3], y = [1,2,4]: cov sum 3, sum dx^2 2, sum dy^2 42/9 -> r = 9/sqrt(84); same ranks.
    m = compute_metrics(get_task("stsb"), [1.0, 2.0, 3.0], [1.0, 2.0, 4.0])
    r = 9 / math.sqrt(84)
    assert m["pearson"] == pytest.approx(r)
    assert m["spearman"] == pytest.approx(1.0)
    assert m["pearson_spearman_mean"] == pytest.approx((r + 1) / 2)


def test_constant_predictions_give_zero_correlation():
    m = compute_metrics(get_task("stsb"), [2.5, 2.5, 2.5], [1.0, 2.0, 4.0])
    assert m == {"pearson": 0.0, "spearman": 0.0, "pearson_spearman_mean": 0.0}


def test_three_class_f1_is_macro():
    task = Task.custom("nli", ["a", "b", "c"], pair=True)
    # class a: P 1, R 1/2 -> 2/3; class b: P 1/2, R 1 -> 2/3; class c: P 1, R 1 -> 1
    m = compute_metrics(task, [0, 1, 1, 2], [0, 0, 1, 2])
    assert m["f1"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3) and m["accuracy"] == 0.75


@pytest.mark.parametrize("name", list(TASKS))
def test_metrics_always_contain_the_selection_metric(name):
    task = get_task(name)
    preds = [0.1, 0.7, 0.3] if task.is_regression else [0, 1, 1]
    labels = [0.0, 1.0, 0.5] if task.is_regression else [0, 1, 0]
    assert task.best_metric in compute_metrics(task, preds, labels)


def _reference_metrics(task, preds, labels) -> dict[str, float]:
    """The metrics as scikit-learn and scipy compute them (what compute_metrics computed
    before it needed NumPy alone)."""
    stats = pytest.importorskip("scipy.stats")
    skm = pytest.importorskip("sklearn.metrics")

    def corr(fn):
        p, g = np.asarray(preds, float), np.asarray(labels, float)
        return 0.0 if np.ptp(p) == 0 or np.ptp(g) == 0 else float(fn(p, g)[0])

    binary = task.num_labels == 2
    every = {"accuracy": lambda: float(skm.accuracy_score(labels, preds)),
             "f1": lambda: float(skm.f1_score(labels, preds, average="binary" if binary else "macro",
                                              labels=None if binary else list(range(task.num_labels)),
                                              zero_division=0)),
             "mcc": lambda: float(skm.matthews_corrcoef(labels, preds)),
             "pearson": lambda: corr(stats.pearsonr), "spearman": lambda: corr(stats.spearmanr),
             "pearson_spearman_mean": lambda: (corr(stats.pearsonr) + corr(stats.spearmanr)) / 2}
    return {metric: every[metric]() for metric in task.metrics}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("seed", range(40))
def test_metrics_equal_scikit_learn_and_scipy(seed):
    """NumPy's metrics (the runtime has no scikit-learn or scipy) against the libraries', on
    random predictions: small and large sets, skewed and absent classes, ties in the scores."""
    rng = np.random.default_rng(seed)
    n = int(rng.choice([2, 3, 5, 17, 200, 3000]))
    for task in (get_task("mrpc"), Task.custom("three", ["a", "b", "c"], pair=True),
                 Task.custom("five", list("vwxyz"), pair=False)):
        task = dataclasses.replace(task, metrics=("accuracy", "f1", "mcc"))
        k = task.num_labels
        labels = rng.choice(k, n, p=rng.dirichlet(np.ones(k) * 0.5))
        preds = np.where(rng.random(n) < rng.random(), labels, rng.integers(0, k, n))
        if seed % 5 == 0:
            preds[:] = preds[0]  # one class predicted only
        got, want = compute_metrics(task, preds, labels), _reference_metrics(task, preds, labels)
        assert got == pytest.approx(want, rel=1e-12, abs=1e-15), task.name
    stsb = get_task("stsb")
    labels = rng.normal(size=n) * 10.0 ** rng.integers(-3, 4)
    preds = labels + rng.normal(size=n) * rng.random() * 3
    if seed % 3 == 0:
        preds, labels = np.round(preds), np.round(labels * 2) / 2  # ties
    got, want = compute_metrics(stsb, preds, labels), _reference_metrics(stsb, preds, labels)
    assert got == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_mismatched_lengths_are_an_error():
    with pytest.raises(BibertError, match="3 predictions against 2 labels"):
        compute_metrics(get_task("sst2"), [0, 1, 1], [0, 1])


def test_custom_tasks():
    reg = Task.custom("price", None, pair=False)
    assert reg.is_regression and reg.best_metric == "pearson_spearman_mean" and reg.text_a == "sentence"
    cls = Task.custom("topic", ["sport", "tech"], pair=True)
    assert cls.num_labels == 2 and (cls.text_a, cls.text_b) == ("sentence1", "sentence2")
    with pytest.raises(BibertError, match="at least two labels"):
        Task.custom("one", ["x"], pair=False)


def test_unknown_split_lists_each_split_once():
    with pytest.raises(BibertError, match=r"sst2 has no split 'validation'; valid: dev, test, train\Z"):
        get_task("sst2").eval_splits("validation")
    with pytest.raises(BibertError, match=r"valid: dev, test, train, dev_matched, dev_mismatched, test_matched, "
                                          r"test_mismatched\Z"):
        get_task("mnli").eval_splits("validation")
