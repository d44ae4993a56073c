"""Score a Spark DataFrame with a packed model (pip install 'bibert[spark]'; Spark needs a
Java 17 runtime):

    from pyspark.sql.functions import col
    from bibert.integrations.spark import predict_udf

    udf = predict_udf("model.bibert")                    # one text column
    scored = df.withColumn("pred", udf(col("review"))).select("*", "pred.*").drop("pred")

    pair_udf = predict_udf("model.bibert", pairs=True)  # two columns: text and pair
    df.withColumn("pred", pair_udf("premise", "hypothesis"))

The UDF is `pyspark.ml.functions.predict_batch_udf`: Spark hands each Python worker Arrow
batches of `batch_size` rows; the worker loads the packed model once (kept in a module-level
cache keyed by the file and options, so every UDF and task in that worker shares it) and
returns a struct with `pred_label` and one `prob_<label>` per class (`pred_value` for a
regression model): the very values `bibert predict --file` writes for the same rows. The
model is checked on the driver when the UDF is made; the file must be at the same path on
every executor (a shared file system, or SparkContext.addFile and SparkFiles.get).
"""
from __future__ import annotations

import os
import threading

import numpy as np

from ..errors import BibertError
from . import check_model, clear_error, positive  # noqa: F401

_CACHE: dict[tuple, object] = {}
_LOCK = threading.Lock()


def _pyspark():
    try:
        import pyspark  # noqa: F401
        from pyspark.ml.functions import predict_batch_udf  # noqa: F401
    except ImportError as exc:
        raise BibertError(f"scoring on Spark needs PySpark ({exc.name} is missing): pip install 'bibert[spark]'") from None


def cached_predictor(path: str, threads: int | None, max_length: int | None, columns: tuple[str, ...],
                     forward_batch: int, kernel: str | None):
    """This process's BatchPredictor for the model and options, its packed model loaded once."""
    from ..serving.predictor import BatchPredictor

    key = (path, threads, max_length, columns, forward_batch, kernel)
    with _LOCK:
        predictor = _CACHE.get(key)
        if predictor is None:
            predictor = BatchPredictor(path, threads=threads, max_length=max_length, text_columns=list(columns),
                                       batch_size=forward_batch, kernel=kernel)
            try:
                predictor.engine
            except BibertError as exc:
                raise BibertError(f"a Spark worker on {os.uname().nodename} could not load the packed model: "
                                  f"{exc}") from None
            except Exception as exc:
                raise BibertError(f"a Spark worker on {os.uname().nodename} could not load the packed model {path}: "
                                  f"{type(exc).__name__}: {exc}") from None
            _CACHE[key] = predictor
    return predictor


def return_type(labels, num_labels: int):
    """The UDF's Spark type: struct<pred_label: string, prob_<label>: double...>, or
    struct<pred_value: double> for a regression model."""
    from pyspark.sql.types import DoubleType, StringType, StructField, StructType

    if num_labels == 1:
        return StructType([StructField("pred_value", DoubleType())])
    return StructType([StructField("pred_label", StringType())] +
                      [StructField(f"prob_{x}", DoubleType()) for x in labels])


def predict_udf(model, *, pairs: bool = False, threads: int | None = 1, batch_size: int = 1024,
                max_length: int | None = None, forward_batch: int = 32, kernel: str | None = None):
    """A Spark UDF scoring one text column (or, with pairs=True, a text and a pair column).

    model: a packed model (file, save_pretrained folder or Hub repo id), loaded here once on
    the driver to check it and to read its labels. threads: kernel threads per Python worker
    (1 by default: Spark runs one Python worker per task slot, so slots x threads fits the
    executor's cores); batch_size: rows per call of the model in a worker; max_length: tokens
    per input (default: the model's positions); forward_batch: most texts per forward.
    Returns a UDF giving a struct column: `pred_label` and `prob_<label>` per class."""
    _pyspark()
    from pyspark.ml.functions import predict_batch_udf

    positive("batch_size", batch_size)
    positive("forward_batch", forward_batch)
    if threads is not None:
        positive("threads", threads)
    info = check_model(model)
    columns = ("text", "pair") if pairs else ("text",)
    options = (info.path, threads, max_length, columns, forward_batch, kernel)
    names = info.prediction_columns

    def make_predict_fn():
        predictor = cached_predictor(*options)

        def run(frame):
            out = predictor(frame)
            result = {}
            for name in names:
                values = out[name].to_numpy()
                result[name] = values.astype(object) if name == "pred_label" else values.astype(np.float64)
            return result

        if pairs:
            def predict(texts: np.ndarray, pair_texts: np.ndarray):
                import pandas as pd

                return run(pd.DataFrame({"text": texts, "pair": pair_texts}))
        else:
            def predict(texts: np.ndarray):
                import pandas as pd

                return run(pd.DataFrame({"text": texts}))
        return predict

    return predict_batch_udf(make_predict_fn, return_type=return_type(info.labels, info.num_labels),
                             batch_size=batch_size)
