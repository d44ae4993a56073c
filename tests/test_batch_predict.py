"""Batch prediction over files: CSV/TSV/JSONL/parquet input with quoting quirks and
non-ASCII text, output in input order with the engine's own predictions, resume after an
interrupted run (and after a torn last write), clean refusals, the CLI."""
from __future__ import annotations

import csv
import json
import os
import tracemalloc

import numpy as np
import pytest

from bibert import BibertError
from bibert.cli import main as cli_main
from bibert.packed import export_packed, load_packed
from bibert.serving import predict_file
from bibert.serving.batch_predict import progress_path
from bibert.tables import TableReader
from test_packed import make_student

TEXTS = [
    "the movie was good",
    'a "quoted" plot, with commas, and a "very" dull ending',
    "line one\nline two, still the same field\r\nand a third",
    "café, naïve façade — 日本語のテキスト 🎬",
    "",
    "  leading and trailing spaces  ",
    "fun",
    "not very fun and not very great and a boring story " * 3,
    'only a quote: "',
    "tab\tinside",
]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("batch")
    _, folder = make_student(tmp)
    out = tmp / "tiny.bibert"
    export_packed(folder, out)
    return out


@pytest.fixture(scope="module")
def engine(model_file):
    return load_packed(model_file)


def rows(n=30):
    return [{"id": f"r{i}", "text": TEXTS[i % len(TEXTS)], "pair": TEXTS[(i * 3 + 1) % len(TEXTS)],
             "note": f"n,{i}\n\"x\""} for i in range(n)]


def write_csv(path, data, delimiter=","):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, list(data[0]), delimiter=delimiter)
        w.writeheader()
        w.writerows(data)


def write_jsonl(path, data):
    with open(path, "w", encoding="utf-8") as f:
        for row in data:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_out(path):
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def check_predictions(engine, data, out_rows, pairs=False):
    """Output rows in input order, with the engine's labels and probabilities."""
    assert len(out_rows) == len(data)
    texts = [r["text"] for r in data]
    expected = engine.predict(texts, pairs=[r["pair"] for r in data] if pairs else None)
    for row, src, label, score in zip(out_rows, data, expected.labels, expected.scores):
        assert row["id"] == src["id"]
        assert row["pred_label"] == label
        probs = [float(row[f"prob_{name}"]) for name in engine.labels]
        np.testing.assert_allclose(probs, score, rtol=1e-5, atol=1e-6)


def test_csv_quoting_quirks_and_non_ascii(engine, model_file, tmp_path):
    data = rows()
    src, out = tmp_path / "in.csv", tmp_path / "out.csv"
    write_csv(src, data)
    summary = predict_file(model_file, src, out, "text", window=7, batch_size=3, progress=False)
    assert summary.rows == summary.new_rows == len(data)
    got = read_out(out)
    for row, original in zip(got, data):  # every input column comes back unchanged, quotes and line breaks too
        assert {k: row[k] for k in original} == original
    check_predictions(engine, data, got)
    record = json.loads(progress_path(out).read_text())
    assert record["complete"] and record["rows"] == len(data) and record["bytes"] == out.stat().st_size


def test_jsonl_pairs_and_id_column(engine, model_file, tmp_path):
    data = rows(25)
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, data)
    predict_file(model_file, src, out, "text", pair_column="pair", id_column="id", window=10, progress=False)
    got = read_out(out)
    assert set(got[0]) == {"id", "pred_label"} | {f"prob_{name}" for name in engine.labels}
    check_predictions(engine, data, got, pairs=True)
    # JSONL to CSV with every column: the first object's keys are the columns
    out_csv = tmp_path / "out.csv"
    predict_file(model_file, src, out_csv, "text", pair_column="pair", progress=False)
    got = read_out(out_csv)
    assert [r["text"] for r in got] == [r["text"] for r in data]
    check_predictions(engine, data, got, pairs=True)


