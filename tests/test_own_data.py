"""Your own data from the command line: a CSV with columns of its own and labels of any type
goes through finetune -> distill -> evaluate -> export -> predict; labels, splits, formats,
regression, resumption, and the messages around them."""
import csv
import json
from pathlib import Path

import pytest

from bibert import BiBertForSequenceClassification
from bibert.cli import main as cli_main
from bibert.config import TrainConfig, resolve_config
from bibert.data import (Example, held_out, infer_custom_task, load_examples, load_split, resolve_model,
                         rotten_tomatoes_splits, teacher_path)
from bibert.errors import BibertError
from bibert.tasks import HELD_OUT_PERCENT, Task
from bibert.train import distill, finetune

from test_train import SLICE, make_tiny_teacher


def write_csv(path: Path, header: list[str], rows) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def reviews(tmp_path_factory):
    """The README's example: columns review and sentiment, labels pos / neg (and an id column)."""
    folder = tmp_path_factory.mktemp("reviews")
    splits = rotten_tomatoes_splits()
    name = ["neg", "pos"]  # rotten, fresh
    train = write_csv(folder / "reviews.csv", ["id", "review", "sentiment"],
                      [(i, ex.text_a, name[ex.label]) for i, ex in enumerate(splits["train"][:80])])
    test = write_csv(folder / "reviews_test.csv", ["review", "sentiment"],
                     [(ex.text_a, name[ex.label]) for ex in splits["test"][:24]])
    return train, test


