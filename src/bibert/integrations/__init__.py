"""Scoring with a packed model on data engines that run past one process: Ray Data
(`bibert.integrations.ray`, pip install 'bibert[ray]') and Spark
(`bibert.integrations.spark`, pip install 'bibert[spark]'). Both ship only the model's
path and options to their workers, which load the packed model once each and score
batches exactly as `bibert predict --file` does (bibert.BatchPredictor)."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ..errors import BibertError


@dataclass(frozen=True)
class ModelInfo:
    """What the driver knows of a packed model before any worker starts."""
    path: str  # the packed file (a folder or Hub repo id resolved to it)
    labels: tuple[str, ...]
    num_labels: int

    @property
    def prediction_columns(self) -> list[str]:
        return ["pred_value"] if self.num_labels == 1 else ["pred_label"] + [f"prob_{x}" for x in self.labels]


def check_model(model) -> ModelInfo:
    """Load the packed model once on the driver: a path that does not exist or a file that is
    not a packed model is refused here, with one message, before workers start."""
    from ..packed import load_packed

    if isinstance(model, (str, os.PathLike)) is False:
        raise BibertError(f"model is {model!r}: give the path of a packed model (bibert export)")
    engine = load_packed(model, threads=1)
    return ModelInfo(os.path.abspath(engine.source), tuple(str(x) for x in engine.labels), engine.num_labels)


def text_columns_of(text_columns) -> list[str]:
    columns = [text_columns] if isinstance(text_columns, str) else list(text_columns)
    if not 1 <= len(columns) <= 2 or not all(isinstance(c, str) and c for c in columns):
        raise BibertError(f"text_columns is {text_columns!r}: give a column name, or a text and a pair column")
    return columns


def check_columns(have: list[str], wanted: list[str], where: str) -> None:
    missing = [c for c in wanted if c not in have]
    if missing:
        raise BibertError(f"{where} has no column {', '.join(map(repr, missing))} (its columns: "
                          f"{', '.join(map(str, have))})")


def positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BibertError(f"{name} is {value!r}: give a positive integer")


def clear_error(exc: BaseException) -> BibertError | None:
    """The BibertError behind an engine's failure (a Ray task or actor, a Spark Python worker
    that raised one), as one message without the engine's tracebacks; None if the failure
    is not bibert's."""
    seen, stack = set(), [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if type(e) is BibertError:
            return e
        stack += [getattr(e, attr, None) for attr in ("cause", "__cause__", "__context__")]
    found = re.findall(r"bibert\.errors\.BibertError: ([^\n]+)|^BibertError: ([^\n]+)", str(exc), re.M)
    if found:
        return BibertError(next(x for x in found[-1] if x).strip())
    return None
