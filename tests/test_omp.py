"""The OpenMP wait policy bibert chooses before torch loads (bibert._omp): a short spin where
no other task is running, passive waiting where one is or the system does not say, and
whatever the user set kept as it is."""
import os
import sys

import pytest

from bibert import _omp


@pytest.mark.parametrize("environ, others, expected", [
    ({}, 0, {"GOMP_SPINCOUNT": str(_omp.SPIN_ROUNDS)}),
    ({}, 1, {"OMP_WAIT_POLICY": "PASSIVE"}),
    ({}, 8, {"OMP_WAIT_POLICY": "PASSIVE"}),
    ({}, None, {"OMP_WAIT_POLICY": "PASSIVE"}),
    ({"OMP_WAIT_POLICY": "ACTIVE"}, 0, {}),
    ({"OMP_WAIT_POLICY": "ACTIVE"}, 9, {}),
    ({"GOMP_SPINCOUNT": "0"}, 9, {}),
])
def test_wait_policy(environ, others, expected):
    assert _omp.wait_policy(environ, others) == expected


def test_the_run_queue_is_read_less_this_process(monkeypatch, tmp_path):
    reads = iter(["0.50 0.40 0.30 3/120 999\n", "0.50 0.40 0.30 1/120 999\n", "0.50 0.40 0.30 2/120 999\n"])
    real_open = open

    def fake_open(path, *a, **kw):
        if path == "/proc/loadavg":
            f = tmp_path / "loadavg"
            f.write_text(next(reads))
            return real_open(f, *a, **kw)
        return real_open(path, *a, **kw)

    monkeypatch.setattr("builtins.open", fake_open)
    assert _omp.others_running() == 0  # 3 runnable, then 1 (this process alone): idle


def test_the_run_queue_sampling_stops_at_the_first_idle_read(monkeypatch, tmp_path):
    reads = ["0.50 0.40 0.30 1/120 999\n", "0.50 0.40 0.30 3/120 999\n"]
    real_open = open
    sleeps = []

    def fake_open(path, *a, **kw):
        if path == "/proc/loadavg":
            f = tmp_path / "loadavg"
            f.write_text(reads.pop(0))
            return real_open(f, *a, **kw)
        return real_open(path, *a, **kw)

    monkeypatch.setattr("builtins.open", fake_open)
    monkeypatch.setattr("time.sleep", sleeps.append)
    assert _omp.others_running() == 0 and sleeps == [] and len(reads) == 1  # one read, no sleep


def test_apply_sets_the_policy_once_and_keeps_the_users(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch", raising=False)  # as in a process that has not loaded torch yet
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.setattr(_omp, "others_running", lambda: 2)
    _omp.apply()
    assert os.environ.get("OMP_WAIT_POLICY") == "PASSIVE" and "GOMP_SPINCOUNT" not in os.environ
    monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.setattr(_omp, "others_running", lambda: 0)
    _omp.apply()
    assert os.environ.get("GOMP_SPINCOUNT") == str(_omp.SPIN_ROUNDS) and "OMP_WAIT_POLICY" not in os.environ
    monkeypatch.setenv("GOMP_SPINCOUNT", "7")
    monkeypatch.setattr(_omp, "others_running", lambda: 5)
    _omp.apply()
    assert os.environ["GOMP_SPINCOUNT"] == "7" and "OMP_WAIT_POLICY" not in os.environ


def test_apply_reads_nothing_once_torch_is_loaded(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.setitem(sys.modules, "torch", object())

    def read():
        raise AssertionError("the run queue was read after torch loaded")

    monkeypatch.setattr(_omp, "others_running", read)
    _omp.apply()
    assert "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ
