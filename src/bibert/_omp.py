"""How PyTorch's OpenMP threads wait between parallel regions, chosen before torch loads.

libgomp's threads spin while they wait (about 300,000 rounds) before they sleep. On an idle
machine the spinning is what makes a second thread pay: a 2-thread Elastic BiBERT step took
0.62 s on the clock spinning, 0.64 s with a spin of 100,000 rounds, and 0.83 s with passive
waiting, against 0.87 s on one thread (AMD EPYC, 2 cores; benchmarks/train_threads.py). On
a machine that other jobs share, spinning threads take the cores those jobs need: beside 8
other jobs a 2-thread step burnt 21 CPU seconds spinning instead of 1.2 passively
(benchmarks/shared_step.py). So: a short spin where no other task is running when bibert is
imported, passive waiting where one is. A policy or spin count the user set is kept, and
nothing is read where torch is already loaded (its OpenMP runtime has read the variables).
"""
from __future__ import annotations

import os
import sys

SPIN_ROUNDS = 100_000  # GOMP_SPINCOUNT on an idle machine: most of the spinning's gain, a third of its rounds
SAMPLES = 3  # reads of the run queue, 5 ms apart; the smallest counts (a passing process is not a busy machine)


def user_chose(environ) -> bool:
    return "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ


def wait_policy(environ, others_running: int | None) -> dict[str, str]:
    """The OpenMP variables to set, given the environment and how many tasks besides this one
    are running or waiting for a core (None: unknown, counted as busy)."""
    if user_chose(environ):
        return {}
    if others_running == 0:
        return {"GOMP_SPINCOUNT": str(SPIN_ROUNDS)}
    return {"OMP_WAIT_POLICY": "PASSIVE"}


def others_running() -> int | None:
    """Runnable tasks besides this one now (Linux: /proc/loadavg's run queue, at the least of a
    few reads), or None where the system does not say. The load average would not do: it is a
    minute's average, so a job that has just ended still counts. A read that finds no other
    task ends the sampling: on an idle machine this costs one read, not the 10 ms of sleeps."""
    import time

    least = None
    for i in range(SAMPLES):
        try:
            with open("/proc/loadavg") as fh:
                count = max(0, int(fh.read().split()[3].split("/")[0]) - 1)  # less this process
        except (OSError, ValueError, IndexError):
            return None
        least = count if least is None else min(least, count)
        if least == 0:
            break
        if i + 1 < SAMPLES:
            time.sleep(0.005)
    return least


def apply() -> None:
    if user_chose(os.environ) or "torch" in sys.modules:
        return
    for key, value in wait_policy(os.environ, others_running()).items():
        os.environ.setdefault(key, value)
