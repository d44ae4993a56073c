"""Spark: bibert.integrations.spark.predict_udf on one local Spark (local[2]) for the whole
module gives the labels and probabilities of `bibert predict --file`, row for row; bad
inputs give one clear error. Needs PySpark and a Java 17 runtime (skipped without)."""
from __future__ import annotations

import os
import shutil
import sys
import warnings

import pytest

pd = pytest.importorskip("pandas")
pytest.importorskip("pyspark", reason="PySpark is not installed: pip install 'bibert[spark]'")
if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
    pytest.skip("Spark needs a Java 17 runtime and none is installed (no java on PATH, no JAVA_HOME): "
                "apt-get install openjdk-17-jre-headless", allow_module_level=True)

from bibert import BibertError  # noqa: E402
from bibert.integrations import spark as bspark  # noqa: E402
from scale_util import MAX_LENGTH, ROWS, assert_same, make_csv, make_model, reference  # noqa: E402


@pytest.fixture(scope="module")
def spark():
    from pyspark.sql import SparkSession

    warnings.filterwarnings("ignore", category=FutureWarning, module="pyspark")
    os.environ["PYSPARK_PYTHON"] = sys.executable  # the workers import bibert from this venv
    os.environ["PYSPARK_DRIVER_PYTHON"] = sys.executable
    session = (SparkSession.builder.master("local[2]").appName("bibert-tests")
               .config("spark.ui.enabled", "false").config("spark.sql.shuffle.partitions", "2")
               .config("spark.driver.memory", "1g").getOrCreate())
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("spark")
    model = make_model(tmp)
    src = make_csv(tmp / "in.csv")
    return model, src, tmp


def scored(spark, src, udf, *columns):
    frame = pd.read_csv(src, dtype=str, keep_default_na=False)  # the CSV's cells as text, as predict --file reads
    df = spark.createDataFrame(frame).repartition(2)
    out = df.withColumn("pred", udf(*columns)).select("*", "pred.*").drop("pred").toPandas()
    return sorted(out.to_dict("records"), key=lambda r: int(r["id"][1:]))


def test_a_20000_row_csv_scores_as_predict_file_does(spark, data):
    from pyspark.sql.functions import col

    model, src, tmp = data
    want = reference(model, src, tmp / "ref.csv")
    got = scored(spark, src, bspark.predict_udf(model, max_length=MAX_LENGTH, batch_size=512), col("text"))
    assert len(got) == ROWS
    assert_same(got, want)
    assert list(got[0])[-4:] == ["pred_label", "prob_LABEL_0", "prob_LABEL_1", "prob_LABEL_2"]


def test_pairs_take_two_columns(spark, data):
    model, src, tmp = data
    small = make_csv(tmp / "pairs.csv", 3000)
    want = reference(model, small, tmp / "ref_pairs.csv", pair="pair")
    got = scored(spark, small, bspark.predict_udf(model, pairs=True, max_length=MAX_LENGTH), "text", "pair")
    assert_same(got, want)


def test_bad_inputs_give_one_clear_error(spark, data, tmp_path):
    from pyspark.errors import AnalysisException

    model, _, _ = data
    with pytest.raises(BibertError, match="missing.bibert does not exist"):  # on the driver, before any task
        bspark.predict_udf(tmp_path / "missing.bibert")
    df = spark.createDataFrame(pd.DataFrame({"text": ["a good film", "dull"]}))
    with pytest.raises(AnalysisException, match="review"):  # Spark's own check, on the driver
        df.withColumn("pred", bspark.predict_udf(model)("review"))
    # a worker that cannot load the model (here: the file is gone after the driver checked it)
    doomed = tmp_path / "doomed.bibert"
    shutil.copy(model, doomed)
    udf = bspark.predict_udf(doomed)
    doomed.unlink()
    bspark._CACHE.clear()
    with pytest.raises(Exception) as info:
        df.withColumn("pred", udf("text")).collect()
    err = bspark.clear_error(info.value)
    assert err is not None and "a Spark worker on" in str(err) and "could not load the packed model" in str(err)
    nulls = spark.createDataFrame(pd.DataFrame({"text": ["a", None]}))
    with pytest.raises(Exception) as info:
        nulls.withColumn("pred", bspark.predict_udf(model)("text")).collect()
    assert "has no value, not text" in str(bspark.clear_error(info.value))
