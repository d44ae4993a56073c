"""The popcount ceiling of one core, for the benchmarks (engines.py, latency.py): a register-only
XOR + popcount + add loop per kernel family of the packed engine (benchmarks/csrc/popcount_ceiling.c),
built with the system C compiler on first use (into build/benchmarks/, once per version of the
source and compiler; CC picks the compiler) and loaded with ctypes. Not part of the bibert library.

    from roofline import Ceiling, popcount_roofline
    popcount_roofline(1.0)            # binary MACs per second, the active kernel family, one core
    Ceiling("avx2").run(iters)        # one timed run of the loop: binary MACs done
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import time
from pathlib import Path

from bibert.packed import kernels

SOURCE = Path(__file__).resolve().parent / "csrc" / "popcount_ceiling.c"
BUILD = Path(__file__).resolve().parent.parent / "build" / "benchmarks"
FAMILIES = {"portable": 1, "avx512": 2, "avx2": 3}  # the engine's kernel family numbers

_lib = None


def library() -> ctypes.CDLL:
    """The ceiling loops, compiled on first use (and again whenever the source changes)."""
    global _lib
    if _lib is not None:
        return _lib
    compiler = os.environ.get("CC", "cc")
    flags = ["-O3", "-std=gnu11", "-fPIC", "-shared"]
    version = hashlib.sha256(SOURCE.read_bytes() + " ".join([compiler, *flags]).encode()).hexdigest()[:12]
    target = BUILD / f"popcount_ceiling-{version}.so"
    if not target.exists():
        BUILD.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            subprocess.run([compiler, *flags, "-o", str(tmp), str(SOURCE)], check=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            raise RuntimeError(f"cannot build {SOURCE.name} with {compiler!r} ({exc}); set CC to a C compiler") from None
        os.replace(tmp, target)
    lib = ctypes.CDLL(str(target))
    lib.popcount_ceiling.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.POINTER(ctypes.c_int64)]
    lib.popcount_ceiling.restype = ctypes.c_int64
    _lib = lib
    return lib


class Ceiling:
    """One kernel family's ceiling loop (default: the engine's active family)."""

    def __init__(self, family: str | None = None):
        self.family = family or kernels.get_kernel()
        if self.family not in FAMILIES:
            raise ValueError(f"unknown kernel family {self.family!r}")
        if self.family not in kernels.available_kernels():
            raise ValueError(f"this CPU has no {self.family} kernels")
        self._checksum = ctypes.c_int64()
        self.macs_per_iter = self.run(1)

    def run(self, iters: int) -> int:
        """Runs `iters` iterations on this thread: the binary MACs done."""
        macs = library().popcount_ceiling(FAMILIES[self.family], int(iters), ctypes.byref(self._checksum))
        if macs < 0:
            raise ValueError(f"invalid iteration count {iters}")
        return macs


def popcount_roofline(seconds: float = 0.2, family: str | None = None) -> float:
    """Measured XOR + popcount + add ceiling of one core in a kernel family (default: the
    active one), binary MACs per second: the best of the timed runs within `seconds`."""
    ceiling = Ceiling(family)
    iters, best = 1 << 16, 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t = time.perf_counter()
        macs = ceiling.run(iters)
        dt = time.perf_counter() - t
        if dt < 0.005:
            iters *= 2
            continue
        best = max(best, macs / dt)
    return best
