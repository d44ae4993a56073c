"""Batch prediction over a file: stream rows in, write labels and class probabilities out.

    predict_file("model.bibert", "reviews.csv", "scored.csv", text_column="review")

The input (.csv, .tsv, .jsonl or .parquet) is read as a stream, a window of rows at a time
(constant memory for any file size). Within a window the rows are tokenized, sorted by
token count and run in forwards of up to `batch_size` texts (the engine computes no
padding; see bibert.serving.batching), then written back in input order, each
with the input's columns (or only an id column) followed by `pred_label` and one
`prob_<label>` per class (`pred_value` for a regression model).

Consistency: after each window the output is flushed to disk, then a small record beside
it (`OUT.progress.json`) states how many rows and bytes of OUT are complete, replaced
atomically. A run that dies leaves at most a partial window after the recorded end;
`resume=True` checks that the record belongs to the same input, model and settings, cuts
OUT back to the recorded end and continues after the rows already written.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from ..errors import BibertError
from .batching import effective_max_length, predict_texts
from ..tables import Row, TableReader, TableWriter, output_format, text_cell

PROGRESS_SUFFIX = ".progress.json"
PROGRESS_VERSION = 1
FINGERPRINT_BYTES = 1 << 20  # the input is recognised by its size and the SHA-256 of its first and last MiB


@dataclass
class FileSummary:
    out: Path
    rows: int  # rows in OUT now
    new_rows: int  # rows this call predicted
    resumed_from: int  # rows that were already in OUT
    seconds: float  # of this call, model loading excluded

    @property
    def rows_per_s(self) -> float:
        return self.new_rows / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        if not self.new_rows and self.resumed_from:
            return f"{self.out} is already complete ({self.rows} rows)"
        done = f"wrote {self.new_rows} rows to {self.out} in {self.seconds:.1f} s ({self.rows_per_s:.1f} rows/s)"
        return done + (f", after the {self.resumed_from} rows already there" if self.resumed_from else "")


def progress_path(out: str | os.PathLike) -> Path:
    return Path(str(out) + PROGRESS_SUFFIX)


def predict_file(model, input_path: str | os.PathLike, out: str | os.PathLike, text_column: str,
                 pair_column: str | None = None, id_column: str | None = None, *, batch_size: int = 32,
                 window: int = 2048, max_length: int | None = None, resume: bool = False,
                 overwrite: bool = False, progress: bool = True, threads: int | None = None,
                 kernel: str | None = None) -> FileSummary:
    """Predict every row of `input_path` into `out` (.csv or .jsonl).

    model: a packed model file (or a loaded PackedModel). text_column / pair_column: the
    columns holding the text and the optional second segment. id_column: write only this
    column before the predictions (default: every input column). batch_size: most texts per
    forward; window: rows sorted by length together (memory grows with it). An existing
    `out` is refused unless resume (continue it) or overwrite (replace it) is given."""
    from ..packed import PackedModel, load_packed

    if resume and overwrite:
        raise BibertError("give either resume (continue OUT) or overwrite (replace it), not both")
    for name, value in (("batch_size", batch_size), ("window", window)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise BibertError(f"{name} is {value!r}: give a positive integer")
    input_path, out = Path(input_path), Path(out)
    if out.is_dir():
        raise BibertError(f"the output {out} is a folder; give a file name in it, e.g. {out / 'predictions.csv'}")
    fmt = output_format(out)
    reader = TableReader(input_path)
    if out.exists() and input_path.exists() and os.path.samefile(out, input_path):
        raise BibertError(f"the output {out} is the input file; write the predictions to another file")
    if not out.parent.is_dir():
        raise BibertError(f"the output's folder {out.parent} does not exist; create it first")
    _check_columns(reader, text_column, pair_column, id_column)

    if isinstance(model, PackedModel):
        engine, model_path = model, Path(model.source)
        from ..packed import kernels

        if threads is not None:
            kernels.set_threads(threads)
        if kernel is not None:
            kernels.set_kernel(kernel)
    else:
        model_path = Path(model)
        engine = load_packed(model_path, threads=threads, kernel=kernel)
    effective_max_length(engine, max_length)
    predictions = (["pred_value"] if engine.num_labels == 1
                   else ["pred_label"] + [f"prob_{label}" for label in engine.labels])
    base = [id_column] if id_column else list(reader.columns)
    clash = sorted(set(base) & set(predictions))
    if clash:
        raise BibertError(f"the input already has column(s) {', '.join(map(repr, clash))}, which the predictions "
                          "would overwrite; rename them, or pass an id column to write only it")
    columns = base + predictions
    identity = {
        "input_bytes": reader.size, "input_sha256": _fingerprint(input_path, reader.size),
        "model_sha256": _file_sha256(model_path), "text_column": text_column, "pair_column": pair_column,
        "id_column": id_column, "max_length": max_length, "columns": columns, "format": fmt,
    }
    skip, committed_bytes = _open_output(out, identity, resume, overwrite)
    writer = TableWriter(fmt, columns)
    record = {"version": PROGRESS_VERSION, "input": str(input_path.resolve()), **identity}
    if skip is None:  # already complete
        rows = json.loads(progress_path(out).read_text())["rows"]
        return FileSummary(out, rows, 0, rows, 0.0)

    # parquet reads only the columns it needs: the id's and the texts', or all of them
    needed = list(dict.fromkeys(c for c in (id_column, text_column, pair_column) if c)) if id_column else None
    start = time.perf_counter()
    committed_rows, new_rows = skip, 0
    bar = _progress_bar(progress, reader, skip)
    try:
        with _writing(out, lambda: committed_rows):
            f = open(out, "r+b" if committed_bytes else "wb")
        with f:
            with _writing(out, lambda: committed_rows):
                if committed_bytes:
                    f.truncate(committed_bytes)  # anything after the record is a partial window
                    f.seek(committed_bytes)
                else:
                    header = writer.header()
                    f.write(header)
                    committed_bytes = _commit(f, out, record, 0, len(header), complete=False)
            for chunk in _windows(reader.rows(skip, needed), window):
                texts, pairs = _texts(chunk, text_column, reader), None
                if pair_column:
                    pairs = _texts(chunk, pair_column, reader)
                labels, scores = _predict_window(engine, texts, pairs, batch_size, max_length, bar)
                out_rows = [_out_row(row, id_column, fmt, columns, predictions, label, score, reader)
                            for row, label, score in zip(chunk, labels, scores)]
                data = writer.encode(out_rows)
                with _writing(out, lambda: committed_rows):
                    f.write(data)
                    committed_bytes = _commit(f, out, record, committed_rows + len(chunk),
                                              committed_bytes + len(data), complete=False)
                committed_rows += len(chunk)
                new_rows += len(chunk)
                if reader.total is None and reader.position():
                    bar.total = max(committed_rows, int(committed_rows * reader.size / reader.position()))
            with _writing(out, lambda: committed_rows):
                _commit(f, out, record, committed_rows, committed_bytes, complete=True)
        bar.total = committed_rows
        bar.refresh()
    except KeyboardInterrupt:
        bar.close()
        print(f"interrupted: {committed_rows} rows are complete in {out}; run the same command with --resume "
              "to continue", file=sys.stderr)
        raise
    finally:
        bar.close()
    return FileSummary(out, committed_rows, new_rows, skip, time.perf_counter() - start)


# ---- pieces ------------------------------------------------------------------------------


@contextlib.contextmanager
def _writing(out: Path, complete_rows: Callable[[], int]):
    """Turns an OSError while writing OUT or its record (a full disk, a lost mount) into a
    BibertError that says how many rows are safe in OUT and how to continue."""
    try:
        yield
    except OSError as exc:
        name = errno.errorcode.get(exc.errno)
        fix = "free some space, then " if exc.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        rows = complete_rows()
        then = (f"{rows} rows are complete in it: {fix}run the same command with --resume to continue" if rows
                else f"{fix or 'check the folder and its permissions, then '}run the command again")
        raise BibertError(f"cannot write {out}: {exc.strerror or exc}" + (f" ({name})" if name else "") +
                          f"; {then}") from None


def _check_columns(reader: TableReader, text_column: str, pair_column: str | None, id_column: str | None) -> None:
    """The named columns exist (JSONL: in the first object; later rows are checked as read)."""
    if not isinstance(text_column, str) or not text_column:
        raise BibertError("name the column that holds the text (--text-column)")
    if reader.format == "jsonl" and not reader.columns:
        return  # no rows: nothing to check
    for what, col in (("text", text_column), ("pair", pair_column), ("id", id_column)):
        if col is not None and col not in reader.columns:
            where = "the first object of" if reader.format == "jsonl" else "the columns of"
            raise BibertError(f"no {what} column {col!r} in {where} {reader.path}; it has: "
                              f"{', '.join(map(repr, reader.columns[:20]))}{' ...' if len(reader.columns) > 20 else ''}")


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fingerprint(path: Path, size: int) -> str:
    """SHA-256 of the input's size, first MiB and last MiB: recognises the same file (a
    different one of the same size that differs only in between is not told apart)."""
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(FINGERPRINT_BYTES))
        if size > FINGERPRINT_BYTES:
            f.seek(max(FINGERPRINT_BYTES, size - FINGERPRINT_BYTES))
            h.update(f.read(FINGERPRINT_BYTES))
    return h.hexdigest()


def _open_output(out: Path, identity: dict, resume: bool, overwrite: bool) -> tuple[int | None, int]:
    """(rows to skip, bytes of OUT to keep): (0, 0) for a fresh output, (None, size) when a
    resumed output is already complete."""
    record_path = progress_path(out)
    if not out.exists() or overwrite:
        record_path.unlink(missing_ok=True)
        return 0, 0
    if not resume:
        raise BibertError(f"{out} already exists: pass --resume to continue it, or --overwrite to replace it")
    if not record_path.exists():
        raise BibertError(f"{out} exists but has no {record_path.name} beside it, so it cannot be resumed (it was "
                          "not written by bibert predict, or its record was removed); pass --overwrite to replace it")
    try:
        record = json.loads(record_path.read_text())
        rows, size, complete = int(record["rows"]), int(record["bytes"]), bool(record["complete"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BibertError(f"{record_path} is unreadable ({exc}); pass --overwrite to start again") from None
    differ = [k for k in identity if record.get(k) != identity[k]]
    if differ:
        what = {"input_bytes": "the input file", "input_sha256": "the input file", "model_sha256": "the model",
                "format": "the output format"}
        named = sorted({what.get(k, k.replace("_", " ")) for k in differ})
        raise BibertError(f"{out} was written from a different {', '.join(named)} than this run's; resume with the "
                          f"same input, model and options, or pass --overwrite to replace it")
    actual = out.stat().st_size
    if actual < size:
        raise BibertError(f"{out} is shorter ({actual} bytes) than its record says ({size} bytes): it was changed "
                          "after it was written; pass --overwrite to start again")
    if size:
        with open(out, "rb") as f:
            f.seek(size - 1)
            if f.read(1) != b"\n":
                raise BibertError(f"{out} does not end a row where its record says; pass --overwrite to start again")
    if complete and actual == size:
        return None, size
    return rows, size


def _commit(f, out: Path, record: dict, rows: int, size: int, complete: bool) -> int:
    """Make OUT's first `size` bytes durable, then record them (atomically: a new record file
    replaces the old). Returns size."""
    f.flush()
    os.fsync(f.fileno())
    record_path = progress_path(out)
    tmp = record_path.with_name(record_path.name + ".tmp")
    with open(tmp, "w") as r:
        json.dump({**record, "rows": rows, "bytes": size, "complete": complete}, r, indent=1)
        r.write("\n")
        r.flush()
        os.fsync(r.fileno())
    os.replace(tmp, record_path)
    return size


def _windows(rows: Iterable[Row], size: int) -> Iterator[list[Row]]:
    chunk: list[Row] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _texts(rows: list[Row], column: str, reader: TableReader) -> list[str]:
    return [text_cell(row.values.get(column), f"{reader.path} {row.where}", column,
                      "fill or drop such rows (every row needs a text)") for row in rows]


def _predict_window(engine, texts: list[str], pairs: list[str] | None, batch_size: int,
                    max_length: int | None, bar) -> tuple[list, np.ndarray]:
    """Labels and scores in input order; texts sorted by token count run in forwards of batch_size."""
    labels, scores, _ = predict_texts(engine, texts, pairs, max_length, max_rows=batch_size, on_forward=bar.update)
    return labels, scores


def _out_row(row: Row, id_column: str | None, fmt: str, columns: list[str], predictions: list[str],
             label, score: np.ndarray, reader: TableReader) -> dict:
    """The output row: the id (or the input's values) followed by the predictions."""
    if id_column:
        if id_column not in row.values:
            raise BibertError(f"{reader.path} {row.where}: no id column {id_column!r}")
        values = {id_column: row.values[id_column]}
    else:
        values = row.values
        if reader.format == "jsonl":  # other formats have one set of columns, checked up front
            clash = [k for k in predictions if k in values]
            if clash:
                raise BibertError(f"{reader.path} {row.where}: key(s) {', '.join(map(repr, clash))} would be "
                                  "overwritten by the predictions; rename them, or pass an id column to write only it")
            extra = [k for k in values if k not in columns] if fmt == "csv" else []
            if extra:
                raise BibertError(f"{reader.path} {row.where}: key(s) {', '.join(map(repr, extra[:5]))} that the "
                                  "first object lacks, so the CSV output has no column for them; write .jsonl output "
                                  "(it keeps every key), or pass an id column to write only it")
    if predictions == ["pred_value"]:
        preds = [_round(float(score))]
    else:
        preds = [label] + [_round(float(p)) for p in np.atleast_1d(score)]
    return {**values, **dict(zip(predictions, preds))}


def _round(p: float) -> float:
    """Probabilities to 7 significant digits (a float32's precision)."""
    return float(f"{p:.7g}")


def _progress_bar(enabled: bool, reader: TableReader, skip: int):
    from tqdm.auto import tqdm

    return tqdm(total=reader.total, initial=skip, unit=" rows", desc="predict", disable=not enabled,
                mininterval=0.5, smoothing=0.1, file=sys.stderr, dynamic_ncols=True)
