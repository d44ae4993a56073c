"""The packed model as a first-class model: shared as a Hub repository (save_pretrained writes
a folder that load_packed reads back, its model card's YAML header carries the Hub metadata,
push_to_hub uploads that folder, a repo id downloads through the Hub's resolve layout served
by a stand-in on 127.0.0.1 via HF_ENDPOINT, from the CLI as a user would), evaluated like its
student folder, timed against a teacher (`bibert bench`), and called like a pipeline."""
from __future__ import annotations

import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import yaml

from bibert import BibertError
from bibert.hub import CARD_FILE, CONFIG_FILE, MODEL_FILE, provenance, push_to_hub, save_pretrained
from bibert.packed import export_packed, load_packed
from test_packed import make_student

TEXTS = ["w1 w2 w3", "w4 w5", "w7 w8 w9 w10 w11"]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hub")
    _, folder = make_student(tmp)
    run = tmp / "run"  # the layout of a training run: out/config.json, out/results.json, out/best/
    (run / "best").mkdir(parents=True)
    for f in folder.iterdir():
        (run / "best" / f.name).write_bytes(f.read_bytes())
    (run / "config.json").write_text(json.dumps({"mode": "distill", "task": "snli", "model": "someone/bert-snli"}))
    (run / "results.json").write_text(json.dumps({"test": {"test": {"accuracy": 0.6471}},
                                                  "best": {"metrics": {"dev": {"accuracy": 0.6}}}}))
    path = tmp / "tiny.bibert"
    export_packed(run / "best", path)
    return path, run / "best"