def test_readme_example_end_to_end(reviews, tmp_path, capsys):
    """finetune -> distill -> evaluate -> export -> predict, with the offline teacher (`--model
    teacher`) and tiny step counts: the labels are pos / neg all the way to the packed file."""
    train, test = reviews
    columns = ["--train-file", str(train), "--text-column", "review", "--label-column", "sentiment"]
    tiny = ["--max-steps", "2", "--batch-size", "8", "--max-length", "24"]
    t, s = tmp_path / "teacher", tmp_path / "student"
    assert cli_main(["finetune", "--model", "teacher", *columns, *tiny, "--out", str(t)]) == 0
    err = capsys.readouterr().err
    assert "LOAD REPORT" not in err and "MISSING" not in err  # transformers' table, replaced by one line:
    assert "a new classification head (2 outputs) starts from random values: classifier.bias, classifier.weight" in err
    assert "reading text from column 'review', label from column 'sentiment'; not used: 'id'" in err
    teacher_config = json.loads((t / "best" / "config.json").read_text())
    assert teacher_config["id2label"] == {"0": "neg", "1": "pos"} and teacher_config["label2id"] == {"neg": 0, "pos": 1}
    run = TrainConfig.from_dict(json.loads((t / "config.json").read_text()))
    assert run.model == str(teacher_path()) and not run.task.registered
    assert (run.task.name, run.task.text_a, run.task.label_list) == ("reviews", "review", ("neg", "pos"))

    assert cli_main(["distill", "--teacher", str(t / "best"), *columns, *tiny, "--out", str(s)]) == 0
    student = BiBertForSequenceClassification.from_pretrained(s / "best")
    assert student.config.id2label == {0: "neg", 1: "pos"}
    # the held-out dev share of the train file, the same for teacher and student
    dev = json.loads((s / "metrics.jsonl").read_text().splitlines()[-1])["dev"]
    assert set(dev) == {"accuracy", "f1"}
    # resumable: the task of your own data is stored whole in config.json
    capsys.readouterr()
    assert cli_main(["distill", "--teacher", str(t / "best"), *columns, *tiny, "--out", str(s), "--resume"]) == 0
    assert "resuming" in capsys.readouterr().out

    assert cli_main(["evaluate", "--model", str(s / "best"), "--file", str(test), "--text-column", "review",
                     "--label-column", "sentiment", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "reviews_test.csv: accuracy" in out
    (result,) = (s / "best").glob("eval_reviews_test-*.json")
    saved = json.loads(result.read_text())
    assert saved["source"]["file"] == str(test.resolve()) and len(saved["source"]["sha256"]) == 64
    assert result.name == f"eval_reviews_test-{saved['source']['sha256'][:8]}.json"

    packed = tmp_path / "reviews.bibert"
    assert cli_main(["export", "--model", str(s / "best"), "--out", str(packed)]) == 0
    capsys.readouterr()
    assert cli_main(["predict", "--model", str(packed), "a gorgeous, witty, seductive movie.", "dull"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all(line.split("\t")[0] in ("pos", "neg") for line in lines)
    assert all("neg=" in line and "pos=" in line for line in lines)
    assert lines[1].split("\t")[2] == "dull"  # several texts: each line names its text
    long = "a gorgeous, witty, seductive movie that goes on and on about nothing in particular for hours"
    assert cli_main(["predict", "--model", str(packed), long]) == 0
    line = capsys.readouterr().out.strip()
    assert line.count("\t") == 1 and long not in line  # one text: not echoed back


def test_regression_of_your_own_data(tiny_teacher, tmp_path):
    """Float labels: a regressor (one output, Pearson/Spearman), distilled from it keeps being one."""
    examples = rotten_tomatoes_splits()["train"][:60]
    data = write_csv(tmp_path / "scores.csv", ["text", "score"],
                     [(ex.text_a, f"{ex.label * 3 + (i % 7) / 10:.1f}") for i, ex in enumerate(examples)])
    opts = dict(train_file=str(data), label_column="score", max_steps=2, batch_size=8, max_length=24)
    res = finetune(tiny_teacher, None, tmp_path / "t", **opts)
    assert res["task"] == "scores" and res["metric"] == "pearson_spearman_mean"
    config = json.loads((tmp_path / "t" / "best" / "config.json").read_text())
    assert len(config["id2label"]) == 1
    res = distill(str(tmp_path / "t" / "best"), None, tmp_path / "s", **opts)
    assert set(res["best"]["metrics"]["dev"]) == {"pearson", "spearman", "pearson_spearman_mean"}
    assert BiBertForSequenceClassification.from_pretrained(tmp_path / "s" / "best").is_regression


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory, teacher_dir):
    return make_tiny_teacher(tmp_path_factory.mktemp("tiny") / "teacher", teacher_dir)


def test_dev_and_test_files_and_a_teachers_label_order(tiny_teacher, tmp_path):
    """--dev-file replaces the held-out share; a student keeps the teacher's label order
    (rotten, fresh) even where the file's sorted names would be (fresh, rotten)."""
    rows = [(ex.text_a, ["rotten", "fresh"][ex.label]) for ex in rotten_tomatoes_splits()["train"][:40]]
    train = write_csv(tmp_path / "train.csv", ["text", "label"], rows)
    dev = write_csv(tmp_path / "dev.csv", ["text", "label"], rows[:8])
    config = resolve_config("distill", tiny_teacher, None, tmp_path / "o", train_file=str(train), dev_file=str(dev))
    assert config.task.label_list == ("rotten", "fresh")
    assert resolve_config("finetune", tiny_teacher, None, tmp_path / "o", train_file=str(train)).task.label_list == \
        ("fresh", "rotten")
    res = distill(tiny_teacher, "mine", tmp_path / "d", train_file=str(train), dev_file=str(dev),
                  test_file=str(dev), eval_test=True, max_steps=1, **{**SLICE, "max_eval_examples": None})
    assert res["task"] == "mine" and res["train_examples"] == 40  # nothing held out: the dev file stands in
    assert set(res["test"]) == {"test"}
    with pytest.raises(BibertError, match="pass --test-file"):
        distill(tiny_teacher, None, tmp_path / "e", train_file=str(train), eval_test=True, max_steps=1, **SLICE)


def test_held_out_share_is_fixed_by_the_text_and_disjoint(tmp_path):
    rows = [(ex.text_a, "yes" if i % 3 else "no") for i, ex in enumerate(rotten_tomatoes_splits()["train"][:500])]
    path = write_csv(tmp_path / "d.csv", ["text", "label"], rows)
    task = infer_custom_task(path)
    train, dev = (load_split(task, s, train_file=path) for s in ("train", "dev"))
    assert len(train) + len(dev) == 500 and not {e.text_a for e in train} & {e.text_a for e in dev}
    assert abs(len(dev) - 500 * HELD_OUT_PERCENT / 100) < 25
    assert dev == [ex for ex in load_examples(task, "train", file=path) if held_out(ex)]  # the same every time
    assert held_out(Example("same text", None, 0)) == held_out(Example("same text", None, 1))


def test_labels_of_any_type_are_inferred(tmp_path):
    jsonl = tmp_path / "x.jsonl"
    jsonl.write_text("".join(json.dumps({"text": f"t{i}", "label": v}) + "\n" for i, v in enumerate([10, 2, 2.0, 9])))
    task = infer_custom_task(jsonl)
    assert task.label_list == ("2", "9", "10")  # whole numbers sorted as numbers; 2 and 2.0 are one label
    assert [ex.label for ex in load_examples(task, "train", file=jsonl)] == [2, 0, 0, 1]
    other = tmp_path / "o.jsonl"
    other.write_text(json.dumps({"text": "t", "label": 1}) + "\n")  # not a label name, nor an index here
    with pytest.raises(BibertError, match=r"unknown label 1 for custom \(expected one of: 2, 9, 10\)"):
        load_examples(task, "train", file=other)
    flags = write_csv(tmp_path / "b.csv", ["text", "label"], [("a", "True"), ("b", "False")])
    assert infer_custom_task(flags).label_list == ("False", "True")
    scores = write_csv(tmp_path / "s.csv", ["text", "label"], [("a", "0.5"), ("b", "3")])
    assert infer_custom_task(scores).is_regression
    assert not infer_custom_task(scores, regression=False).is_regression
    with pytest.raises(BibertError, match="needs at least two labels"):
        infer_custom_task(write_csv(tmp_path / "one.csv", ["text", "label"], [("a", "x"), ("b", "x")]))


def test_parquet_and_tsv_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"q": ["a", "b", "c"], "p": ["x", "y", "z"], "y": ["s", "t", "s"]}), tmp_path / "d.parquet")
    task = infer_custom_task(tmp_path / "d.parquet", text_column="q", pair_column="p", label_column="y")
    assert (task.text_a, task.text_b, task.label_list) == ("q", "p", ("s", "t"))
    assert load_examples(task, "train", file=tmp_path / "d.parquet", label_column="y")[1] == Example("b", "y", 1)
    (tmp_path / "d.tsv").write_text("sentence\tlabel\nhello\t1\n")
    assert load_examples("sst2", "train", file=tmp_path / "d.tsv") == [Example("hello", None, 1)]


