"""Shared by tests/test_ray.py and tests/test_spark.py: a small packed model, a 20,000-row
CSV of varied texts (quotes, commas, newlines inside fields, non-ASCII, empty texts) and
`bibert predict --file`'s output for it, the reference every engine must match."""
from __future__ import annotations

import csv
from pathlib import Path

from bibert.packed import export_packed
from bibert.serving import predict_file
from test_batch_predict import TEXTS, write_csv
from test_packed import WORDS, make_student

ROWS = 20_000
MAX_LENGTH = 16


def make_model(tmp: Path) -> Path:
    _, folder = make_student(tmp)
    out = tmp / "tiny.bibert"
    export_packed(folder, out)
    return out


def make_rows(n: int, start: int = 0) -> list[dict]:
    rows = []
    for i in range(start, start + n):
        words = " ".join(WORDS[(i * k) % len(WORDS)] for k in range(1, 2 + i % 9))
        text = TEXTS[i % len(TEXTS)] if i % 5 == 0 else words
        pair = " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(i % 6))
        rows.append({"id": f"r{i}", "text": text, "pair": pair, "note": f"n,{i}"})
    return rows


def make_csv(path: Path, n: int = ROWS, start: int = 0) -> Path:
    write_csv(path, make_rows(n, start))
    return path


def reference(model: Path, src: Path, out: Path, pair: str | None = None) -> list[dict]:
    """`bibert predict --file` on src: its rows, as the CSV gives them back."""
    predict_file(model, src, out, "text", pair, progress=False, max_length=MAX_LENGTH, overwrite=True)
    with open(out, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def assert_same(got: list[dict], want: list[dict]) -> None:
    """Label for label, probability for probability (the CSV's 7 significant digits)."""
    assert len(got) == len(want)
    probs = [k for k in want[0] if k.startswith("prob_")]
    assert probs
    for g, w in zip(got, want):
        assert g["id"] == w["id"]
        assert g["pred_label"] == w["pred_label"], g["id"]
        for k in probs:
            assert g[k] == float(w[k]), (g["id"], k)