def card_metadata(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_save_pretrained_round_trip_and_card(packed, tmp_path):
    path, best = packed
    model = load_packed(path)
    info = provenance(best)
    assert info == {"task": "snli", "teacher": "someone/bert-snli", "metrics": {"test": {"accuracy": 0.6471}}}
    folder = save_pretrained(model, tmp_path / "repo", info=info, repo_id="me/tiny-bibert")
    assert sorted(p.name for p in folder.iterdir()) == sorted([MODEL_FILE, CONFIG_FILE, CARD_FILE])
    assert (folder / MODEL_FILE).read_bytes() == path.read_bytes()

    config = json.loads((folder / CONFIG_FILE).read_text())
    assert config["file_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (config["library_name"], config["bits"], config["labels"]) == ("bibert", "1-1-1", model.labels)
    assert config["speed"]["median_ms"] > 0 and config["speed"]["tokens"] == model.max_positions

    meta = card_metadata((folder / CARD_FILE).read_text())
    assert meta["library_name"] == "bibert" and meta["pipeline_tag"] == "text-classification"
    assert {"bibert", "1-bit", "w1a1"} <= set(meta["tags"])
    assert meta["base_model"] == "someone/bert-snli" and meta["datasets"] == ["stanfordnlp/snli"]
    result = meta["model-index"][0]["results"][0]
    assert meta["model-index"][0]["name"] == "me/tiny-bibert"
    assert result["dataset"] == {"name": "snli", "type": "stanfordnlp/snli", "split": "test"}
    assert result["metrics"] == [{"type": "accuracy", "value": 0.6471}]
    card = (folder / CARD_FILE).read_text()
    assert "bibert predict --model me/tiny-bibert" in card and "64.71" in card

    again = load_packed(folder)  # the folder, as a user would pass it
    assert Path(again.source) == folder / MODEL_FILE
    np.testing.assert_array_equal(again.predict(TEXTS).scores, model.predict(TEXTS).scores)


def test_a_local_teacher_path_is_not_base_model(packed, tmp_path):
    path, _ = packed
    folder = save_pretrained(load_packed(path), tmp_path / "f", info={"teacher": str(tmp_path)}, speed=False)
    meta = card_metadata((folder / CARD_FILE).read_text())
    assert "base_model" not in meta and "model-index" not in meta and "speed" not in json.loads(
        (folder / CONFIG_FILE).read_text())


def test_folders_that_are_not_models_are_one_line_errors(packed, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(BibertError, match="is a folder, not a file"):
        load_packed(tmp_path / "empty")
    for name in ("a.bibert", "b.bibert"):
        (tmp_path / "empty" / name).write_bytes(b"")
    with pytest.raises(BibertError, match="without model.bibert but with 2 packed files: name one"):
        load_packed(tmp_path / "empty")
    (tmp_path / "file").write_text("x")
    with pytest.raises(BibertError, match="exists and is not a folder"):
        save_pretrained(load_packed(packed[0]), tmp_path / "file", speed=False)


def test_push_to_hub_uploads_the_saved_folder(packed, monkeypatch):
    import huggingface_hub

    calls = {}

    class FakeApi:
        def __init__(self, token=None, **kwargs):
            calls["token"] = token

        def create_repo(self, repo_id, private=None, exist_ok=False):
            calls["repo"] = (repo_id, private, exist_ok)

        def upload_folder(self, repo_id, folder_path, revision=None, commit_message=None):
            calls["files"] = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
            return type("Commit", (), {"commit_url": f"https://hub.test/{repo_id}/commit/{COMMIT}"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    url = push_to_hub(load_packed(packed[0]), "me/tiny", private=True, token="t0k", speed=False)
    assert url.endswith(COMMIT) and calls["repo"] == ("me/tiny", True, True) and calls["token"] == "t0k"
    assert calls["files"][MODEL_FILE] == packed[0].read_bytes()
    card = calls["files"][CARD_FILE].decode()
    assert card_metadata(card)["library_name"] == "bibert" and "bibert predict --model me/tiny " in card
    with pytest.raises(BibertError, match="not a Hub repo id"):
        push_to_hub(load_packed(packed[0]), "no slash")


class HubStandIn(http.server.BaseHTTPRequestHandler):
    """The Hub's file layout: /{user}/{name}/resolve/{revision}/{file}, HEAD and GET, with the
    headers huggingface_hub reads (X-Repo-Commit, ETag, Content-Length, X-Error-Code)."""

    repos: dict[str, dict[str, bytes]] = {}

    def _answer(self, body: bool) -> None:
        parts = self.path.split("?")[0].strip("/").split("/")
        repo, files = "/".join(parts[:2]), None
        if len(parts) >= 5 and parts[2] == "resolve":
            files = self.repos.get(repo)
        if files is None:
            return self._error(404, "RepoNotFound")
        data = files.get("/".join(parts[4:]))
        if data is None:
            return self._error(404, "EntryNotFound")
        self.send_response(200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _error(self, status: int, code: str) -> None:
        message = json.dumps({"error": code}).encode()
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("Content-Length", str(len(message)))
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(message)

    def do_HEAD(self):  # noqa: N802
        self._answer(body=False)

    def do_GET(self):  # noqa: N802
        self._answer(body=True)

    def log_message(self, *args):
        pass


def test_a_repo_id_downloads_through_the_hub_layout(packed, tmp_path):
    path, _ = packed
    folder = save_pretrained(load_packed(path), tmp_path / "repo", speed=False)
    HubStandIn.repos = {"me/tiny": {p.name: p.read_bytes() for p in folder.iterdir()},
                        "me/not-a-model": {"README.md": b"hello"}}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), HubStandIn)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}", "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.pop("HF_HUB_OFFLINE", None)

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "bibert.cli", *args], env=env, capture_output=True, text=True,
                              timeout=120, cwd=tmp_path)

    try:
        got = cli("predict", "--model", "me/tiny", "--json", *TEXTS)
        assert got.returncode == 0, got.stderr
        expected = load_packed(path).predict(TEXTS)
        assert [r["label"] for r in json.loads(got.stdout)] == expected.labels
        cached = list((tmp_path / "hf").rglob(MODEL_FILE))
        assert cached and cached[0].read_bytes() == path.read_bytes()

        missing = cli("predict", "--model", "me/missing", "x")
        assert missing.returncode == 2 and missing.stderr.count("\n") == 1
        assert "me/missing is neither a file or folder here nor a repository on the Hub" in missing.stderr
        other = cli("predict", "--model", "me/not-a-model", "x")
        assert other.returncode == 2 and "holds no model.bibert: it is not a bibert packed model" in other.stderr
    finally:
        server.shutdown()


def test_export_writes_the_folder_with_the_runs_provenance(packed, tmp_path, capsys):
    from bibert.cli import main

    _, best = packed
    assert main(["export", "--model", str(best), "--out", str(tmp_path / "m.bibert"),
                 "--save-pretrained", str(tmp_path / "shared")]) == 0
    assert "model.bibert, config.json, README.md" in capsys.readouterr().out
    config = json.loads((tmp_path / "shared" / CONFIG_FILE).read_text())
    assert (config["task"], config["teacher"], config["metrics"]) == ("snli", "someone/bert-snli",
                                                                      {"test": {"accuracy": 0.6471}})
    assert (tmp_path / "shared" / MODEL_FILE).read_bytes() == (tmp_path / "m.bibert").read_bytes()
    assert main(["export", "--model", str(best), "--out", str(tmp_path / "n.bibert"), "--private"]) == 2
    assert "--private applies to --push-to-hub only" in capsys.readouterr().err
    assert not (tmp_path / "n.bibert").exists()


def test_evaluate_scores_a_packed_file_as_its_student_folder(packed, tmp_path, capsys):
    """`bibert evaluate` on a packed file (and on a save_pretrained folder) gives the metrics
    of the student folder it was exported from, on a labelled file of one's own."""
    from bibert.cli import main

    path, best = packed
    model = load_packed(path)
    rng = np.random.default_rng(0)
    rows = ["text,label"] + [" ".join(f"w{i}" for i in rng.integers(0, 40, size=rng.integers(1, 12))) + "," +
                             str(model.labels[int(rng.integers(0, 3))]) for _ in range(60)]
    data = tmp_path / "mine.csv"
    data.write_text("\n".join(rows) + "\n")
    assert main(["evaluate", "--model", str(best), "--file", str(data), "--device", "cpu"]) == 0
    simulated = json.loads(next(best.glob("eval_mine-*.json")).read_text())
    assert main(["evaluate", "--model", str(path), "--file", str(data), "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    (result,) = path.parent.glob("tiny.eval_mine-*.json")
    engine = json.loads(result.read_text())
    assert engine["metrics"] == simulated["metrics"] and engine["source"] == simulated["source"]
    assert engine["model"] == str(path) and engine["engine"]["threads"] == 1 and engine["engine"]["cpu"]
    ((_, metrics),) = engine["metrics"].items()
    assert f"mine.csv: accuracy {100 * metrics['accuracy']:.2f}" in printed
    folder = save_pretrained(model, tmp_path / "shared", speed=False)
    assert main(["evaluate", "--model", str(folder), "--file", str(data), "--out", str(tmp_path / "f.json")]) == 0
    assert json.loads((tmp_path / "f.json").read_text())["metrics"] == simulated["metrics"]
    assert main(["evaluate", "--model", str(path), "--file", str(data), "--tokenizer", str(best)]) == 2
    assert "--tokenizer does not apply to a packed model" in capsys.readouterr().err


def test_the_packed_model_reads_as_a_pipeline(packed):
    model = load_packed(packed[0], threads=1)
    text = repr(model)
    assert text.startswith(f"PackedModel({str(packed[0])!r}, bits 1-1-1, activations sign, attention bi, 2 layers x 24")
    assert str(model.labels) in text and "1 threads" in text and "kernel " in text
    pred = model.predict(TEXTS)
    one = model(TEXTS[0])
    assert one == [{"label": pred.labels[0], "score": float(pred.scores[0].max())}]
    ranked = model(TEXTS, top_k=None)
    for row, scores in zip(ranked, pred.scores):
        assert [r["score"] for r in row] == sorted(map(float, scores), reverse=True)
        assert {r["label"] for r in row} == set(model.labels)
    assert model(TEXTS[:2], ["w1", "w2"], top_k=2)[1] == [
        {"label": model.labels[i], "score": float(s)} for i, s in
        sorted(enumerate(model.predict(TEXTS[:2], ["w1", "w2"]).scores[1]), key=lambda t: -t[1])[:2]]
    with pytest.raises(BibertError, match="give texts and pairs alike"):
        model(TEXTS, "w1")
    with pytest.raises(BibertError, match="top_k is 0"):
        model(TEXTS, top_k=0)


def test_bench_times_the_packed_model_against_a_teacher(packed, tmp_path, capsys):
    """`bibert bench`: batch-1 latency and size of the packed model and of a full-precision
    teacher on one's own texts (a file with pairs here), and how often their labels agree."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from bibert.cli import main
    from test_packed import SPECIAL_TOKENS, WORDS

    path, best = packed
    model = load_packed(path)
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(BertConfig(
        vocab_size=len(SPECIAL_TOKENS + WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=32, num_labels=3,
        id2label=dict(enumerate(model.labels)), label2id={v: i for i, v in enumerate(model.labels)})).eval()
    teacher.save_pretrained(tmp_path / "teacher")
    for f in ("vocab.txt", "tokenizer_config.json"):
        (tmp_path / "teacher" / f).write_bytes((best / f).read_bytes())
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"a": t, "b": "w3 w4"}) + "\n" for t in TEXTS * 3))
    assert main(["bench", "--model", str(path), "--teacher", str(tmp_path / "teacher"), "--file", str(data),
                 "--text-column", "a", "--text-pair-column", "b", "--rounds", "2", "--json",
                 "--out", str(tmp_path / "bench.json")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result == json.loads((tmp_path / "bench.json").read_text())
    assert result["texts"] == 9 and result["source"] == "pairs.jsonl (9 rows)" and result["cpu"]
    assert result["packed"]["bytes"] == path.stat().st_size and result["packed"]["median_ms"] > 0
    assert result["teacher"]["bytes"] == (tmp_path / "teacher" / "model.safetensors").stat().st_size
    assert result["speedup"] == round(result["teacher"]["median_ms"] / result["packed"]["median_ms"], 2)
    assert 0 <= result["same_label"] <= 1
    assert main(["bench", "--model", str(path), "w1 w2", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("1 texts from the command line, batch 1, 1 rounds") and "packed" in out
    assert main(["bench", "--model", str(path), "--file", str(data), "--text-column", "nope"]) == 2
    assert "no text column 'nope'" in capsys.readouterr().err
    assert main(["bench", "--model", str(path), "--teacher", str(tmp_path / "missing")]) == 2
    assert "no such folder" in capsys.readouterr().err
