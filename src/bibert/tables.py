"""Streaming readers of row files (.csv, .tsv, .jsonl, .parquet) and appending writers
(.csv, .jsonl): your own training data and batch prediction read and write through them.

Readers hold at most one row (text formats) or one row group (parquet) in memory; they
yield `Row(number, where, values)`: the 0-based number of the data row, a place for error
messages ("line 12", "row group 3 row 5") and the row's values by column. Blank lines are
not rows. Writers append whole rows and report the bytes they wrote, so that the caller
can record exactly where its last complete row ends.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .errors import BibertError, not_a_file

INPUT_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
OUTPUT_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
CSV_FIELD_LIMIT = 1 << 28  # characters in one CSV field (the csv module's default is 128 Ki)


@dataclass
class Row:
    number: int  # 0-based, among the data rows
    where: str  # "line 12": where the row starts in the file, for messages
    values: dict[str, Any]


def text_cell(value: Any, where: str, column: str, advice: str) -> str:
    """`value` as a text to classify: a valid Unicode string, else one error naming `where`
    (a file's line, a batch's row), the column and the fix."""
    if not isinstance(value, str):
        problem = "has no value" if value is None or value != value else f"holds a {type(value).__name__}"
        raise BibertError(f"{where}: column {column!r} {problem}, not text; {advice}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BibertError(f"{where}: column {column!r} holds a lone surrogate at character {exc.start} (a broken "
                          "\\u escape); clean the text") from None
    return value


def input_format(path: Path) -> str:
    fmt = INPUT_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise BibertError(f"{path}: unsupported input format {path.suffix or '(no extension)'!r}; give a .csv, "
                          ".tsv, .jsonl or .parquet file (compressed files: decompress them first)")
    return fmt


def output_format(path: Path) -> str:
    fmt = OUTPUT_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise BibertError(f"{path}: unsupported output format {path.suffix or '(no extension)'!r}; "
                          "write a .csv or .jsonl file")
    return fmt


class TableReader:
    """One input file. `columns`: the column names known before reading rows (the header of
    a CSV/TSV file, the schema of a parquet file; for JSONL, the keys of the first object).
    `rows(skip)` streams the rows after the first `skip`. `position()` / `size`: bytes read so
    far and in all (text formats; for a progress estimate). `total`: the row count where the
    file states it (parquet), else None."""

    def __init__(self, path: Path):
        self.path = path
        self.format = input_format(path)
        if not path.is_file():
            raise not_a_file(path, "input file")
        try:
            self.size = path.stat().st_size
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise BibertError(f"cannot read input file {path} ({exc.strerror or exc}); check its permissions") from None
        self.total: int | None = None
        self._raw = None
        if self.format == "parquet":
            self.columns = self._parquet_open()
        elif self.format == "jsonl":
            first = next(self._jsonl_rows(0), None)
            self.columns = list(first.values) if first else []
        else:
            self.columns = self._csv_header()

    def position(self) -> int:
        try:
            return self._raw.tell() if self._raw is not None and not self._raw.closed else 0
        except (OSError, ValueError):
            return 0

    def rows(self, skip: int = 0, columns: list[str] | None = None) -> Iterator[Row]:
        """Rows after the first `skip`; columns: the ones needed (parquet reads only those)."""
        if self.format == "parquet":
            return self._parquet_rows(skip, columns)
        if self.format == "jsonl":
            return self._jsonl_rows(skip)
        return self._csv_rows(skip)

    # ---- CSV / TSV -------------------------------------------------------------------

    def _csv_reader(self, raw):
        text = io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")
        if csv.field_size_limit() < CSV_FIELD_LIMIT:
            csv.field_size_limit(CSV_FIELD_LIMIT)
        return csv.reader(text, delimiter="\t" if self.format == "tsv" else ",", strict=True)

    def _csv_header(self) -> list[str]:
        with open(self.path, "rb") as raw:
            reader = self._csv_reader(raw)
            try:
                header = next(reader, None)
            except UnicodeDecodeError as exc:
                raise self._not_utf8(exc, 1) from None
            except csv.Error as exc:
                raise BibertError(f"{self.path} line {reader.line_num}: malformed {self.format.upper()} ({exc})") from None
        if not header:
            raise BibertError(f"{self.path} is empty: a {self.format.upper()} file needs a header row naming "
                              "its columns")
        dupes = sorted({c for c in header if header.count(c) > 1})
        if dupes:
            raise BibertError(f"{self.path}: the header names column(s) {', '.join(map(repr, dupes))} more than "
                              "once; give every column its own name")
        return header

    def _csv_rows(self, skip: int) -> Iterator[Row]:
        with open(self.path, "rb") as raw:
            self._raw = raw
            reader = self._csv_reader(raw)
            header, n = None, 0
            while True:
                start = reader.line_num + 1
                try:
                    fields = next(reader, None)
                except UnicodeDecodeError as exc:
                    raise self._not_utf8(exc, start) from None
                except csv.Error as exc:
                    if "end of data" in str(exc):
                        raise BibertError(f"{self.path} line {start}: a quoted field that starts in this row is "
                                          "never closed (a quote inside a quoted field is doubled: \"\")") from None
                    raise BibertError(f"{self.path} line {reader.line_num}: malformed {self.format.upper()} "
                                      f"({exc}); quote fields that hold the delimiter, a quote or a line break, "
                                      "and double the quotes inside them") from None
                if fields is None:
                    return
                if header is None:
                    header = fields
                    continue
                if not fields:  # a blank line
                    continue
                if len(fields) != len(header):
                    raise BibertError(
                        f"{self.path} line {start}: {len(fields)} fields where the header has {len(header)}; "
                        f"a field that holds the delimiter, a quote or a line break must be quoted "
                        f"(\"a, b\"; a quote inside is doubled: \"say \"\"hi\"\"\")")
                if n >= skip:
                    yield Row(n, f"line {start}", dict(zip(header, fields)))
                n += 1

    def _not_utf8(self, exc: UnicodeDecodeError, line: int) -> BibertError:
        return BibertError(f"{self.path} near line {line} is not UTF-8 ({exc.reason}); convert the file to UTF-8, "
                           f"e.g. iconv -f latin1 -t utf-8 {self.path.name} > converted{self.path.suffix}")

    # ---- JSONL -----------------------------------------------------------------------

    def _jsonl_rows(self, skip: int) -> Iterator[Row]:
        with open(self.path, "rb") as raw:
            self._raw = raw
            n = 0
            for lineno, line in enumerate(raw, 1):
                if lineno == 1 and line.startswith(b"\xef\xbb\xbf"):
                    line = line[3:]
                if not line.strip():
                    continue
                if n >= skip:
                    try:
                        value = json.loads(line)
                    except UnicodeDecodeError as exc:
                        raise self._not_utf8(exc, lineno) from None
                    except (ValueError, RecursionError) as exc:
                        raise BibertError(f"{self.path} line {lineno}: not valid JSON ({exc}); each line must "
                                          "hold one JSON object") from None
                    if not isinstance(value, dict):
                        raise BibertError(f"{self.path} line {lineno}: a JSON {type(value).__name__}, not an "
                                          "object; each line must hold one object such as {\"text\": \"...\"}")
                    yield Row(n, f"line {lineno}", value)
                n += 1

    # ---- parquet ---------------------------------------------------------------------

    def _parquet_open(self) -> list[str]:
        import pyarrow.parquet as pq

        try:
            self._parquet = pq.ParquetFile(self.path)
        except Exception as exc:  # pyarrow raises its own ArrowInvalid / OSError types
            raise BibertError(f"{self.path} is not a readable parquet file ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
        meta = self._parquet.metadata
        self.total = meta.num_rows
        return list(self._parquet.schema_arrow.names)

    def _parquet_rows(self, skip: int, columns: list[str] | None) -> Iterator[Row]:
        meta = self._parquet.metadata
        n = 0
        for group in range(meta.num_row_groups):
            rows_in_group = meta.row_group(group).num_rows
            if n + rows_in_group <= skip:  # a whole row group before the resume point: not read
                n += rows_in_group
                continue
            try:
                table = self._parquet.read_row_group(group, columns=columns)
            except Exception as exc:
                raise BibertError(f"{self.path}: row group {group} cannot be read ({type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
            for start in range(0, table.num_rows, 1024):
                for i, values in enumerate(table.slice(start, 1024).to_pylist()):
                    if n >= skip:
                        yield Row(n, f"row group {group} row {start + i}", values)
                    n += 1
            del table


# ---- writers ---------------------------------------------------------------------------


def _cell(value: Any) -> str:
    """A value as one CSV field: strings as they are, None empty, numbers in their shortest
    form, lists and objects as JSON."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)


