"""bibert.BatchPredictor: picklable (path and options only, the model loaded lazily in the
calling process), and row for row the labels and probabilities of `bibert predict --file`."""
from __future__ import annotations

import csv
import pickle

import pytest

pd = pytest.importorskip("pandas")

import bibert  # noqa: E402
from bibert import BibertError  # noqa: E402
from bibert.packed import export_packed  # noqa: E402
from bibert.serving import predict_file  # noqa: E402
from test_batch_predict import TEXTS, rows, write_csv  # noqa: E402
from test_packed import make_student  # noqa: E402


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("predictor")
    _, folder = make_student(tmp)
    out = tmp / "tiny.bibert"
    export_packed(folder, out)
    return out


def test_pickles_without_the_model_and_loads_it_lazily(model_file):
    predictor = bibert.BatchPredictor(model_file, threads=1, max_length=16, text_columns="text")
    assert predictor._engine is None
    frame = pd.DataFrame({"text": TEXTS})
    first = predictor(frame)
    assert predictor._engine is not None
    copy = pickle.loads(pickle.dumps(predictor))
    assert copy._engine is None and copy.model == str(model_file) and copy.max_length == 16
    pd.testing.assert_frame_equal(copy(frame), first)


@pytest.mark.parametrize("pairs", [False, True])
def test_frame_equals_predict_file_row_for_row(model_file, tmp_path, pairs):
    data = rows(40)
    src = tmp_path / "in.csv"
    write_csv(src, data)
    out = tmp_path / "out.csv"
    predict_file(model_file, src, out, "text", "pair" if pairs else None, progress=False, window=7, max_length=12)
    with open(out, newline="", encoding="utf-8") as f:
        expected = list(csv.DictReader(f))
    frame = pd.read_csv(src, keep_default_na=False, dtype=str)
    columns = ["text", "pair"] if pairs else "text"
    scored = bibert.BatchPredictor(model_file, max_length=12, text_columns=columns, batch_size=5)(frame)
    assert list(scored.columns) == list(expected[0].keys())
    assert len(scored) == len(expected)
    for got, want in zip(scored.to_dict("records"), expected):
        assert got["pred_label"] == want["pred_label"]
        for key in want:
            if key.startswith("prob_"):
                assert got[key] == float(want[key]), key
            else:
                assert str(got[key]) == want[key], key


def test_bad_input_is_one_clear_error(model_file, tmp_path):
    predictor = bibert.BatchPredictor(model_file, text_columns="review")
    with pytest.raises(BibertError, match="no column 'review'"):
        predictor(pd.DataFrame({"text": ["a"]}))
    with pytest.raises(BibertError, match="column 'text' has no value"):
        bibert.BatchPredictor(model_file)(pd.DataFrame({"text": ["a", None]}))
    with pytest.raises(BibertError, match="does not exist"):
        bibert.BatchPredictor(tmp_path / "missing.bibert")(pd.DataFrame({"text": ["a"]}))
    with pytest.raises(BibertError, match="text_columns"):
        bibert.BatchPredictor(model_file, text_columns=["a", "b", "c"])
    empty = bibert.BatchPredictor(model_file)(pd.DataFrame({"text": pd.Series([], dtype=object)}))
    assert len(empty) == 0 and "pred_label" in empty.columns
