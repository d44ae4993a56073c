"""Each native kernel against a naive NumPy reference, on every kernel family; the C interface
(bitkernels.h) against the ctypes declarations (the C sources themselves: test_csrc.py)."""
from __future__ import annotations

import ctypes
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bibert.errors import BibertError
from bibert.packed import kernels, reference

PATHS = kernels.available_kernels()  # portable, plus avx2 / avx512 where this CPU has them



def signs_to_bits(s: np.ndarray) -> np.ndarray:
    return kernels.pack_bool(s < 0)


def random_floats(rng, *shape):
    x = rng.standard_normal(shape).astype(np.float32)
    x.flat[:: max(1, x.size // 7)] = 0.0  # zeros and negative zeros must pack as +1
    x.flat[1 :: max(1, x.size // 5)] = -0.0
    return x


@pytest.mark.parametrize("M,K", [(1, 1), (3, 63), (5, 64), (7, 65), (2, 100), (13, 768), (4, 1000)])
def test_sign_pack(path, M, K):
    x = random_floats(np.random.default_rng(K), M, K)
    bits = kernels.sign_pack(x)
    np.testing.assert_array_equal(bits, signs_to_bits(reference.sign(x)))
    assert bits.shape == (M, kernels.words(K))


@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (5, 63, 31), (6, 64, 32), (7, 65, 33), (13, 130, 70),
                                   (12, 768, 96), (3, 200, 64)])
@pytest.mark.parametrize("mode", ["float", "residual", "bits"])
def test_binary_linear(path, M, K, N, mode):
    rng = np.random.default_rng(M * 1000 + K + N)
    x = random_floats(rng, M, K)
    w = rng.standard_normal((N, K)).astype(np.float32)
    alpha, ws = reference.binarize_rows(w)
    bias = rng.standard_normal(N).astype(np.float32) * 3
    residual = rng.standard_normal((M, N)).astype(np.float32) if mode == "residual" else None
    expected = reference.binary_linear(reference.sign(x), ws, alpha, bias, residual)
    panels = kernels.pack_panels(signs_to_bits(ws))
    xb = kernels.sign_pack(x)
    if mode == "bits":
        got = kernels.binary_linear(xb, K, panels, N, alpha, bias, out_bits=True)
        np.testing.assert_array_equal(got, signs_to_bits(reference.sign(expected)))
    else:
        got = kernels.binary_linear(xb, K, panels, N, alpha, bias, residual)
        # evaluated as c0 + c1 * popcount: equal to rounding
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def thresholds_for(rng, x: np.ndarray) -> np.ndarray:
    """Per-channel thresholds for x [M, K]: random, some equal to a value of their channel
    (x == t gives +1), one infinite and one NaN (compared as the student does: !(x - t >= 0))."""
    t = rng.standard_normal(x.shape[1]).astype(np.float32)
    rows = rng.integers(0, x.shape[0], x.shape[1])
    t[::3] = x[rows[::3], np.arange(x.shape[1])[::3]]
    if x.shape[1] > 5:
        t[4], t[5] = np.inf, np.nan
    return t


def threshold_bits(x: np.ndarray, t: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return kernels.pack_bool(~(np.float32(x) - np.float32(t) >= 0))


@pytest.mark.parametrize("M,K", [(1, 1), (3, 63), (7, 65), (2, 100), (13, 768)])
def test_sign_pack_with_thresholds(path, M, K):
    rng = np.random.default_rng(K + 1)
    x = random_floats(rng, M, K)
    t = thresholds_for(rng, x)
    np.testing.assert_array_equal(kernels.sign_pack(x, t), threshold_bits(x, t))
    np.testing.assert_array_equal(kernels.sign_pack(x, np.zeros(K, np.float32)), kernels.sign_pack(x))


@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (5, 63, 31), (7, 65, 33), (13, 130, 70), (12, 768, 96)])
def test_binary_linear_bits_against_compare_values(path, M, K, N):
    """The bit epilogue's integer thresholds with a per-channel compare value t (the next
    quantizer's threshold): bit = !(fl(fl(alpha (K - 2p)) + b) - t >= 0), exactly."""
    rng = np.random.default_rng(M + K + N)
    x = random_floats(rng, M, K)
    alpha, ws = reference.binarize_rows(rng.standard_normal((N, K)).astype(np.float32))
    alpha = alpha * np.where(rng.random(N) < 0.2, -1, 1).astype(np.float32)  # a negative scale folded in
    bias = rng.standard_normal(N).astype(np.float32)
    y = reference.binary_linear(reference.sign(x), ws, alpha, bias)
    t = thresholds_for(rng, y)
    panels = kernels.pack_panels(signs_to_bits(ws))
    thr = kernels.bit_thresholds(alpha, bias, K, compare=t)
    got = kernels.binary_linear(kernels.sign_pack(x), K, panels, N, alpha, bias, out_bits=True, thresholds=thr)
    np.testing.assert_array_equal(got, threshold_bits(y, t))


@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (5, 63, 31), (7, 65, 33), (12, 768, 96), (3, 200, 64)])
def test_binary_linear_on_zero_one_levels(path, M, K, N):
    """{0, 1} levels z (bit 1 = level 0): z . w = offset - popcount; with unit alpha and zero
    bias the float output is that integer exactly."""
    rng = np.random.default_rng(M * K + N)
    z = (rng.random((M, K)) < 0.4).astype(np.int64)
    _, ws = reference.binarize_rows(rng.standard_normal((N, K)).astype(np.float32))
    wbits = signs_to_bits(ws)
    offset = kernels.zero_one_offsets(wbits, K)
    np.testing.assert_array_equal(offset, (K + ws.sum(axis=1)) // 2)
    ones, zeros = np.ones(N, np.float32), np.zeros(N, np.float32)
    epi = kernels.float_epilogue(ones, zeros, K, offset)
    got = kernels.binary_linear(kernels.pack_bool(z == 0), K, kernels.pack_panels(wbits), N, ones, zeros,
                                epilogue=epi)
    np.testing.assert_array_equal(got, (z @ ws.T).astype(np.float32))
    alpha, bias = rng.random(N).astype(np.float32), rng.standard_normal(N).astype(np.float32)
    y = kernels.binary_linear(kernels.pack_bool(z == 0), K, kernels.pack_panels(wbits), N, alpha, bias,
                              epilogue=kernels.float_epilogue(alpha, bias, K, offset))
    want = (z @ ws.T).astype(np.float32) * alpha + bias
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    with pytest.raises(BibertError):
        kernels.float_epilogue(ones, zeros, K, offset + K + 1)  # an offset past K


@pytest.mark.parametrize("M,H", [(1, 1), (3, 17), (5, 64), (4, 100), (9, 768)])
def test_layernorm(path, M, H):
    rng = np.random.default_rng(H)
    x = rng.standard_normal((M, H)).astype(np.float32) * 4 + 1
    g, b = rng.standard_normal(H).astype(np.float32), rng.standard_normal(H).astype(np.float32)
    out, bits = kernels.layernorm(x, g, b, 1e-12, with_bits=True)
    np.testing.assert_allclose(out, reference.layernorm(x, g, b, 1e-12), rtol=2e-5, atol=2e-5)
    np.testing.assert_array_equal(bits, signs_to_bits(reference.sign(out)))
    t = thresholds_for(rng, out)
    out_t, bits_t = kernels.layernorm(x, g, b, 1e-12, with_bits=True, thresholds=t)
    np.testing.assert_array_equal(out_t, out)
    np.testing.assert_array_equal(bits_t, threshold_bits(out, t))


@pytest.mark.parametrize("B,L,heads,d", [(1, 1, 1, 1), (2, 7, 3, 5), (1, 64, 2, 64), (2, 70, 4, 32),
                                         (3, 33, 2, 100), (1, 130, 12, 64), (2, 90, 3, 128)])
def test_biattention(path, B, L, heads, d):
    rng = np.random.default_rng(B * L * heads * d)
    hidden = heads * d
    q, k, v = (random_floats(rng, B, L, hidden) for _ in range(3))
    lengths = rng.integers(1, L + 1, size=B)
    lengths[0] = L
    valid = np.arange(L)[None, :] < lengths[:, None]
    expected = reference.biattention_counts(q, k, v, valid, heads).reshape(B * L, hidden)
    # Q, K, V side by side in one bit row, as the fused QKV Linear writes them
    qkv = kernels.pack_bool(np.concatenate([q, k, v], axis=2).reshape(B * L, 3 * hidden) < 0)
    bits, counts = kernels.biattention(qkv, (0, hidden, 2 * hidden), B, L, heads, d, valid, counts=True)
    np.testing.assert_array_equal(counts, expected)
    np.testing.assert_array_equal(bits, signs_to_bits(reference.sign(expected)))
    # thresholds on the counts (elastic): integers, halves, values the counts take
    t = rng.choice(np.array([-2, -1, 0, 1, 2, 0.5, -1.5, 1e9, -np.inf], np.float32), hidden)
    bits_t = kernels.biattention(qkv, (0, hidden, 2 * hidden), B, L, heads, d, valid, thresholds=t)
    np.testing.assert_array_equal(bits_t, threshold_bits(expected.astype(np.float32), t))
    # per-head score thresholds (elastic Bi-Attention): BA = 1[(q . k) / sqrt(d) - t_h > 0] in float32
    exact = np.float32(d - 2 * rng.integers(0, d + 1)) / np.float32(np.sqrt(np.float64(d)))
    t_h = np.array([exact, 0.0, -0.3, 1.7, np.inf, -np.inf, np.nan][:heads] + [0.25] * max(0, heads - 7), np.float32)
    lim = kernels.score_limits(t_h, d)
    _, counts_h = kernels.biattention(qkv, (0, hidden, 2 * hidden), B, L, heads, d, valid, counts=True,
                                      score_limits=lim)
    split = lambda a: reference.sign(a).reshape(B, L, heads, d).transpose(0, 2, 1, 3)
    dots = (split(q) @ split(k).transpose(0, 1, 3, 2)).astype(np.float32) / np.float32(np.sqrt(np.float64(d)))
    with np.errstate(invalid="ignore"):
        ba = ((dots - t_h[None, :, None, None]) > 0) & valid[:, None, None, :]
    want = (ba.astype(np.int64) @ split(v)).transpose(0, 2, 1, 3).reshape(B * L, hidden)
    np.testing.assert_array_equal(counts_h, want)
    np.testing.assert_array_equal(kernels.score_limits(np.zeros(heads, np.float32), d), np.full(heads, (d + 1) // 2))


def random_count_minima(rng, heads: int, d: int) -> np.ndarray:
    """Valid relative tables [heads, d + 1] (column j for the row maximum c_max = 2j - d): per
    head the best key only, every key, nothing, or the keys within a random number of steps
    of c_max (at least -d)."""
    c_max = np.arange(-d, d + 1, 2)
    table = np.empty((heads, d + 1), np.int64)
    for h in range(heads):
        kind = ("best", "all", "none", "steps")[h % 4] if h < 4 else "steps"
        if kind == "best":
            table[h] = c_max
        elif kind == "all":
            table[h] = -d
        elif kind == "none":
            table[h] = d + 2
        else:
            table[h] = np.maximum(c_max - 2 * int(rng.integers(0, d + 1)), -d)
    return table


@pytest.mark.parametrize("B,L,heads,d", [(1, 1, 1, 1), (2, 7, 5, 5), (1, 64, 2, 64), (3, 70, 4, 32),
                                         (3, 33, 2, 100), (2, 130, 6, 64), (3, 9, 1, 70000)])
def test_biattention_relative(path, B, L, heads, d):
    """Bi-Attention relative to each query's best real key: BA_ij = 1[c_ij >= c_min[h][c_max_i]]
    for the integer c = q . k and c_max_i the largest over row i's real keys; a sequence with no
    real key attends to nothing."""
    rng = np.random.default_rng(B * L * heads * d + 1)
    hidden = heads * d
    q, k, v = (random_floats(rng, B, L, hidden) for _ in range(3))
    lengths = rng.integers(1, L + 1, size=B)
    lengths[0] = L
    if B > 2:
        lengths[2] = 0  # no real key at all
    valid = np.arange(L)[None, :] < lengths[:, None]
    if B > 1 and L > 8:
        valid[1, [0, 3, 4]] = False  # holes, the first position among them
    table = random_count_minima(rng, heads, d)
    qkv = kernels.pack_bool(np.concatenate([q, k, v], axis=2).reshape(B * L, 3 * hidden) < 0)
    t = rng.choice(np.array([-2, -1, 0, 1, 0.5, 1e9], np.float32), hidden)
    bits, counts = kernels.biattention(qkv, (0, hidden, 2 * hidden), B, L, heads, d, valid, counts=True,
                                       thresholds=t, relative=kernels.relative_limits(table, d))
    split = lambda a: reference.sign(a).reshape(B, L, heads, d).transpose(0, 2, 1, 3)
    dots = split(q) @ split(k).transpose(0, 1, 3, 2)  # (B, heads, L, L) integers
    c_max = np.where(valid[:, None, None, :], dots, -d - 1).max(axis=-1)  # -d - 1: no real key
    lowest = np.where(c_max >= -d, table[np.arange(heads)[None, :, None], (np.maximum(c_max, -d) + d) // 2], d + 3)
    ba = (dots >= lowest[..., None]) & valid[:, None, None, :]
    want = (ba.astype(np.int64) @ split(v)).transpose(0, 2, 1, 3).reshape(B * L, hidden)
    np.testing.assert_array_equal(counts, want)
    np.testing.assert_array_equal(bits, threshold_bits(want.astype(np.float32), t))
    # the absolute limits and the relative table together are refused
    with pytest.raises(BibertError, match="not both"):
        kernels.biattention(qkv, (0, hidden, 2 * hidden), B, L, heads, d, valid,
                            score_limits=np.zeros(heads, np.int64), relative=kernels.relative_limits(table, d))


def test_relative_limits_of_a_table():
    """c >= c_min <=> popcount <= (d - c_min) / 2, indexed by the row's smallest popcount."""
    d = 6
    table = np.array([[-6, -4, -2, 0, 2, 4, 6], [-6] * 7, [8] * 7, [-6, -6, -6, -4, -4, -2, 0]])
    lim = kernels.relative_limits(table, d)
    for h in range(4):
        for p_min in range(d + 1):
            c_min = table[h, d - p_min]  # c_max = d - 2 p_min: column (c_max + d) / 2
            assert all((p < lim[h, p_min]) == (d - 2 * p >= c_min) for p in range(d + 1))
    assert lim.dtype == np.int64 and lim.min() >= 0 and lim.max() <= d + 1
    for bad in (table[:, :-1], table.astype(np.float32), np.full((1, 7), 7), np.full((1, 7), -8), np.full((1, 7), 10)):
        with pytest.raises(BibertError, match="relative_limits"):
            kernels.relative_limits(bad, d)


def test_embed(path):
    rng = np.random.default_rng(0)
    V, H, P, T, B, L = 50, 70, 16, 2, 3, 9
    table = rng.standard_normal((V, H)).astype(np.float32)
    alpha, s = reference.binarize_rows(table)
    pos, typ = rng.standard_normal((P, H)).astype(np.float32), rng.standard_normal((T, H)).astype(np.float32)
    ids, tt = rng.integers(0, V, (B, L)), rng.integers(0, T, (B, L))
    got = kernels.embed(ids, tt, signs_to_bits(s), alpha, pos, typ)
    expected = (alpha[ids][..., None] * s[ids] + typ[tt]) + pos[:L][None]
    np.testing.assert_allclose(got, expected.reshape(B * L, H).astype(np.float32), rtol=1e-6, atol=1e-6)


def test_paths_agree_bit_for_bit():
    if len(PATHS) < 2:
        pytest.skip("this CPU has only the portable path")
    rng = np.random.default_rng(1)
    x, w = random_floats(rng, 11, 300), rng.standard_normal((77, 300)).astype(np.float32)
    alpha, ws = reference.binarize_rows(w)
    bias = rng.standard_normal(77).astype(np.float32)
    panels = kernels.pack_panels(signs_to_bits(ws))
    results = []
    for name in PATHS:
        kernels.set_kernel(name)
        y = kernels.binary_linear(kernels.sign_pack(x), 300, panels, 77, alpha, bias)
        results.append(kernels.layernorm(y, np.ones(77, np.float32), np.zeros(77, np.float32), 1e-12))
    kernels.set_kernel("auto")
    for other in results[1:]:
        np.testing.assert_array_equal(results[0], other)


@pytest.mark.parametrize("M,H", [(19, 80), (17, 768)])
def test_layernorm_paths_agree_bit_for_bit(M, H):
    """Every family's LayerNorm (8 rows at a time where H is a multiple of 16, then 4, then 1)
    gives the same floats and bits, with and without thresholds."""
    if len(PATHS) < 2:
        pytest.skip("this CPU has only the portable path")
    rng = np.random.default_rng(H)
    x = rng.standard_normal((M, H)).astype(np.float32) * 3 + 1
    g, b = rng.standard_normal(H).astype(np.float32), rng.standard_normal(H).astype(np.float32)
    t = rng.standard_normal(H).astype(np.float32)
    results = []
    for name in PATHS:
        kernels.set_kernel(name)
        results.append(kernels.layernorm(x, g, b, 1e-12, with_bits=True) +
                       kernels.layernorm(x, g, b, 1e-12, with_bits=True, thresholds=t))
    kernels.set_kernel("auto")
    for other in results[1:]:
        for got, want in zip(other, results[0]):
            np.testing.assert_array_equal(got, want)


def test_unknown_or_unavailable_kernel():
    with pytest.raises(BibertError):
        kernels.set_kernel("sse9")
    for name, has in (("avx512", kernels.cpu_has_avx512()), ("avx2", kernels.cpu_has_avx2())):
        if not has:
            with pytest.raises(BibertError, match="BIBERT_KERNEL=auto"):
                kernels.set_kernel(name)
    assert kernels.set_kernel("auto") == kernels.available_kernels()[-1]  # the fastest this CPU has


def test_environment_forces_the_path(tmp_path):
    import subprocess
    import sys

    code = "from bibert.packed import kernels; kernels.lib(); print(kernels.get_kernel(), kernels.get_threads())"
    for name in PATHS:
        env = {**__import__("os").environ, "BIBERT_KERNEL": name, "BIBERT_THREADS": "1"}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.split() == [name, "1"]


def _every_kernel(rng_seed: int) -> list[np.ndarray]:
    """Each parallel kernel on shapes big enough to be split into many chunks."""
    rng = np.random.default_rng(rng_seed)
    M, K, N, B, L, heads, d = 200, 300, 130, 3, 70, 4, 24
    x = random_floats(rng, M, K)
    alpha, ws = reference.binarize_rows(rng.standard_normal((N, K)).astype(np.float32))
    bias = rng.standard_normal(N).astype(np.float32)
    panels = kernels.pack_panels(signs_to_bits(ws))
    xb = kernels.sign_pack(x)
    residual = rng.standard_normal((M, N)).astype(np.float32)
    qkv = kernels.sign_pack(random_floats(rng, B * L, 3 * heads * d))
    valid = np.arange(L)[None, :] < np.array([[L], [L - 9], [1]])
    ids = rng.integers(0, 50, size=(B, L))
    word_bits = kernels.pack_bool(rng.random((50, 300)) < 0.5)
    ln, ln_bits = kernels.layernorm(x * 3 + 1, rng.standard_normal(K), rng.standard_normal(K), 1e-12, with_bits=True)
    ctx, counts = kernels.biattention(qkv, (0, heads * d, 2 * heads * d), B, L, heads, d, valid, counts=True)
    t_k, t_n = rng.standard_normal(K).astype(np.float32), rng.standard_normal(N).astype(np.float32)
    t_ctx = rng.integers(-3, 3, heads * d).astype(np.float32)
    offset = kernels.zero_one_offsets(signs_to_bits(ws), K)
    return [xb,
            kernels.binary_linear(xb, K, panels, N, alpha, bias, residual),
            kernels.binary_linear(xb, K, panels, N, alpha, bias, out_bits=True),
            ln, ln_bits, ctx, counts,
            kernels.sign_pack(x, t_k),  # elastic binarization: thresholds, compare values, {0, 1} inputs
            kernels.layernorm(x * 3 + 1, np.ones(K), np.zeros(K), 1e-12, with_bits=True, thresholds=t_k)[1],
            kernels.biattention(qkv, (0, heads * d, 2 * heads * d), B, L, heads, d, valid, thresholds=t_ctx,
                                score_limits=kernels.score_limits(rng.normal(0, 1, heads), d)),
            kernels.biattention(qkv, (0, heads * d, 2 * heads * d), B, L, heads, d, valid, counts=True,
                                relative=kernels.relative_limits(random_count_minima(rng, heads, d), d))[1],
            kernels.binary_linear(xb, K, panels, N, alpha, bias, out_bits=True,
                                  thresholds=kernels.bit_thresholds(alpha, bias, K, compare=t_n)),
            kernels.binary_linear(xb, K, panels, N, alpha, bias, residual,
                                  epilogue=kernels.float_epilogue(alpha, bias, K, offset)),
            *_every_kbit_kernel(rng, x, ws, alpha, bias, residual, heads, d),
            kernels.embed(ids, np.zeros_like(ids), word_bits, rng.random(50).astype(np.float32),
                          rng.standard_normal((L, 300)).astype(np.float32),
                          rng.standard_normal((2, 300)).astype(np.float32))]


def _every_kbit_kernel(rng, x, ws, alpha, bias, residual, heads, d) -> list[np.ndarray]:
    """The k-bit (bit-serial) kernels on the same data: quantizer planes, Linear, attention, GELU."""
    M, K = x.shape
    N = ws.shape[0]
    wbits = signs_to_bits(ws)
    planes, step, levels = kernels.quantize_planes(x, 4, 2.55, levels=True)
    y = kernels.linear_kbit(planes, M, K, kernels.pack_panels(wbits), N, 4, step, alpha, bias,
                            kernels.kbit_offsets(wbits, K, 4), residual)
    L = 70
    lv = [kernels.quantize_planes(random_floats(rng, L, heads * d), 2, 1.71, levels=True)[2] for _ in range(3)]
    ctx = kernels.biattention_kbit(*lv, 0.5, heads, d, np.arange(L) < 60)
    return [planes, levels, y, ctx, kernels.gelu(x)]


@pytest.mark.parametrize("threads", [2, 3, 7])
def test_thread_pool_gives_the_one_thread_result(path, threads):
    """More threads than cores included: chunks are claimed dynamically, so a worker that is
    descheduled only delays the chunk it holds; results must not depend on who ran what."""
    before = kernels.get_threads()
    try:
        kernels.set_threads(1)
        expected = _every_kernel(0)
        kernels.set_threads(threads)
        for _ in range(5):  # repeated: a race would show as a sporadic difference
            for got, want in zip(_every_kernel(0), expected):
                np.testing.assert_array_equal(got, want)
        kernels.set_threads(2)  # the pool is rebuilt when the count changes
        for got, want in zip(_every_kernel(0), expected):
            np.testing.assert_array_equal(got, want)
    finally:
        kernels.set_threads(before)


def test_spin_budget_changes_timing_not_results(path):
    """Idle workers that sleep at once (spin 0) or poll for long must both pick up every job:
    the results equal the one-thread results, and the setting reads back."""
    before_threads, before_spin = kernels.get_threads(), kernels.get_spin_us()
    try:
        kernels.set_threads(1)
        expected = _every_kernel(2)
        kernels.set_threads(3)
        for spin in (0, 1, 50, 2000):
            kernels.set_spin_us(spin)
            assert kernels.get_spin_us() == spin
            for _ in range(3):
                for got, want in zip(_every_kernel(2), expected):
                    np.testing.assert_array_equal(got, want)
                time.sleep(0.003)  # longer than the short budgets: the next job finds the workers asleep
    finally:
        kernels.set_threads(before_threads)
        kernels.set_spin_us(before_spin)


@pytest.mark.parametrize("bad", [-1, kernels.MAX_SPIN_US + 1, 2.5, True, "50"])
def test_spin_budget_refuses_what_is_not_microseconds(bad):
    before = kernels.get_spin_us()
    with pytest.raises(BibertError, match="microseconds from 0 to"):
        kernels.set_spin_us(bad)
    assert kernels.get_spin_us() == before
    assert kernels.lib().bb_set_spin_us(-5) == kernels.EINVAL  # the C entry point checks too
    assert kernels.get_spin_us() == before


@pytest.mark.parametrize("value,ok", [("0", True), ("200", True), ("-3", False), ("lots", False), ("2000000", False)])
def test_spin_budget_from_the_environment(value, ok):
    code = "from bibert.packed import kernels; kernels.lib(); print(kernels.get_spin_us())"
    env = {**os.environ, "BIBERT_SPIN_US": value}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    if ok:
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == str(int(value))
    else:
        assert done.returncode != 0
        assert f"BIBERT_SPIN_US={value!r}: give microseconds" in done.stderr


def test_thread_pool_survives_fork():
    """A forked child (e.g. a DataLoader worker) has none of the parent's workers: it must
    start its own, not wait for threads that do not exist."""
    import multiprocessing as mp

    before = kernels.get_threads()
    kernels.set_threads(3)
    try:
        expected = _every_kernel(1)  # the pool is running in the parent now
        ctx = mp.get_context("fork")
        with ctx.Pool(1) as pool:
            got = pool.apply_async(_every_kernel, (1,)).get(timeout=120)
        for g, w in zip(got, expected):
            np.testing.assert_array_equal(g, w)
    finally:
        kernels.set_threads(before)


# ---- the C interface ---------------------------------------------------------------------

HEADER = Path(kernels.__file__).resolve().parent.parent / "csrc" / "bitkernels.h"
C_TYPES = {"int": ctypes.c_int, "int64_t": ctypes.c_int64, "float": ctypes.c_float}


def _c_type(declaration: str):
    """The ctypes type of a C parameter or result declaration (`const float *x`, `int64_t n`)."""
    if "*" in declaration:
        return ctypes.c_void_p
    words = declaration.replace("const ", "").split()
    if words == ["void"]:
        return None
    return C_TYPES[words[0]]


def header_functions() -> dict[str, tuple]:
    """name -> (result type, [argument types]) of every function bitkernels.h declares."""
    text = re.sub(r"/\*.*?\*/", "", HEADER.read_text(), flags=re.S)
    found = {}
    for result, name, params in re.findall(r"^(int64_t|int|void)\s+(bb_\w+)\(([^)]*)\);", text, flags=re.M):
        params = " ".join(params.split())
        args = [] if params == "void" else [_c_type(p) for p in params.split(",")]
        found[name] = (_c_type(result), args)
    return found


def test_header_matches_the_ctypes_declarations():
    """Every function of bitkernels.h is declared to ctypes with its C types, and nothing else."""
    declared = header_functions()
    assert len(declared) > 20
    assert set(declared) == set(kernels.SIGNATURES)
    for name, (result, args) in declared.items():
        want_result, want_args = kernels.SIGNATURES[name]
        assert result is want_result, name
        assert args == want_args, name
    lib = kernels.lib()
    for name, (result, args) in kernels.SIGNATURES.items():  # what the loaded library uses
        assert getattr(lib, name).argtypes == args and getattr(lib, name).restype is result, name


def test_header_constants_and_layer_struct_match_python():
    text = HEADER.read_text()
    assert int(re.search(r"#define BB_ABI_VERSION (\d+)", text).group(1)) == kernels.ABI_VERSION
    codes = dict(re.findall(r"(BB_OK|BB_ENOMEM|BB_EINVAL) = (-?\d+)", text))
    assert (int(codes["BB_OK"]), int(codes["BB_ENOMEM"]), int(codes["BB_EINVAL"])) == \
        (kernels.OK, kernels.ENOMEM, kernels.EINVAL)
    families = {k.lower(): int(v) for k, v in re.findall(r"BB_KERNEL_(\w+) = (\d+)", text)}
    assert families == kernels.KERNELS
    struct = re.search(r"typedef struct \{(.*?)\} bb_layer;", text, flags=re.S).group(1)
    fields = re.findall(r"\*\s*(\w+)", struct)  # every field is a pointer
    assert fields == [name for name, _ in kernels.LayerParams._fields_]
    assert all(t is ctypes.c_void_p for _, t in kernels.LayerParams._fields_)


def test_header_model_struct_matches_python():
    """bb_model's fields, in order, with their C types, are ModelParams'."""
    text = re.sub(r"/\*.*?\*/", "", HEADER.read_text(), flags=re.S)
    struct = re.search(r"typedef struct \{([^{}]*)\} bb_model;", text).group(1)
    fields = []
    for declaration in filter(None, (d.strip() for d in struct.split(";"))):
        base = declaration.replace("const ", "").split()[0]
        for name in declaration.split(base, 1)[1].split(","):
            fields.append((name.strip(" *"), ctypes.c_void_p if "*" in name else C_TYPES[base]))
    assert len(fields) == 14
    assert fields == list(kernels.ModelParams._fields_)
