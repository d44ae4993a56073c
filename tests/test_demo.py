"""The main job end to end on the real offline teacher and corpus, with tiny slices."""
import json
import time

import pytest

from bibert.config import ELASTIC_BIBERT
from bibert.demo import Budget, format_table, run_demo
from bibert.errors import BibertError


@pytest.mark.slow
def test_main_job_runs_end_to_end(teacher_dir, tmp_path, capsys):
    summary = run_demo(tmp_path, budget=Budget(96, 1.0, 96, 1.0, 2e-4, 64, 5), threads=2)
    rows = summary["rows"]
    assert [r["bits"] for r in rows] == ["32-32-32", "1-1-1", "1-1-1"]
    assert all(0.0 <= r["test"] <= 1.0 for r in rows)
    # the packed engine computes the student's function
    for split in ("dev", "test"):
        assert summary["packed_vs_student"][split]["agreement"] >= 0.97  # a barely trained model: near-ties in its logits
    assert abs(rows[2]["test"] - rows[1]["test"]) <= 0.01
    assert summary["size_ratio_teacher_vs_packed"] > 15
    assert json.loads((tmp_path / "summary.json").read_text())["rows"][0]["bits"] == "32-32-32"
    assert "packed, bitwise engine" in format_table(summary)
    from bibert.packed import kernels
    from bibert.packed.tuning import cpu_model

    # the summary names the machine that produced its figures
    assert summary["machine"] == {"cpu": cpu_model(), "cores": kernels.default_threads(),
                                  "engine_kernel": kernels.get_kernel(), "engine_threads": 2}
    assert f"machine: {cpu_model()}, " in format_table(summary)
    assert summary["quant"]["activations"] == "elastic"  # the best 1-1-1 recipe by default
    assert summary["quant"]["attention"] == "bi-max"
    config = json.loads((tmp_path / "student" / "config.json").read_text())
    assert (config["pred_weight"], config["precision"]) == (ELASTIC_BIBERT["pred_weight"], ELASTIC_BIBERT["precision"])
    assert summary["student_precision"] in ("fp32", "bf16")  # what "auto" chose on this machine
    lat = summary["latency"]["packed"]
    assert lat["p10_ms"] <= lat["median_ms"] <= lat["p90_ms"] and lat["calls"] == 5 * 5
    # finished stages keep best/ only; every invocation keeps its own summary
    for stage in ("teacher", "student"):
        assert (tmp_path / stage / "best").is_dir()
        assert not (tmp_path / stage / "checkpoint").exists() and not (tmp_path / stage / "last").exists()
    assert len(list(tmp_path.glob("summary-*.md"))) == 1
    # a rerun skips the finished training stages
    time.sleep(1.1)  # a new summary name
    again = run_demo(tmp_path, budget=Budget(96, 1.0, 96, 1.0, 2e-4, 64, 5), threads=2)
    assert again["rows"][1]["test"] == rows[1]["test"]
    assert len(list(tmp_path.glob("summary-*.json"))) == 2
    # a student of another recipe (e.g. from an older version) is not taken for this one
    config["pred_weight"] = 1.0
    (tmp_path / "student" / "config.json").write_text(json.dumps(config))
    with pytest.raises(BibertError, match=r"different options \(pred_weight: 1.0 -> "):
        run_demo(tmp_path, budget=Budget(96, 1.0, 96, 1.0, 2e-4, 64, 5), threads=2)


@pytest.mark.slow
def test_main_job_on_sentence_pairs(teacher_dir, tmp_path):
    summary = run_demo(tmp_path, task="snli", budget=Budget(64, 1.0, 64, 1.0, 2e-4, 32, 3), threads=2)
    assert summary["task"] == "snli" and summary["test_examples"] == 9824  # the official test set, "-" dropped
    assert summary["packed_vs_student"]["test"]["agreement"] >= 0.97
    assert summary["latency"]["packed"]["calls"] == 5 * 3  # pairs encoded together for the latency rounds
    assert format_table(summary).startswith("snli test (9824 examples")


def test_demo_refuses_other_tasks_and_budgets(tmp_path):
    with pytest.raises(BibertError, match="offline corpora rotten_tomatoes or snli, not 'sst2'"):
        run_demo(tmp_path, task="sst2")
    with pytest.raises(BibertError, match="unknown budget 'huge': choose quick, default, full"):
        run_demo(tmp_path, budget="huge")
