"""A worker-side predictor for data-frame engines (Ray Data, Spark, Dask, plain pandas):

    predictor = bibert.BatchPredictor("model.bibert", threads=1, text_columns=["review"])
    scored = predictor(frame)      # frame + pred_label + prob_<label>... (pred_value: regression)

It holds only the model's path and options, so it pickles to any worker; the packed model
(native handles, not picklable) is loaded on the first call, in the process that calls it,
and kept for the next calls there. Each batch is scored as `bibert predict --file` scores a
window of rows (`batching.predict_texts`, the same checks of the texts, probabilities
rounded to the same 7 significant digits), so a frame gives row for row the labels and
probabilities that `predict --file` writes for the same rows. Needs pandas (an optional
dependency: pip install pandas).
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from ..errors import BibertError
from ..tables import text_cell
from .batching import predict_texts


class BatchPredictor:
    """Scores pandas DataFrames with a packed model. model: the packed file's path; threads:
    the kernels' threads in the calling process (1: one per worker, so that workers x
    threads fits the CPUs); max_length: tokens per input (default: the model's positions);
    text_columns: the text column, or the text and pair columns; batch_size: most texts per
    forward; kernel: "auto", "avx512", "avx2" or "portable"."""

    def __init__(self, model: str | os.PathLike, threads: int | None = 1, max_length: int | None = None,
                 text_columns: str | Sequence[str] = "text", batch_size: int = 32, kernel: str | None = None):
        columns = [text_columns] if isinstance(text_columns, str) else list(text_columns)
        if not 1 <= len(columns) <= 2 or not all(isinstance(c, str) and c for c in columns):
            raise BibertError(f"text_columns is {text_columns!r}: give a column name, or a text and a pair column")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise BibertError(f"batch_size is {batch_size!r}: give a positive integer")
        self.model = os.fspath(model)
        self.threads, self.max_length, self.kernel = threads, max_length, kernel
        self.text_columns, self.batch_size = columns, batch_size
        self._engine = None

    def __repr__(self) -> str:
        return (f"BatchPredictor({self.model!r}, threads={self.threads}, max_length={self.max_length}, "
                f"text_columns={self.text_columns})")

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_engine": None}  # the path and options only: each process loads its own

    @property
    def engine(self):
        """The packed model, loaded in this process on first use."""
        if self._engine is None:
            from ..packed import load_packed

            if not os.path.isfile(self.model):
                raise BibertError(f"the packed model {self.model} does not exist (in this process's file system)")
            self._engine = load_packed(self.model, threads=self.threads, kernel=self.kernel)
        return self._engine

    def prediction_columns(self) -> list[str]:
        engine = self.engine
        return ["pred_value"] if engine.num_labels == 1 else ["pred_label"] + [f"prob_{x}" for x in engine.labels]

    def __call__(self, batch):
        """`batch` (a pandas DataFrame) with the prediction columns added after its own."""
        from .batch_predict import _round

        missing = [c for c in self.text_columns if c not in batch.columns]
        if missing:
            raise BibertError(f"the batch has no column {', '.join(map(repr, missing))} (its columns: "
                              f"{', '.join(map(str, batch.columns))})")
        engine, names = self.engine, self.prediction_columns()
        clash = [c for c in names if c in batch.columns]
        if clash:
            raise BibertError(f"the batch already has column(s) {', '.join(map(repr, clash))}, which the predictions "
                              "would overwrite; rename them")
        texts = _column_texts(batch, self.text_columns[0])
        pairs = _column_texts(batch, self.text_columns[1]) if len(self.text_columns) == 2 else None
        out = batch.copy()
        if not texts:
            for name in names:
                out[name] = np.array([], dtype=object if name == "pred_label" else np.float64)
            return out
        labels, scores, _ = predict_texts(engine, texts, pairs, self.max_length, max_rows=self.batch_size)
        if names == ["pred_value"]:
            out["pred_value"] = [_round(float(s)) for s in np.asarray(scores).reshape(-1)]
            return out
        out["pred_label"] = list(labels)
        for j, name in enumerate(names[1:]):
            out[name] = [_round(float(p)) for p in scores[:, j]]
        return out


def _column_texts(batch, column: str) -> list[str]:
    """The column's values, each a valid Unicode string (as predict --file requires)."""
    return [text_cell(value, f"row {i} of the batch", column, "fill or drop such rows")
            for i, value in enumerate(batch[column].tolist())]
