"""Ray Data: bibert.integrations.ray.predict and `bibert predict --file ... --ray` give the
labels and probabilities of `bibert predict --file`, row for row, on one local Ray with 2
CPUs for the whole module; bad inputs give one clear error."""
from __future__ import annotations

import os
import warnings

import pytest

pd = pytest.importorskip("pandas")
ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'bibert[ray]'")
pytest.importorskip("ray.data")

from bibert import BibertError  # noqa: E402
from bibert.cli import main  # noqa: E402
from bibert.integrations import ModelInfo  # noqa: E402
from bibert.integrations import ray as bray  # noqa: E402
from scale_util import MAX_LENGTH, ROWS, assert_same, make_csv, make_model, make_rows, reference  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = True
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ray")
    model = make_model(tmp)
    src = make_csv(tmp / "in.csv")
    return model, src, reference(model, src, tmp / "ref.csv")


def records(path):
    return pd.read_parquet(path).to_dict("records")


def test_cli_scores_a_20000_row_csv_as_predict_file_does(local_ray, data, tmp_path, capsys):
    model, src, want = data
    out = tmp_path / "out.parquet"
    assert main(["predict", "--model", str(model), "--file", str(src), "--out", str(out), "--text-column", "text",
                 "--max-length", str(MAX_LENGTH), "--ray", "--workers", "2", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {ROWS} rows" in printed and "2 workers x 1 threads" in printed
    got = records(out)
    assert list(pd.read_parquet(out).columns) == list(want[0].keys())
    assert_same(got, want)
    assert [g["text"] for g in got] == [w["text"] for w in want]  # CSV cells kept as text, empty ones too


def test_api_pairs_from_a_dataframe(local_ray, data, tmp_path):
    model, _, _ = data
    src = make_csv(tmp_path / "pairs.csv", 3000)
    want = reference(model, src, tmp_path / "ref.csv", pair="pair")
    frame = pd.read_csv(src, dtype=str, keep_default_na=False)
    ds = ray.data.from_pandas([frame.iloc[i:i + 700] for i in range(0, len(frame), 700)])  # several blocks
    scored = bray.predict(ds, model, workers=2, batch_size=500, text_columns=["text", "pair"],
                          max_length=MAX_LENGTH)
    got = sorted(scored.to_pandas().to_dict("records"), key=lambda r: int(r["id"][1:]))
    assert_same(got, want)


def test_cli_takes_a_folder_or_glob_of_parquet_and_jsonl(local_ray, data, tmp_path):
    model, _, _ = data
    folder = tmp_path / "parts"
    folder.mkdir()
    parts = [make_rows(700, 0), make_rows(500, 700)]
    for i, part in enumerate(parts):
        pd.DataFrame(part).to_parquet(folder / f"part-{i}.parquet")
        pd.DataFrame(part).to_json(folder / f"part-{i}.jsonl", orient="records", lines=True, force_ascii=False)
    make_csv(tmp_path / "all.csv", 1200)
    want = reference(model, tmp_path / "all.csv", tmp_path / "ref.csv", pair="pair")
    for spec in (str(folder / "*.parquet"), str(folder / "*.jsonl")):
        out = tmp_path / "out.parquet"
        assert main(["predict", "--model", str(model), "--file", spec, "--out", str(out), "--text-column", "text",
                     "--text-pair-column", "pair", "--max-length", str(MAX_LENGTH), "--ray", "--no-progress",
                     "--overwrite"]) == 0
        assert_same(records(out), want)
    mixed = tmp_path / "mixed"
    with pytest.raises(BibertError, match="mixes formats"):
        bray.input_files(str(folder))
    mixed.mkdir()
    with pytest.raises(BibertError, match="holds no"):
        bray.input_files(str(mixed))


def test_bad_inputs_give_one_clear_error(local_ray, data, tmp_path, capsys):
    model, src, _ = data
    out = tmp_path / "out.parquet"
    base = ["predict", "--file", str(src), "--out", str(out), "--ray", "--no-progress"]
    # checked on the driver, before any worker starts
    assert main(base + ["--model", str(model), "--text-column", "review"]) == 2
    assert "has no column 'review'" in capsys.readouterr().err
    assert main(base + ["--model", str(tmp_path / "missing.bibert"), "--text-column", "text"]) == 2
    err = capsys.readouterr().err
    assert "missing.bibert does not exist" in err and err.count("\n") == 1
    assert main(base + ["--model", str(model), "--text-column", "text", "--workers", "3", "--threads", "1"]) == 2
    assert "need 3 CPUs" in capsys.readouterr().err
    with pytest.raises(BibertError, match="does not exist"):
        bray.predict(ray.data.from_items([{"text": "a"}]), tmp_path / "missing.bibert")
    with pytest.raises(BibertError, match="no column 'review'"):
        bray.predict(ray.data.from_pandas(pd.DataFrame({"text": ["a"]})), model, text_columns="review")
    assert not out.exists()


@pytest.mark.parametrize("raised, expected", [
    (ConnectionError("Failed to connect to Ray cluster at 10.0.0.9:6390"), "check that the cluster is up"),
    (RuntimeError("Failed to connect to GCS. ray.exceptions.AuthenticationError: RPC error: InvalidAuthToken"),
     "RAY_AUTH_MODE=token"),
])
def test_an_address_that_cannot_be_joined_is_one_error(data, tmp_path, capsys, monkeypatch, raised, expected):
    # what ray.init raises (Ray 2.x) for an address where no cluster answers, or one that asks for a token
    model, src, _ = data

    def init(address=None, **kwargs):
        assert address == "10.0.0.9:6390"
        raise raised

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    out = tmp_path / "out.parquet"
    assert main(["predict", "--model", str(model), "--file", str(src), "--out", str(out), "--text-column", "text",
                 "--ray", "10.0.0.9:6390", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "could not connect to the Ray cluster at 10.0.0.9:6390" in err and expected in err, err
    assert "Traceback" not in err and err.count("\n") == 1 and not out.exists()


def test_a_worker_that_cannot_load_the_model_is_one_error(local_ray, data, tmp_path, capsys, monkeypatch):
    model, src, _ = data
    gone = ModelInfo(str(tmp_path / "only-on-the-driver.bibert"), ("a", "b", "c"), 3)
    ds = ray.data.from_pandas(pd.DataFrame({"text": ["a", "b"]}))
    with pytest.raises(Exception) as info:
        bray._map(ds, gone, workers=1, batch_size=8, threads_per_worker=1, text_columns="text", max_length=None,
                  forward_batch=8, kernel=None).take_all()
    err = bray.clear_error(info.value)
    assert err is not None and "a Ray worker on" in str(err) and "could not load the packed model" in str(err)
    monkeypatch.setattr(bray, "check_model", lambda model: gone)  # the file is missing where the workers run
    out = tmp_path / "out.parquet"
    assert main(["predict", "--model", str(model), "--file", str(src), "--out", str(out), "--text-column", "text",
                 "--ray", "--no-progress", "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert "could not load the packed model" in err and "Traceback" not in err, err
    assert not out.exists() and not os.path.exists(str(out) + ".partial")