def test_tsv_and_parquet(engine, model_file, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = rows(23)
    tsv = tmp_path / "in.tsv"
    write_csv(tsv, data, delimiter="\t")
    out = tmp_path / "tsv.jsonl"
    predict_file(model_file, tsv, out, "text", progress=False)
    check_predictions(engine, data, read_out(out))
    table = pa.table({k: [r[k] for r in data] for k in data[0]})
    parquet = tmp_path / "in.parquet"
    pq.write_table(table, parquet, row_group_size=5)  # five row groups
    out = tmp_path / "parquet.csv"
    predict_file(model_file, parquet, out, "text", id_column="id", window=4, progress=False)
    check_predictions(engine, data, read_out(out))


def test_resume_after_interrupted_run_and_torn_write(engine, model_file, tmp_path):
    data = rows(40)
    src = tmp_path / "in.csv"
    write_csv(src, data)
    clean = tmp_path / "clean.csv"
    predict_file(model_file, src, clean, "text", window=8, progress=False)

    out = tmp_path / "out.csv"
    flaky = load_packed(model_file)
    done = {"rows": 0}
    real = flaky.forward

    def interrupted(ids, *args, **kwargs):
        if done["rows"] + len(ids) > 12:  # in the middle of the second window
            raise KeyboardInterrupt
        done["rows"] += len(ids)
        return real(ids, *args, **kwargs)

    flaky.forward = interrupted
    with pytest.raises(KeyboardInterrupt):
        predict_file(flaky, src, out, "text", window=8, batch_size=4, progress=False)
    record = json.loads(progress_path(out).read_text())
    assert record["rows"] == 8 and not record["complete"]
    # a crash in the middle of a write: half a row after the recorded end
    with open(out, "ab") as f:
        f.write(b'r8,"the movie was go')
    with pytest.raises(BibertError, match="--resume"):
        predict_file(model_file, src, out, "text", window=8, progress=False)
    summary = predict_file(model_file, src, out, "text", window=8, resume=True, progress=False)
    assert summary.resumed_from == 8 and summary.new_rows == 32
    assert out.read_bytes() == clean.read_bytes()
    again = predict_file(model_file, src, out, "text", window=8, resume=True, progress=False)
    assert again.new_rows == 0 and "complete" in str(again)


def test_resume_refuses_another_input_model_or_settings(model_file, tmp_path):
    data = rows(12)
    src, out = tmp_path / "in.csv", tmp_path / "out.csv"
    write_csv(src, data)
    predict_file(model_file, src, out, "text", progress=False)
    other = tmp_path / "other.csv"
    write_csv(other, rows(13))
    with pytest.raises(BibertError, match="input file"):
        predict_file(model_file, other, out, "text", resume=True, progress=False)
    with pytest.raises(BibertError, match="pair column"):
        predict_file(model_file, src, out, "text", pair_column="pair", resume=True, progress=False)
    _, folder = make_student(tmp_path, seed=1)
    model2 = tmp_path / "other.bibert"
    export_packed(folder, model2)
    with pytest.raises(BibertError, match="model"):
        predict_file(model2, src, out, "text", resume=True, progress=False)
    progress_path(out).unlink()
    with pytest.raises(BibertError, match="cannot be resumed"):
        predict_file(model_file, src, out, "text", resume=True, progress=False)
    predict_file(model_file, src, out, "text", overwrite=True, progress=False)
    assert len(read_out(out)) == 12


@pytest.mark.parametrize("content, suffix, message", [
    ("id,text\n1,fine\n2,\"unclosed, row\n3,x\n", ".csv", "line 3: a quoted field .* never closed"),
    ('id,text\n1,"a"b\n', ".csv", "line 2: malformed CSV"),
    ("id,text\n1,a,b\n", ".csv", "line 2: 3 fields"),
    ("id,words\n1,a\n", ".csv", "no text column 'text'"),
    ('{"text": "ok"}\nnot json\n', ".jsonl", "line 2: not valid JSON"),
    ('{"text": "ok"}\n[1, 2]\n', ".jsonl", "line 2: a JSON list"),
    ('{"text": "ok"}\n{"text": null}\n', ".jsonl", "line 2: column 'text' has no value"),
    ('{"text": "ok"}\n{"text": 5}\n', ".jsonl", "holds a int"),
    ('{"text": "ok"}\n{"text": "\\ud800"}\n', ".jsonl", "lone surrogate"),
    ("", ".csv", "is empty"),
    ("text\nx\n", ".xlsx", "unsupported input format"),
    (b"text\ncaf\xe9\n", ".csv", "not UTF-8"),
])
def test_bad_inputs_are_clear_errors(model_file, tmp_path, content, suffix, message):
    src = tmp_path / f"in{suffix}"
    src.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(BibertError, match=message):
        predict_file(model_file, src, tmp_path / "out.jsonl", "text", progress=False)


def test_bad_paths(model_file, tmp_path):
    src = tmp_path / "in.csv"
    write_csv(src, rows(3))
    with pytest.raises(BibertError, match="does not exist"):
        predict_file(model_file, tmp_path / "missing.csv", tmp_path / "o.csv", "text")
    with pytest.raises(BibertError, match="output format"):
        predict_file(model_file, src, tmp_path / "o.xlsx", "text")
    with pytest.raises(BibertError, match="is the input"):
        predict_file(model_file, src, src.with_suffix(".csv"), "text", overwrite=True)
    with pytest.raises(BibertError, match="folder"):
        predict_file(model_file, src, tmp_path / "nope" / "o.csv", "text")
    with pytest.raises(BibertError, match="would overwrite"):
        bad = tmp_path / "labelled.csv"
        write_csv(bad, [{"text": "x", "pred_label": "y"}])
        predict_file(model_file, bad, tmp_path / "o.csv", "text")


def test_output_folder_and_special_files_are_one_line_errors(model_file, tmp_path, capsys):
    src = tmp_path / "in.csv"
    write_csv(src, rows(3))
    folder = tmp_path / "out.csv"
    folder.mkdir()
    assert cli_main(["predict", "--model", str(model_file), "--file", str(src), "--text-column", "text",
                     "--out", str(folder), "--overwrite", "--no-progress"]) == 2
    assert capsys.readouterr().err == (f"bibert predict: error: the output {folder} is a folder; give a file name in "
                                       f"it, e.g. {folder / 'predictions.csv'}\n")
    fifo = tmp_path / "in.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(BibertError, match=rf"^input file {fifo} is a named pipe \(FIFO\), not a file; give the path "
                       "of a file on disk$"):
        predict_file(model_file, fifo, tmp_path / "o.csv", "text")
    (tmp_path / "null.csv").symlink_to("/dev/null")
    with pytest.raises(BibertError, match=r"^input file .*null.csv is a character device, not a file"):
        predict_file(model_file, tmp_path / "null.csv", tmp_path / "o.csv", "text")
    with pytest.raises(BibertError, match=r"^input file .* is a folder, not a file$"):
        predict_file(model_file, folder, tmp_path / "o.csv", "text")


