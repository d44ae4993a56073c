"""Per-host tuning of the native kernels: a short measurement at first load, cached per CPU.

The binary Linear can walk its tiles in several ways (rows per micro-tile, rows per chunk
kept in L1, the order of the float-output tiles; `kernels.set_tuning`). Every way computes
each output with the same code, so the results never change; which is fastest depends on the
CPU (its caches, its vector units), and kernels tuned on one host lose ground on another.

`tune_host` times the candidates on the model's own Linear shapes for the active kernel
family and keeps the fastest when it beats the default by a clear margin (on a busy machine
a small difference is noise). The choice is stored in a JSON file (BIBERT_CACHE_DIR, default
~/.cache/bibert/tuning.json) under the CPU model, the kernel family and the native library,
so that later loads on the same CPU reuse it (the sizes of the model are part of the key). BIBERT_TUNE=0 keeps the defaults (and measures
nothing), BIBERT_TUNE=1 measures again.
"""
from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from . import kernels

DEFAULT = (6, 16384, 0)  # mr, chunk_bytes, float_order
CANDIDATES = [(mr, chunk, order) for mr in (6, 5, 4, 3) for chunk in (8192, 16384, 32768) for order in (0, 1)]
MARGIN = 0.03  # a candidate must beat the default by this share to replace it
ROWS = 128     # rows of the timed Linears (a sequence of 128 tokens)


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo; the platform's processor string elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cache_path() -> Path:
    base = os.environ.get("BIBERT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "bibert")
    return Path(base) / "tuning.json"


def _key(family: str, hidden: int, intermediate: int) -> str:
    lib = kernels._library_path()
    try:
        stamp = int(lib.stat().st_mtime)
    except OSError:
        stamp = 0
    return f"{cpu_model()} | {family} | {hidden}x{intermediate} | abi {kernels.ABI_VERSION} | {lib} @ {stamp}"


def _read_cache() -> dict:
    try:
        data = json.loads(cache_path().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(data: dict) -> None:
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tuning.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: tune again next time


def _valid(entry) -> bool:
    return (isinstance(entry, list) and len(entry) == 3 and all(type(v) is int for v in entry)
            and 1 <= entry[0] <= 6 and 64 <= entry[1] <= 1 << 30 and entry[2] in (0, 1))


def time_candidates(shapes: list[tuple[int, int, bool]], candidates=CANDIDATES, rounds: int = 5) -> dict:
    """Best-of-`rounds` seconds of the Linears `shapes` ((K, N, bit output) at ROWS rows), one
    thread, per candidate tuning of the active kernel family, interleaved round by round."""
    family = kernels.get_kernel()
    rng = np.random.default_rng(0)
    calls, keep = [], []
    lib = kernels.lib()
    for K, N, bits in shapes:
        a = kernels.pack_bool(rng.random((ROWS, K)) < 0.5)
        panels = kernels.pack_panels(kernels.pack_bool(rng.random((N, K)) < 0.5))
        alpha, bias = rng.random(N).astype(np.float32), rng.standard_normal(N).astype(np.float32)
        thr, flip = kernels.bit_thresholds(alpha, bias, K)
        c0, c1 = kernels.float_epilogue(alpha, bias, K)
        if bits:
            out = np.empty((ROWS, kernels.words(N)), np.uint64)
            tail = (None, None, None, None, out.ctypes.data, out.shape[1], thr.ctypes.data, flip.ctypes.data)
        else:
            res, out = rng.standard_normal((ROWS, N)).astype(np.float32), np.empty((ROWS, N), np.float32)
            tail = (c0.ctypes.data, c1.ctypes.data, res.ctypes.data, out.ctypes.data, None, 0, None, None)
            keep.append(res)
        keep += [a, panels, thr, flip, c0, c1, out]
        calls.append((a.ctypes.data, ROWS, a.shape[1], K, panels.ctypes.data, N) + tail)
    saved_threads, saved = kernels.get_threads(), kernels.get_tuning(family)
    best = {c: [float("inf")] * len(calls) for c in candidates}
    try:
        kernels.set_threads(1)
        for _ in range(rounds):
            for c in candidates:
                kernels.set_tuning(family, *c)
                for i, args in enumerate(calls):
                    t = time.perf_counter()
                    lib.bb_linear(*args)
                    best[c][i] = min(best[c][i], time.perf_counter() - t)
    finally:
        kernels.set_tuning(family, *saved)
        kernels.set_threads(saved_threads)
    return {c: sum(v) for c, v in best.items()}


def tune_host(hidden: int, intermediate: int, force: bool | None = None) -> tuple[int, int, int]:
    """The tuning of the active kernel family for this CPU: from the cache, or measured on the
    Linear shapes of a model with these sizes (and cached). Applies it and returns it."""
    family = kernels.get_kernel()
    mode = os.environ.get("BIBERT_TUNE", "")
    if mode == "0":
        kernels.set_tuning(family, *DEFAULT)
        return DEFAULT
    force = mode == "1" if force is None else force
    cache, key = _read_cache(), _key(family, hidden, intermediate)
    if not force and _valid(cache.get(key)):
        choice = tuple(cache[key])
    else:
        H, I = hidden, intermediate
        times = time_candidates([(H, 3 * H, True), (H, H, False), (H, I, True), (I, H, False)])
        fastest = min(times, key=times.get)
        choice = fastest if times[fastest] < (1 - MARGIN) * times[DEFAULT] else DEFAULT
        cache[key] = list(choice)
        _write_cache(cache)
    kernels.set_tuning(family, *choice)
    return choice