def test_extra_columns_are_named(tmp_path, capsys):
    (tmp_path / "e.tsv").write_text("sentence\tlabel\textra\nhello\t1\tz\nbye\t0\tw\n")
    load_examples("sst2", "train", file=tmp_path / "e.tsv")
    assert capsys.readouterr().err.count("not used: 'extra'") == 1


def test_task_round_trips_through_a_run_config(tmp_path):
    task = Task.custom("mine", ["b", "a"], pair=True, text_a="q", text_b="d")
    config = TrainConfig(mode="distill", task=task, model="m", out=str(tmp_path))
    back = TrainConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert back.task == task and back.to_dict() == config.to_dict() and back.quant == config.quant
    assert config.to_dict()["task"]["label_list"] == ["b", "a"]
    assert TrainConfig(mode="finetune", task="sst2", model="m", out="o").to_dict()["task"] == "sst2"


def test_old_run_configs_still_load():
    """Every finished run of the study (written by earlier versions) loads, with its values."""
    root = Path(__file__).parent.parent / "benchmarks" / "results" / "study"
    files = [p for p in root.rglob("config.json") if "mode" in json.loads(p.read_text())]
    assert files
    for path in files:
        saved = json.loads(path.read_text())
        config = TrainConfig.from_dict(saved)
        back = config.to_dict()
        assert all(back[k] == v for k, v in saved.items() if k not in ("version", "quant")), path
        assert config.task.registered


def test_model_names_resolve(tmp_path, monkeypatch, capsys):
    import socket
    import time

    from bibert import fetch

    assert resolve_model("teacher") == str(teacher_path())
    with pytest.raises(BibertError, match="'snli' is not a model but a data set: pass it as --task snli"):
        resolve_model("snli")
    # a folder that does not exist is named as such, not taken for a hub name (issue 28)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for missing in ("runs/teacher", "./teacher", "out/sst2/best", str(tmp_path / "gone")):
        with pytest.raises(BibertError, match=rf"^no such folder: {missing}; give a model folder"):
            resolve_model(missing)
    assert cli_main(["distill", "--teacher", "runs/teacher", "--task", "sst2", "--out", "o"]) == 2
    assert "error: no such folder: runs/teacher;" in capsys.readouterr().err

    # a hub name: taken as it is when the hub answers; refused at once when it cannot be reached
    def unreachable(address, timeout=None):
        raise socket.gaierror(-2, "Name or service not known")

    assert resolve_model("bert-base-uncased") == "bert-base-uncased"
    monkeypatch.setattr(fetch.socket, "create_connection", lambda address, timeout=None: socket.socket())
    fetch.check_hub("bert-base-uncased")
    monkeypatch.setattr(fetch.socket, "create_connection", unreachable)
    t = time.monotonic()
    assert cli_main(["finetune", "--model", "org/some-bert", "--task", "rotten_tomatoes", "--out", "o"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "bibert finetune: error: cannot download 'org/some-bert': the Hugging Face hub (huggingface.co) cannot be "
        "reached (Name or service not known) and the model is not in its local cache; offline, give 'teacher' (the "
        "offline all-MiniLM-L6-v2) or a model folder (if org/some-bert is meant as a folder: it does not exist)")
    assert time.monotonic() - t < 30  # the data are read first; no minute of retries


def test_a_folder_without_a_model_says_so(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli_main(["finetune", "--model", str(empty), "--task", "rotten_tomatoes", "--out", str(tmp_path / "o"),
                     "--max-steps", "1"]) == 2
    assert f"no model here: {empty} has no config.json" in capsys.readouterr().err
    assert cli_main(["evaluate", "--model", str(empty), "--task", "rotten_tomatoes"]) == 2
    err = capsys.readouterr().err
    assert "no model here" in err and "no tokenizer" not in err and "sentencepiece" not in err.lower()


def test_no_task_and_no_file_is_a_clear_error(tmp_path, capsys):
    assert cli_main(["finetune", "--model", "teacher", "--out", str(tmp_path / "o")]) == 2
    assert "give --task" in capsys.readouterr().err