def _json_safe(value: Any) -> Any:
    """Non-finite floats become null: JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class TableWriter:
    """Rows as the bytes of a CSV file (header first) or a JSONL file (one object per
    line). The caller writes them, so that it knows where the last complete row ends."""

    def __init__(self, fmt: str, columns: list[str]):
        self.format, self.columns = fmt, columns

    def header(self) -> bytes:
        if self.format != "csv":
            return b""
        return self._csv([self.columns])

    def encode(self, rows: list[dict[str, Any]]) -> bytes:
        """Whole rows as bytes. CSV: the values of `columns` (a missing one empty); JSONL:
        each object as it is."""
        if self.format == "csv":
            return self._csv([[_cell(row.get(c)) for c in self.columns] for row in rows])
        out = []
        for row in rows:
            obj = {k: _json_safe(v) for k, v in row.items()}
            line = json.dumps(obj, ensure_ascii=False, default=str)
            try:
                out.append(line.encode("utf-8"))
            except UnicodeEncodeError:  # a lone surrogate (from a \ud800 escape in the input): keep it escaped
                out.append(json.dumps(obj, ensure_ascii=True, default=str).encode("ascii"))
        return b"".join(line + b"\n" for line in out)

    @staticmethod
    def _csv(rows: list[list[str]]) -> bytes:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(rows)
        return buf.getvalue().encode("utf-8", "replace")  # a lone surrogate in a copied column becomes "?"


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (where the platform allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
