import json
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

from bibert.cli import main
from bibert.batches import build_dataset, make_dataloader
from bibert.data import load_examples
from bibert.errors import BibertError
from bibert.evaluate import evaluate_model, predict
from bibert.tasks import compute_metrics, get_task

GLUE = Path(__file__).parent / "fixtures" / "glue"
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "the", "man", "is", "."]


def tiny_model(num_labels):
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=256, num_labels=num_labels)).eval()


@pytest.fixture
def tokenizer(tmp_path, monkeypatch):
    monkeypatch.setenv("BIBERT_CACHE", str(tmp_path / "cache"))
    return BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)})


def test_classification_uses_argmax(tokenizer):
    task = get_task("mnli")
    ds = build_dataset(load_examples(task, "train", data_dir=GLUE / "MNLI"), tokenizer, 64, task)
    model = tiny_model(3)
    preds, labels = predict(model, make_dataloader(ds, 4), task)
    batch = make_dataloader(ds, 9).collate_fn([ds[i] for i in range(9)])
    with torch.no_grad():
        expected = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         token_type_ids=batch["token_type_ids"]).logits.argmax(-1)
    assert preds.tolist() == expected.tolist() and labels.tolist() == batch["labels"].tolist()
    assert evaluate_model(model, task, ds) == compute_metrics(task, preds.astype(int), labels)


def test_regression_squeezes_and_mnli_returns_both_dev_sets(tokenizer):
    stsb = get_task("stsb")
    ds = build_dataset(load_examples(stsb, "dev", data_dir=GLUE / "STS-B"), tokenizer, 64, stsb)
    metrics = evaluate_model(tiny_model(1), stsb, ds)
    assert set(metrics) == {"pearson", "spearman", "pearson_spearman_mean"}
    mnli = get_task("mnli")
    dev = {s: build_dataset(load_examples(mnli, s, data_dir=GLUE / "MNLI"), tokenizer, 64, mnli)
           for s in mnli.dev_splits}
    results = evaluate_model(tiny_model(3), mnli, dev, batch_size=1)
    assert set(results) == {"dev_matched", "dev_mismatched"} and "accuracy" in results["dev_matched"]


def test_unlabeled_split_and_wrong_head_are_errors(tokenizer):
    task = get_task("sst2")
    test = build_dataset(load_examples(task, "test", data_dir=GLUE / "SST-2"), tokenizer, 64, task)
    with pytest.raises(BibertError, match="no labels"):
        evaluate_model(tiny_model(2), task, test)
    dev = build_dataset(load_examples(task, "dev", data_dir=GLUE / "SST-2"), tokenizer, 64, task)
    with pytest.raises(BibertError, match="model has 3 outputs, sst2 needs 2"):
        evaluate_model(tiny_model(3), task, dev)


def test_evaluate_command_writes_json(tokenizer, tmp_path, capsys):
    model_dir = tmp_path / "model"
    tiny_model(3).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    rc = main(["evaluate", "--model", str(model_dir), "--task", "MNLI", "--data-dir", str(GLUE / "MNLI"),
               "--device", "cpu"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "mnli dev_matched: accuracy" in out and "mnli dev_mismatched: accuracy" in out
    saved = json.loads((model_dir / "eval_mnli_dev.json").read_text())
    assert set(saved["metrics"]) == {"dev_matched", "dev_mismatched"} and saved["max_length"] == 128
    assert main(["evaluate", "--model", str(model_dir), "--task", "mnli", "--split", "test",
                 "--data-dir", str(GLUE / "MNLI"), "--device", "cpu"]) == 2
    assert "no labels" in capsys.readouterr().err
    assert main(["evaluate", "--model", str(tmp_path / "nowhere"), "--task", "mnli"]) == 2
    assert f"no such folder: {tmp_path / 'nowhere'}; give a model folder" in capsys.readouterr().err


def test_evaluate_results_are_named_after_their_data(tokenizer, tmp_path, capsys):
    """A file's result is named after the file and records its sha256; it never replaces the
    result of the task's own data, nor that of another file."""
    model_dir = tmp_path / "model"
    tiny_model(2).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    base = ["evaluate", "--model", str(model_dir), "--task", "sst2", "--device", "cpu"]
    assert main([*base, "--data-dir", str(GLUE / "SST-2")]) == 0
    dev = json.loads((model_dir / "eval_sst2_dev.json").read_text())
    assert dev["source"] == {"data_dir": str((GLUE / "SST-2").resolve())}
    mine = tmp_path / "mine.tsv"
    mine.write_text("sentence\tlabel\nthe man\t1\na man is\t0\n")
    capsys.readouterr()
    assert main([*base, "--file", str(mine)]) == 0
    assert "sst2 mine.tsv: accuracy" in capsys.readouterr().out
    (result,) = model_dir.glob("eval_sst2_mine-*.json")
    saved = json.loads(result.read_text())
    assert saved["source"]["file"] == str(mine.resolve())
    assert saved["source"]["sha256"] == __import__("hashlib").sha256(mine.read_bytes()).hexdigest()
    assert json.loads((model_dir / "eval_sst2_dev.json").read_text()) == dev  # untouched
    assert main([*base, "--file", str(mine), "--out", str(model_dir / "eval_sst2_dev.json")]) == 2
    assert "holds the result of other data" in capsys.readouterr().err
