"""Predictions for many texts at once, in forwards of up to MAX_ROWS sequences.

The engine computes only the real tokens of each sequence (a padded position is never a row,
docs/packed_format.md), so texts of any lengths can share a forward; a forward of several
sequences costs less per text than one of one sequence (fewer calls, and with several
kernel threads each thread runs whole sequences). The texts are tokenized, sorted by token
count (so that the padded arrays handed to the engine stay small) and cut into forwards of
at most `max_rows` sequences and `max_tokens` padded tokens. Results come back in input
order, equal to `PackedModel.predict` on the same texts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..errors import BibertError

MAX_ROWS = 32  # sequences per forward
MAX_TOKENS = 4096  # padded tokens per forward (the input arrays built for one call)


def effective_max_length(model, max_length: int | None) -> int:
    """Tokens per input after truncation: max_length capped at the model's positions."""
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
        raise BibertError(f"max_length is {max_length!r}: give a positive number of tokens, or leave it out")
    return min(int(max_length or model.max_positions), model.max_positions)


def plan_forwards(lengths: list[int], max_rows: int = MAX_ROWS, max_tokens: int = MAX_TOKENS) -> list[list[int]]:
    """Indices of `lengths`, grouped into forwards: sorted by length, each group grown while
    it has at most max_rows sequences and max_tokens padded tokens (rows x its longest)."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    groups: list[list[int]] = []
    group: list[int] = []
    for i in order:
        n = lengths[i]  # the longest so far (sorted)
        if group and (len(group) >= max_rows or (len(group) + 1) * n > max_tokens):
            groups.append(group)
            group = []
        group.append(i)
    if group:
        groups.append(group)
    return groups


@dataclass
class Prepared:
    """Texts tokenized and cut into forwards: per forward, the texts' indices and the padded
    input_ids, attention_mask and token_type_ids (None where the tokenizer gives none)."""

    n: int
    forwards: list[tuple[list[int], np.ndarray, np.ndarray, np.ndarray | None]] = field(default_factory=list)


def prepare(model, texts: list[str], pairs: list[str] | None = None, max_length: int | None = None,
            max_rows: int = MAX_ROWS) -> Prepared:
    """Tokenize `texts` (and `pairs`) and plan the forwards (see `plan_forwards`). Uses the
    model's tokenizer only, not the engine: it may run on another thread than `run`, but one
    thread at a time (the tokenizer's settings change with each call)."""
    n = len(texts)
    if pairs is not None and len(pairs) != n:
        raise BibertError(f"{n} texts but {len(pairs)} pairs: give one pair per text")
    if not n:
        return Prepared(0)
    limit = effective_max_length(model, max_length)
    tokenizer = model.tokenizer
    special = tokenizer.num_special_tokens_to_add(pair=pairs is not None)
    if limit <= special:
        raise BibertError(f"max_length {limit} leaves no room for text: the tokenizer adds {special} special tokens; "
                          f"give at least {special + 1}")
    try:
        enc = tokenizer(texts, pairs, truncation=True, max_length=limit, padding=False)
    except BaseException as exc:  # the tokenizer comes from the model file: any failure is the file's
        if not isinstance(exc, Exception) and type(exc).__name__ != "PanicException":
            raise
        raise BibertError(f"the tokenizer of {model.source} failed ({type(exc).__name__}: "
                          f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''})") from None
    ids, types = enc["input_ids"], enc.get("token_type_ids")
    lengths = [len(x) for x in ids]
    if min(lengths) < 1:
        raise BibertError("the tokenizer gave an empty sequence; the model needs at least its [CLS] token")
    pad = tokenizer.pad_token_id or 0
    prepared = Prepared(n)
    for group in plan_forwards(lengths, max_rows=max_rows):
        width = lengths[group[-1]]
        if all(lengths[i] == width for i in group):  # one length: no padding
            a_ids = np.array([ids[i] for i in group], np.int64)
            a_mask = np.ones_like(a_ids)
            a_types = None if types is None else np.array([types[i] for i in group], np.int64)
        else:
            a_ids = np.full((len(group), width), pad, np.int64)
            a_mask = np.zeros((len(group), width), np.int64)
            a_types = np.zeros((len(group), width), np.int64) if types is not None else None
            for row, i in enumerate(group):
                k = lengths[i]
                a_ids[row, :k] = ids[i]
                a_mask[row, :k] = 1
                if a_types is not None:
                    a_types[row, :k] = types[i]
        prepared.forwards.append((group, a_ids, a_mask, a_types))
    return prepared


def run(model, prepared: Prepared, on_forward: Callable[[int], None] | None = None) -> tuple[list, np.ndarray, int]:
    """(labels, scores, forwards) of prepared texts, in input order: scores are class
    probabilities [n, num_labels] (the predicted values [n] for regression). on_forward(k)
    is called after each forward of k texts. A text's scores do not depend on the texts it
    shares forwards with (the engine computes each sequence alone, its classifier row by
    row), so a file scored in windows and a table scored in an engine's batches (Ray,
    Spark) agree to the last bit."""
    logits = np.empty((prepared.n, model.num_labels), np.float32)
    for group, a_ids, a_mask, a_types in prepared.forwards:
        logits[group] = model.forward(a_ids, a_mask, a_types)
        if on_forward is not None:
            on_forward(len(group))
    count = len(prepared.forwards)
    if model.num_labels == 1:
        scores = logits[:, 0]
        return [float(v) for v in scores], scores, count
    if not prepared.n:
        return [], np.zeros((0, model.num_labels), np.float32), 0
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    scores = z / z.sum(axis=1, keepdims=True)
    return [model.labels[i] for i in scores.argmax(axis=1)], scores, count


def predict_texts(model, texts: list[str], pairs: list[str] | None = None, max_length: int | None = None,
                  max_rows: int = MAX_ROWS,
                  on_forward: Callable[[int], None] | None = None) -> tuple[list, np.ndarray, int]:
    """(labels, scores, forwards) for `texts` (and `pairs`), in input order: `prepare`, then
    `run`. The texts must be valid Unicode strings (checked by the caller)."""
    return run(model, prepare(model, texts, pairs, max_length, max_rows), on_forward)