def test_a_full_disk_is_one_line_and_resume_continues(model_file, tmp_path, monkeypatch, capsys):
    """Issue 28: OSError 28 while writing the output was a traceback; the rows already
    committed stay, and --resume then gives the same file as a run that never failed."""
    import errno

    import bibert.serving.batch_predict as bp

    src = tmp_path / "in.csv"
    write_csv(src, rows(40))
    args = ["predict", "--model", str(model_file), "--file", str(src), "--text-column", "text", "--window", "8",
            "--no-progress", "--out"]
    assert cli_main([*args, str(tmp_path / "whole.csv")]) == 0
    real_fsync, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 7:  # header, then the record and the output of two windows: the third window's write
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(bp.os, "fsync", fsync)
    capsys.readouterr()
    out = tmp_path / "out.csv"
    assert cli_main([*args, str(out)]) == 2
    err = capsys.readouterr().err
    assert err == (f"bibert predict: error: cannot write {out}: No space left on device (ENOSPC); 16 rows are "
                   "complete in it: free some space, then run the same command with --resume to continue\n")
    monkeypatch.setattr(bp.os, "fsync", real_fsync)
    assert cli_main([*args, str(out), "--resume"]) == 0
    assert out.read_bytes() == (tmp_path / "whole.csv").read_bytes()


def test_reader_streams_in_constant_memory(tmp_path):
    """Reading 4x the rows does not need more memory: one row at a time."""
    def peak(n):
        path = tmp_path / f"big{n}.csv"
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "text"])
            for i in range(n):
                w.writerow([i, f"row {i}, with a comma and \"quotes\" " * 4])
        reader = TableReader(path)
        tracemalloc.start()
        count = sum(1 for _ in reader.rows())
        size, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert count == n
        return top

    small, large = peak(5000), peak(20000)
    assert large < 1.5 * small + 64 * 1024


def test_cli_file_mode_and_text_mode(model_file, tmp_path, capsys):
    data = rows(9)
    src, out = tmp_path / "in.csv", tmp_path / "out.jsonl"
    write_csv(src, data)
    args = ["predict", "--model", str(model_file), "--file", str(src), "--text-column", "text", "--out", str(out),
            "--no-progress"]
    assert cli_main(args) == 0
    assert "wrote 9 rows" in capsys.readouterr().out
    assert len(read_out(out)) == 9
    assert cli_main(args) == 2
    assert "--resume" in capsys.readouterr().err
    assert cli_main(args + ["--resume"]) == 0
    assert "complete" in capsys.readouterr().out
    assert cli_main(["predict", "--model", str(model_file), "--file", str(src), "--out", str(out)]) == 2
    assert "--text-column" in capsys.readouterr().err
    assert cli_main(["predict", "--model", str(model_file), "the movie was good", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["label"]
    assert cli_main(["predict", "--model", str(model_file)]) == 2


def test_forwards_take_texts_in_length_order_up_to_the_caps():
    from bibert.serving.batching import plan_forwards

    lengths = [5, 9, 5, 5, 12, 9, 5, 30, 5]
    groups = plan_forwards(lengths, max_rows=3)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert [[lengths[i] for i in g] for g in groups] == [[5, 5, 5], [5, 5, 9], [9, 12, 30]]
    # a fourth row of 12 tokens would pad the second forward to 48 > 40 tokens
    assert plan_forwards(lengths, max_rows=4, max_tokens=40) == [[0, 2, 3, 6], [8, 1, 5], [4], [7]]
    assert plan_forwards([100] * 50, max_rows=64, max_tokens=1000) == [list(range(i, i + 10)) for i in range(0, 50, 10)]


def test_mixed_length_forwards_equal_one_text_per_forward(engine):
    """Texts of different lengths share a forward (the engine computes only each sequence's
    own tokens): every score equals that of the text run alone (to float rounding: the
    float head is one matrix product per forward)."""
    from bibert.serving.batching import predict_texts

    texts = [" ".join(["good"] * k + ["dull film"] * (k % 3)) for k in range(1, 40, 2)]
    labels, scores, forwards = predict_texts(engine, texts, max_rows=8)
    alone_labels, alone, alone_forwards = predict_texts(engine, texts, max_rows=1)
    assert forwards == 3 and alone_forwards == len(texts)
    assert labels == alone_labels
    np.testing.assert_allclose(scores, alone, rtol=1e-5, atol=1e-6)
