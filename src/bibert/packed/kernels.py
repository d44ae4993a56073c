"""ctypes bindings of the native bitwise kernels (src/bibert/csrc; their C interface,
bitkernels.h, is what `SIGNATURES` declares to ctypes).

Bit convention, everywhere: bit 1 <=> -1, bit 0 <=> +1; element j of a row in uint64
word j // 64, bit j % 64; padding bits 0. sign(x) = +1 iff x >= 0, so a bit is x < 0.

The kernel family is chosen at run time: AVX-512 VPOPCNTDQ where the CPU has it, a
portable C path elsewhere (with AVX2 kernels where the CPU has AVX2). A family is one table
of kernels in the library, so forcing one runs every op on it.
`set_kernel("portable" | "avx2" | "avx512" | "auto")` or the
environment variable BIBERT_KERNEL forces one; `set_threads(n)` (or BIBERT_THREADS)
sets the thread count of the engine's own pool, `set_spin_us(us)` (or BIBERT_SPIN_US) how
long its idle threads poll for work before they sleep (50 us by default).
BIBERT_NATIVE_LIB points at another build of the library (the sanitizer builds of
`make asan` / `make tsan`).

Every wrapper takes and returns NumPy arrays; buffers passed to C are kept referenced
for the duration of the call. The wrappers check the arrays' shapes against the sizes they
pass, and the C entry points check the sizes again (and return an error code instead of
touching memory), so a mistake raises BibertError rather than corrupting memory.
"""
from __future__ import annotations

import ctypes
import importlib.machinery
import os
from pathlib import Path

import numpy as np

from ..errors import BibertError
from .reader import pack_bool, unpack_bool, words  # the format's bits, as the kernels take them

ABI_VERSION = 19
PANEL = 32
KERNELS = {"auto": 0, "portable": 1, "avx512": 2, "avx2": 3}
MAX_THREADS = 1024  # bb_set_threads' cap
MAX_SPIN_US = 1_000_000  # bb_set_spin_us' cap
OK, ENOMEM, EINVAL = 0, -1, -2  # the C entry points' return codes
ATTENTION_BI, ATTENTION_SOFTMAX = 0, 1  # bb_forward_kbit's attention
KERNEL_NAMES = {1: "portable", 2: "avx512", 3: "avx2"}
REQUIRES = {"avx512": "AVX-512 F/BW/DQ/VL + VPOPCNTDQ", "avx2": "AVX2 + FMA + POPCNT"}

_P, _I, _F, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
# Every entry point of bitkernels.h: name -> (result type, argument types); pointers are c_void_p.
# The entry points that take sizes return OK, ENOMEM or EINVAL.
SIGNATURES = {
    "bb_abi_version": (_INT, []),
    "bb_cpu_has_avx512": (_INT, []),
    "bb_cpu_has_avx2": (_INT, []),
    "bb_set_kernel": (_INT, [_INT]),
    "bb_get_kernel": (_INT, []),
    "bb_set_threads": (None, [_INT]),
    "bb_get_threads": (_INT, []),
    "bb_set_spin_us": (_INT, [_I]),
    "bb_get_spin_us": (_I, []),
    "bb_sign_pack": (_INT, [_P, _I, _I, _I, _P, _I, _P]),
    "bb_linear": (_INT, [_P, _I, _I, _I, _P, _I, _P, _P, _P, _P, _P, _I, _P, _P]),
    "bb_bit_thresholds": (_INT, [_P, _P, _P, _I, _I, _P, _P]),
    "bb_float_epilogue": (_INT, [_P, _P, _I, _I, _P, _P, _P]),
    "bb_set_tuning": (_INT, [_INT, _I, _I, _I]),
    "bb_get_tuning": (_INT, [_INT, _P]),
    "bb_linear_kbit": (_INT, [_P, _I, _I, _I, _P, _I, _INT, _F, _P, _P, _P, _P, _P]),
    "bb_layernorm": (_INT, [_P, _I, _I, _P, _P, _F, _P, _P, _I, _P]),
    "bb_embed": (_INT, [_P, _P, _I, _I, _P, _P, _I, _P, _I, _P, _I, _I, _P, _P]),
    "bb_biattention": (_INT, [_P, _I, _I, _I, _I, _I, _I, _I, _I, _P, _P, _I, _P, _P, _P, _P]),
    "bb_quantize_planes": (_INT, [_P, _I, _I, _I, _INT, _F, _P, _I, _P, _P]),
    "bb_gelu": (_INT, [_P, _I, _I, _P]),
    "bb_biattention_kbit": (_INT, [_P, _P, _P, _I, _I, _I, _F, _P, _P, _I, _P]),
    "bb_softmax_attention_kbit": (_INT, [_P, _P, _P, _I, _I, _I, _INT, _F, _F, _F, _P, _P, _I, _P]),
    "bb_set_encoder_tuning": (_INT, [_I, _I]),
    "bb_get_encoder_tuning": (_INT, [_P]),
    "bb_encoder": (_INT, [_P, _I, _I, _P, _I, _I, _I, _F, _P, _P, _P, _P]),
    "bb_forward": (_INT, [_P, _P, _I, _I, _P, _I, _I, _I, _F, _P, _P, _P, _P, _P, _P, _P, _P]),
    "bb_forward_kbit": (_INT, [_P, _P, _P, _I, _I, _P, _I, _I, _I, _F, _INT, _INT, _F, _P, _P, _P, _P, _P, _P, _P]),
}

_lib = None


def _library_path() -> Path:
    override = os.environ.get("BIBERT_NATIVE_LIB")
    if override:
        return Path(override)
    here = Path(__file__).resolve().parent.parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = here / f"_bitkernels{suffix}"
        if candidate.exists():
            return candidate
    raise BibertError(
        "the native kernels (bibert/_bitkernels) are not built: reinstall with `pip install -e .` "
        "or run `python setup.py build_ext --inplace`"
    )


def lib() -> ctypes.CDLL:
    """The loaded native library (loaded once; kernel and threads from the environment)."""
    global _lib
    if _lib is not None:
        return _lib
    handle = ctypes.CDLL(str(_library_path()))
    handle.bb_abi_version.argtypes, handle.bb_abi_version.restype = [], ctypes.c_int
    if handle.bb_abi_version() != ABI_VERSION:
        raise BibertError(
            f"native kernels ABI {handle.bb_abi_version()} != {ABI_VERSION}: rebuild with `pip install -e .`"
        )
    for name, (result, args) in SIGNATURES.items():
        function = getattr(handle, name)
        function.argtypes, function.restype = args, result
    _lib = handle
    set_kernel(os.environ.get("BIBERT_KERNEL", "auto"))
    threads = os.environ.get("BIBERT_THREADS", "")
    if threads and not (threads.isdigit() and int(threads) > 0):
        raise BibertError(f"BIBERT_THREADS={threads!r}: give a positive number of threads")
    set_threads(int(threads) if threads else default_threads())
    spin = os.environ.get("BIBERT_SPIN_US", "")
    if spin:
        if not (spin.isdigit() and int(spin) <= MAX_SPIN_US):
            raise BibertError(f"BIBERT_SPIN_US={spin!r}: give microseconds from 0 to {MAX_SPIN_US}")
        set_spin_us(int(spin))
    return handle


def default_threads() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    return min(n, MAX_THREADS)


def cpu_has_avx512() -> bool:
    """True if this CPU runs the AVX-512 VPOPCNTDQ kernels."""
    return bool(lib().bb_cpu_has_avx512())


def cpu_has_avx2() -> bool:
    """True if this CPU runs the AVX2 kernels."""
    return bool(lib().bb_cpu_has_avx2())


def available_kernels() -> list[str]:
    """Kernel families this CPU can run, fastest last."""
    return ["portable"] + (["avx2"] if cpu_has_avx2() else []) + (["avx512"] if cpu_has_avx512() else [])


def set_kernel(name: str) -> str:
    """Force a kernel family ("auto", "avx512", "avx2", "portable"); returns the active one.
    auto: AVX-512 VPOPCNTDQ where the CPU has it, else AVX2, else portable C."""
    if name not in KERNELS:
        raise BibertError(f"unknown kernel {name!r}: choose one of {', '.join(KERNELS)}")
    active = lib().bb_set_kernel(KERNELS[name])
    if active < 0:
        raise BibertError(
            f"kernel {name!r} needs {REQUIRES[name]}, which this CPU lacks: "
            "use BIBERT_KERNEL=auto (the fastest this CPU has) or portable"
        )
    return KERNEL_NAMES[active]


def get_kernel() -> str:
    return KERNEL_NAMES[lib().bb_get_kernel()]


def set_threads(n: int) -> None:
    """Threads of the engine's pool, used by every kernel (process-wide): an integer in
    [1, MAX_THREADS]."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= MAX_THREADS:
        raise BibertError(f"threads is {n!r}: give a number of threads from 1 to {MAX_THREADS}")
    lib().bb_set_threads(int(n))


def get_threads() -> int:
    return int(lib().bb_get_threads())


def set_spin_us(us: int) -> None:
    """How long, in microseconds, an idle thread of the engine's pool polls for the next job
    before it sleeps (process-wide; 0 to MAX_SPIN_US). Longer: a forward that follows
    another closely finds its threads awake; shorter: idle threads leave the cores sooner to
    the process's other work. benchmarks/idle_spin.py measures both sides."""
    if isinstance(us, bool) or not isinstance(us, (int, np.integer)) or not 0 <= us <= MAX_SPIN_US:
        raise BibertError(f"spin is {us!r}: give microseconds from 0 to {MAX_SPIN_US}")
    _check_rc(lib().bb_set_spin_us(int(us)), f"set_spin_us({us})")


def get_spin_us() -> int:
    return int(lib().bb_get_spin_us())


def set_tuning(family: str, mr: int, chunk_bytes: int, float_order: int) -> None:
    """How the binary Linear of one kernel family walks its tiles (per-host tuning; the
    results never depend on it): mr rows per micro-tile (1 to 6), chunk_bytes of activation
    bits per row chunk (64 to 2^30), float_order 0 (float output by row blocks) or 1 (by row
    chunks, as the bit output)."""
    if family not in KERNEL_NAMES.values():
        raise BibertError(f"unknown kernel family {family!r}: choose one of {', '.join(KERNEL_NAMES.values())}")
    _check_rc(lib().bb_set_tuning(KERNELS[family], int(mr), int(chunk_bytes), int(float_order)),
              f"set_tuning({family}, {mr}, {chunk_bytes}, {float_order})")


def get_tuning(family: str) -> tuple[int, int, int]:
    """(mr, chunk_bytes, float_order) of one kernel family."""
    out = np.zeros(3, np.int64)
    _check_rc(lib().bb_get_tuning(KERNELS[family], _ptr(out)), "get_tuning")
    return tuple(int(v) for v in out)


def set_encoder_tuning(tail_rows: int, group_rows: int) -> None:
    """The encoder's row blocking (per-host tuning; the results never depend on it): rows of
    the layer tail handled together (1 to 4096) and rows of a group of sequences run through
    the layers together (1 to 2^20)."""
    _check_rc(lib().bb_set_encoder_tuning(int(tail_rows), int(group_rows)),
              f"set_encoder_tuning({tail_rows}, {group_rows})")


def get_encoder_tuning() -> tuple[int, int]:
    """(tail_rows, group_rows)."""
    out = np.zeros(2, np.int64)
    _check_rc(lib().bb_get_encoder_tuning(_ptr(out)), "get_encoder_tuning")
    return int(out[0]), int(out[1])


def _ptr(a: np.ndarray | None) -> int | None:
    return None if a is None else a.ctypes.data


def _check_rc(rc: int, what: str) -> None:
    """A C entry point's return code as a BibertError (it touched no memory when it refused)."""
    if rc == ENOMEM:
        raise BibertError(f"{what}: out of memory")
    if rc != OK:
        raise BibertError(f"{what}: invalid arguments (a size below 1 or too large, sizes that disagree, "
                          "or a missing buffer)")


def _shape(a: np.ndarray, shape: tuple, what: str) -> None:
    """a has exactly this shape (the sizes passed to C beside it)."""
    if a.shape != tuple(shape):
        raise BibertError(f"{what} has shape {a.shape}; expected {tuple(shape)}")


def _matrix(a: np.ndarray, what: str) -> np.ndarray:
    """a is 2-D."""
    if a.ndim != 2:
        raise BibertError(f"{what} must be a 2-D array, not of shape {a.shape}")
    return a


def _f32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


def _u64(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.uint64)


def pack_panels(bits: np.ndarray) -> np.ndarray:
    """Weight bit rows [N, Kw] -> panels [ceil(N/32), Kw, 32] (word k of 32 channels together)."""
    N, kw = bits.shape
    n_pad = -(-N // PANEL) * PANEL
    padded = np.zeros((n_pad, kw), dtype=np.uint64)
    padded[:N] = bits
    return np.ascontiguousarray(padded.reshape(n_pad // PANEL, PANEL, kw).transpose(0, 2, 1))


def _thresholds(t: np.ndarray | None, n: int, what: str) -> np.ndarray | None:
    """Per-channel thresholds (elastic binarization) as a float32 vector of n, or None."""
    if t is None:
        return None
    t = _f32(t)
    _shape(t, (n,), what)
    return t


def sign_pack(x: np.ndarray, thresholds: np.ndarray | None = None) -> np.ndarray:
    """float [M, K] -> sign bits [M, words(K)]: bit = x < 0, or with per-channel thresholds
    t [K] (elastic binarization) bit = !(x - t >= 0), the student's float32 compare."""
    x = _matrix(_f32(x), "sign_pack: x")
    M, K = x.shape
    t = _thresholds(thresholds, K, "sign_pack: thresholds")
    out = np.empty((M, words(K)), dtype=np.uint64)
    _check_rc(lib().bb_sign_pack(_ptr(x), M, K, K, _ptr(out), out.shape[1], _ptr(t)), "sign_pack")
    return out


def bit_thresholds(alpha: np.ndarray, bias: np.ndarray, K: int,
                   compare: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Integer form of the bit epilogue: bit_n(p) == (p > thr_n) XOR flip_n for every popcount
    p, where bit_n(p) = (y < 0) for y = alpha_n (K - 2p) + bias_n, or with compare values t
    (the next quantizer's thresholds, elastic binarization) bit_n(p) = !(y - t_n >= 0).
    Returns thr int64 [panels*32] and flip uint32 [panels] (bit c = channel 32*panel + c)."""
    alpha, bias = _vectors(alpha, bias, "bit_thresholds")
    N = alpha.shape[0]
    t = _thresholds(compare, N, "bit_thresholds: compare")
    n_pad = -(-N // PANEL) * PANEL
    thr = np.full(n_pad, -1, dtype=np.int64)
    flip = np.zeros(n_pad, dtype=np.uint8)
    _check_rc(lib().bb_bit_thresholds(_ptr(alpha), _ptr(bias), _ptr(t), K, N, _ptr(thr), _ptr(flip)),
              "bit_thresholds")
    weights = (np.uint64(1) << np.arange(PANEL, dtype=np.uint64))
    flip_words = (flip.reshape(-1, PANEL).astype(np.uint64) * weights).sum(axis=1).astype(np.uint32)
    return thr, flip_words


def float_epilogue(alpha: np.ndarray, bias: np.ndarray, K: int,
                   offset: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(c0, c1) = (alpha * K + bias, -2 alpha): the float epilogue y = c0 + c1 * popcount.
    With `offset` (int64 [N]): the input bits stand for {0, 1} levels (elastic binarization),
    z . w = offset - popcount with offset = (K + rowsum(w)) / 2 (`zero_one_offsets`), and
    (c0, c1) = (alpha * offset + bias, -alpha)."""
    alpha, bias = _vectors(alpha, bias, "float_epilogue")
    if offset is not None:
        offset = np.ascontiguousarray(offset, dtype=np.int64)
        _shape(offset, alpha.shape, "float_epilogue: offset")
    c0, c1 = np.empty_like(alpha), np.empty_like(alpha)
    _check_rc(lib().bb_float_epilogue(_ptr(alpha), _ptr(bias), K, alpha.shape[0], _ptr(offset), _ptr(c0), _ptr(c1)),
              "float_epilogue")
    return c0, c1


def zero_one_offsets(weight_bits: np.ndarray, K: int) -> np.ndarray:
    """(K + rowsum(w)) / 2 = K - popcount(row) per weight row (bits [N, words(K)], padding 0):
    the dot product of {0, 1} levels z with +-1 weights is this minus popcount(s' XOR w)
    for the bits s' of z (docs/method.md §7)."""
    bits = np.ascontiguousarray(weight_bits, dtype="<u8")
    return K - np.bitwise_count(bits).sum(axis=1, dtype=np.int64)


def _vectors(alpha: np.ndarray, bias: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    """alpha and bias as float32 vectors of one length."""
    alpha, bias = _f32(alpha), _f32(bias)
    if alpha.ndim != 1 or bias.shape != alpha.shape:
        raise BibertError(f"{what}: alpha and bias must be vectors of one length, not {alpha.shape} and {bias.shape}")
    return alpha, bias


def binary_linear(a_bits: np.ndarray, K: int, panels: np.ndarray, N: int, alpha: np.ndarray,
                  bias: np.ndarray, residual: np.ndarray | None = None, out_bits: bool = False,
                  thresholds: tuple[np.ndarray, np.ndarray] | None = None,
                  epilogue: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """y = alpha * (K - 2 popcount(a XOR w)) + bias [+ residual]: float [M, N] (evaluated as
    c0 + c1 * popcount, equal to rounding), or with out_bits the sign bits of y exactly, uint64
    [M, words(N)]. thresholds (`bit_thresholds`) and epilogue (`float_epilogue`) are computed
    here when not given; pass them for the elastic forms (compare values, {0, 1} inputs)."""
    a_bits, panels = _matrix(_u64(a_bits), "binary_linear: a_bits"), _u64(panels)
    alpha, bias = _vectors(alpha, bias, "binary_linear")
    M = a_bits.shape[0]
    if K < 1 or N < 1 or a_bits.shape[1] < words(K) or panels.shape != (-(-N // PANEL), words(K), PANEL) \
            or alpha.shape != (N,):
        raise BibertError(f"binary_linear: shapes do not match K={K}, N={N}")
    n_pad = -(-N // PANEL) * PANEL
    if out_bits:
        if residual is not None:
            raise BibertError("binary_linear: a residual needs float output")
        thr, flip = thresholds if thresholds is not None else bit_thresholds(alpha, bias, K)
        thr, flip = np.ascontiguousarray(thr, np.int64), np.ascontiguousarray(flip, np.uint32)
        _shape(thr, (n_pad,), "binary_linear: thresholds")
        _shape(flip, (n_pad // PANEL,), "binary_linear: flip bits")
        out = np.empty((M, words(N)), dtype=np.uint64)
        _check_rc(lib().bb_linear(_ptr(a_bits), M, a_bits.shape[1], K, _ptr(panels), N, None, None,
                                  None, None, _ptr(out), out.shape[1], _ptr(thr), _ptr(flip)), "binary_linear")
        return out
    if residual is not None:
        residual = _f32(residual)
        _shape(residual, (M, N), "binary_linear: residual")
    c0, c1 = epilogue if epilogue is not None else float_epilogue(alpha, bias, K)
    c0, c1 = _f32(c0), _f32(c1)
    _shape(c0, (N,), "binary_linear: epilogue c0")
    _shape(c1, (N,), "binary_linear: epilogue c1")
    out = np.empty((M, N), dtype=np.float32)
    _check_rc(lib().bb_linear(_ptr(a_bits), M, a_bits.shape[1], K, _ptr(panels), N, _ptr(c0), _ptr(c1),
                              _ptr(residual), _ptr(out), None, 0, None, None), "binary_linear")
    return out


class LayerParams(ctypes.Structure):
    """Pointers to one encoder layer's parameters (bb_layer in bitkernels.h)."""

    _fields_ = [(name, ctypes.c_void_p) for name in (
        "qkv_w", "qkv_thr", "qkv_flip",
        "ao_w", "ao_c0", "ao_c1", "ln1_g", "ln1_b",
        "fi_w", "fi_thr", "fi_flip",
        "fo_w", "fo_c0", "fo_c1", "ln2_g", "ln2_b",
        "ctx_t", "ln1_t", "ln2_t", "score_lim", "score_rel")]  # elastic, None (NULL) for plain signs


class ModelParams(ctypes.Structure):
    """Pointers to the embeddings, their LayerNorm and the pooler, and the tables' sizes (bb_model
    in bitkernels.h)."""

    _fields_ = [("word_bits", ctypes.c_void_p), ("word_alpha", ctypes.c_void_p), ("vocab", ctypes.c_int64),
                ("pos", ctypes.c_void_p), ("positions", ctypes.c_int64),
                ("type", ctypes.c_void_p), ("types", ctypes.c_int64),
                ("ln_g", ctypes.c_void_p), ("ln_b", ctypes.c_void_p), ("ln_t", ctypes.c_void_p),
                ("pool_w", ctypes.c_void_p), ("pool_c0", ctypes.c_void_p), ("pool_c1", ctypes.c_void_p),
                ("pool_t", ctypes.c_void_p)]


class KbitLinearParams(ctypes.Structure):
    """Pointers to one binary Linear of a 2- or 4-bit model (bb_kbit_linear in bitkernels.h)."""

    _fields_ = [(name, ctypes.c_void_p) for name in ("w", "alpha", "bias", "count_offset")]


class KbitLayerParams(ctypes.Structure):
    """One encoder layer of a 2- or 4-bit model (bb_kbit_layer in bitkernels.h)."""

    _fields_ = [(name, KbitLinearParams) for name in ("qkv", "ao", "fi", "fo")] + \
        [(name, ctypes.c_void_p) for name in ("ln1_g", "ln1_b", "ln2_g", "ln2_b")]


def _forward_inputs(start: np.ndarray, n_layers: int, n_available: int, hidden_size: int, heads: int, ids: np.ndarray,
                    type_ids: np.ndarray, positions: np.ndarray | None, row_valid: np.ndarray,
                    hidden: np.ndarray | None, what: str) -> tuple:
    """The checked, contiguous inputs of `forward` and `forward_kbit`: start, ids, type_ids, positions,
    row_valid (uint8), the row count M and the sequence count."""
    start = np.ascontiguousarray(start, dtype=np.int64)
    if start.ndim != 1 or len(start) < 1 or start[0] != 0:
        raise BibertError(f"{what}: start must rise from 0 by at least one row per sequence")
    M, n_seq = int(start[-1]), len(start) - 1
    if n_available < n_layers or hidden_size < 1 or heads < 1 or hidden_size % heads:
        raise BibertError(f"{what}: sizes do not fit (layers {n_layers} of {n_available}, hidden {hidden_size}, "
                          f"heads {heads})")
    ids, type_ids = np.ascontiguousarray(ids, dtype=np.int64), np.ascontiguousarray(type_ids, dtype=np.int64)
    valid = np.ascontiguousarray(row_valid)
    valid = valid.view(np.uint8) if valid.dtype == bool else valid.astype(np.uint8, copy=False)
    if positions is not None:
        positions = np.ascontiguousarray(positions, dtype=np.int64)
    for a, name in ((ids, "ids"), (type_ids, "type_ids"), (valid, "row_valid"), (positions, "positions")):
        if a is not None and a.shape != (M,):
            raise BibertError(f"{what}: {name} has shape {a.shape}; expected {(M,)}")
    if hidden is not None and (not isinstance(hidden, np.ndarray) or hidden.dtype != np.float32
                               or hidden.shape != (n_layers + 1, M, hidden_size) or not hidden.flags.c_contiguous
                               or not hidden.flags.writeable):
        raise BibertError(f"{what}: hidden must be a writable C-contiguous float32 array of shape "
                          f"{(n_layers + 1, M, hidden_size)}")
    return start, ids, type_ids, positions, valid, M, n_seq


def forward_kbit(model: ModelParams, pooler: KbitLinearParams, layers: ctypes.Array, n_layers: int, start: np.ndarray,
                 hidden_size: int, heads: int, intermediate: int, eps: float, bits: int, clip_std: float,
                 ids: np.ndarray, type_ids: np.ndarray, positions: np.ndarray | None, row_valid: np.ndarray,
                 hidden: np.ndarray | None = None, softmax: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The whole forward of a 2- or 4-bit model but the classifier in one native call (bb_forward_kbit):
    the rows and sequences as `forward` takes them, each sequence computed on its own (every
    quantizer's clip over its own rows), the pooler's input its first row alone; the attention
    Bi-Attention, or with `softmax` softmax attention (`softmax_attention_kbit`). `model` gives the
    embeddings and their LayerNorm (its pooler is not read: `pooler` is the k-bit one). Returns
    the last hidden state [rows, H] and the pooler's output [sequences, H] before the tanh; hidden
    as `forward`'s. The parameter arrays behind the structs must stay alive while it runs."""
    start, ids, type_ids, positions, valid, M, n_seq = _forward_inputs(
        start, n_layers, len(layers), hidden_size, heads, ids, type_ids, positions, row_valid, hidden, "forward_kbit")
    bits = _kbits(bits, "forward_kbit")
    x = np.empty((M, hidden_size), np.float32)
    pooled = np.empty((n_seq, hidden_size), np.float32)
    if n_seq == 0:
        return x, pooled
    rc = lib().bb_forward_kbit(ctypes.byref(model), ctypes.byref(pooler), ctypes.byref(layers), n_layers, n_seq,
                               _ptr(start), hidden_size, heads, intermediate, eps, bits,
                               ATTENTION_SOFTMAX if softmax else ATTENTION_BI, float(clip_std), _ptr(ids),
                               _ptr(type_ids), _ptr(positions), _ptr(valid), _ptr(x), _ptr(hidden), _ptr(pooled))
    if rc == EINVAL:
        raise BibertError("forward_kbit: invalid arguments (start not rising by at least one row per sequence, or "
                          "token ids, types or positions outside the model's tables)")
    _check_rc(rc, "forward_kbit")
    return x, pooled


def forward(model: ModelParams, layers: ctypes.Array, n_layers: int, start: np.ndarray, hidden_size: int, heads: int,
            intermediate: int, eps: float, ids: np.ndarray, type_ids: np.ndarray, positions: np.ndarray | None,
            row_valid: np.ndarray, hidden: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The whole forward but the classifier in one native call, on sequences packed row after row:
    sequence s owns rows start[s] to start[s+1] (int64 [n+1], from 0, each sequence at least one
    row; a padded position need not be a row), and row_valid (bool [rows]) marks the rows that
    are keys of their sequence's attention. Each row's embeddings (token ids and types [rows];
    row m at positions[m], or at its index in its sequence when positions is None) and their
    LayerNorm, n_layers encoder layers, then the pooler (before its tanh) on each sequence's
    first row. Returns the last hidden state [rows, H] and the pooler's output [sequences, H];
    hidden [n_layers + 1, rows, H] (optional) receives the embeddings' output and each layer's.
    Without hidden, only the pooler reads the last layer, which then computes each sequence's
    first row alone past its keys and values: the other rows of the returned state hold the
    layer before's output.
    Checks the arrays (the C side checks start, each id, type and position: out of range,
    BibertError). The lengths of the parameter arrays behind `model` and `layers` cannot be
    checked here: they must be PackedModel's (checked when it was built) and stay alive while
    it runs.
    Called once per forward, after the caches have been filled with weights: it keeps to few
    NumPy calls."""
    start, ids, type_ids, positions, valid, M, n_seq = _forward_inputs(
        start, n_layers, len(layers), hidden_size, heads, ids, type_ids, positions, row_valid, hidden, "forward")
    x = np.empty((M, hidden_size), np.float32)
    pooled = np.empty((n_seq, hidden_size), np.float32)
    if n_seq == 0:
        return x, pooled
    xb = np.empty((M, words(hidden_size)), np.uint64)
    rc = lib().bb_forward(ctypes.byref(model), ctypes.byref(layers), n_layers, n_seq, _ptr(start), hidden_size, heads,
                          intermediate, eps, _ptr(ids), _ptr(type_ids), _ptr(positions), _ptr(valid), _ptr(x),
                          _ptr(xb), _ptr(hidden), _ptr(pooled))
    if rc == EINVAL:
        raise BibertError("forward: invalid arguments (start not rising by at least one row per sequence, or token "
                          "ids, types or positions outside the model's tables)")
    _check_rc(rc, "forward")
    return x, pooled


def layernorm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float, with_bits: bool = False,
              thresholds: np.ndarray | None = None) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Row LayerNorm of float [M, H]; with_bits also returns the output's sign bits (against
    per-channel thresholds [H] when given, as `sign_pack`)."""
    x, gamma, beta = _matrix(_f32(x), "layernorm: x"), _f32(gamma), _f32(beta)
    M, H = x.shape
    _shape(gamma, (H,), "layernorm: gamma")
    _shape(beta, (H,), "layernorm: beta")
    t = _thresholds(thresholds, H, "layernorm: thresholds")
    out = np.empty_like(x)
    bits = np.empty((M, words(H)), dtype=np.uint64) if with_bits else None
    _check_rc(lib().bb_layernorm(_ptr(x), M, H, _ptr(gamma), _ptr(beta), eps, _ptr(out), _ptr(bits),
                                 0 if bits is None else bits.shape[1], _ptr(t)), "layernorm")
    return (out, bits) if with_bits else out


def embed(ids: np.ndarray, type_ids: np.ndarray, word_bits: np.ndarray, word_alpha: np.ndarray,
          position: np.ndarray, token_type: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray:
    """(word + token type) + position for ids [B, L]: float [B*L, H], token j of a row at
    position j, or at positions[b, j] when given (rows packed without their padding). Ids
    outside the vocabulary or the type table raise BibertError (the C side checks each)."""
    ids = _matrix(np.ascontiguousarray(ids, dtype=np.int64), "embed: ids")
    type_ids = np.ascontiguousarray(type_ids, dtype=np.int64)
    word_bits, word_alpha = _matrix(_u64(word_bits), "embed: word_bits"), _f32(word_alpha)
    position, token_type = _matrix(_f32(position), "embed: position"), _matrix(_f32(token_type), "embed: token_type")
    B, L = ids.shape
    (P, H), V, T = position.shape, word_bits.shape[0], token_type.shape[0]
    _shape(type_ids, (B, L), "embed: type_ids")
    _shape(word_bits, (V, words(H)), "embed: word_bits")
    _shape(word_alpha, (V,), "embed: word_alpha")
    _shape(token_type, (T, H), "embed: token_type")
    if positions is not None:
        positions = np.ascontiguousarray(positions, dtype=np.int64)
        _shape(positions, (B, L), "embed: positions")
    elif L > P:
        raise BibertError(f"embed: {L} tokens, but only {P} positions")
    out = np.empty((B * L, H), dtype=np.float32)
    rc = lib().bb_embed(_ptr(ids), _ptr(type_ids), B * L, 1 if positions is not None else L, _ptr(word_bits),
                        _ptr(word_alpha), V, _ptr(position), P, _ptr(token_type), T, H, _ptr(out), _ptr(positions))
    if rc == EINVAL:  # the shapes are checked above: an id, a type id or a position is out of range
        raise BibertError(f"embed: token ids must lie in [0, {V}), token types in [0, {T}) and positions in [0, {P})")
    _check_rc(rc, "embed")
    return out


def score_limits(thresholds: np.ndarray, head_size: int) -> np.ndarray:
    """Per-head score thresholds t (elastic Bi-Attention: BA = 1[A - t_h > 0] with A =
    (q . k) / sqrt(d) in float32, as the student computes it) as integers: BA = popcount(q XOR k)
    < lim_h, since q . k = d - 2 popcount. int64 [heads], each in [0, d + 1]."""
    t = _f32(thresholds)
    if t.ndim != 1:
        raise BibertError(f"score_limits: thresholds must be a vector, not of shape {t.shape}")
    d = int(head_size)
    dots = (d - 2 * np.arange(d + 1)).astype(np.float32) / np.float32(np.sqrt(np.float64(d)))  # popcount 0..d
    with np.errstate(invalid="ignore"):
        attend = (dots[None, :] - t[:, None]) > 0  # falls from True to False as the popcount grows
    return np.where(attend.all(axis=1), d + 1, np.argmin(attend, axis=1)).astype(np.int64)


def relative_limits(count_min: np.ndarray, head_size: int) -> np.ndarray:
    """A relative Bi-Attention table (elastic "bi-max": BA_ij = 1[c_ij >= c_min[h][c_max_i]] with
    c = q . k = d - 2 popcount(q XOR k) and c_max_i the row's largest c over its real keys;
    int [heads, d + 1], column j for c_max = 2j - d, d + 2 where the row attends to nothing) as
    popcount limits: BA_ij = popcount(q_i XOR k_j) < lim[h][p_i], p_i the row's smallest
    popcount over its real keys. int64 [heads, d + 1], each in [0, d + 1]."""
    c = np.asarray(count_min)
    d = int(head_size)
    if c.ndim != 2 or c.shape[1] != d + 1 or not np.issubdtype(c.dtype, np.integer):
        raise BibertError(f"relative_limits: count_min must be an integer array [heads, {d + 1}], not {c.dtype} "
                          f"{c.shape}")
    c = c.astype(np.int64)
    if np.any((c < -d) | (c > d + 2) | ((c + d) % 2 != 0)):
        raise BibertError(f"relative_limits: every count_min must be one of -{d}, -{d - 2}, ..., {d + 2}")
    # p_i = (d - c_max) / 2: column d - p; c >= c_min <=> popcount <= (d - c_min) / 2
    return np.ascontiguousarray((d - c[:, ::-1]) // 2 + 1, dtype=np.int64)


def biattention(qkv_bits: np.ndarray, offsets: tuple[int, int, int], B: int, L: int, heads: int, head_size: int,
                key_valid: np.ndarray, counts: bool = False, thresholds: np.ndarray | None = None,
                score_limits: np.ndarray | None = None,
                relative: np.ndarray | None = None) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Bi-Attention in bits. qkv_bits [B*L, W] holds sign bits of Q, K, V at bit offsets
    `offsets`; key_valid: bool [B, L]. BA = A > 0, or with `score_limits` ([heads], from
    `score_limits`) popcount(q XOR k) < lim_h, or with `relative` ([heads, d + 1], from
    `relative_limits`) popcount(q_i XOR k_j) < lim[h][p_i], p_i the smallest popcount of row i
    over its real keys (a row without a real key attends to nothing). Returns the context sign
    bits [B*L, words(H*d)] (against per-channel thresholds [H*d] when given: bit = !(count - t
    >= 0)) and, with counts, the integer context int32 [B*L, H*d]."""
    qkv_bits = _matrix(_u64(qkv_bits), "biattention: qkv_bits")
    if B < 0 or L < 1 or heads < 1 or head_size < 1:
        raise BibertError(f"biattention: B={B}, L={L}, heads={heads}, head_size={head_size}: sizes must be positive")
    if qkv_bits.shape[0] != B * L:
        raise BibertError(f"biattention: qkv_bits has {qkv_bits.shape[0]} rows, not B*L = {B * L}")
    if any(off < 0 or off + heads * head_size > 64 * qkv_bits.shape[1] for off in offsets):
        raise BibertError(f"biattention: offsets {offsets} put Q, K or V outside rows of {64 * qkv_bits.shape[1]} bits")
    _shape(np.asarray(key_valid), (B, L), "biattention: key_valid")
    t = _thresholds(thresholds, heads * head_size, "biattention: thresholds")
    lim = None
    if score_limits is not None:
        lim = np.ascontiguousarray(score_limits, dtype=np.int64)
        _shape(lim, (heads,), "biattention: score_limits")
    rel = None
    if relative is not None:
        if lim is not None:
            raise BibertError("biattention: give score_limits or relative, not both")
        rel = np.ascontiguousarray(relative, dtype=np.int64)
        _shape(rel, (heads, head_size + 1), "biattention: relative")
    valid = pack_bool(key_valid)
    out = np.empty((B * L, words(heads * head_size)), dtype=np.uint64)
    cnt = np.empty((B * L, heads * head_size), dtype=np.int32) if counts else None
    q_off, k_off, v_off = offsets
    _check_rc(lib().bb_biattention(_ptr(qkv_bits), qkv_bits.shape[1], q_off, k_off, v_off, B, L, heads, head_size,
                                   _ptr(valid), _ptr(out), out.shape[1], _ptr(cnt), _ptr(t), _ptr(lim), _ptr(rel)),
              "biattention")
    return (out, cnt) if counts else out


# ---- k-bit activations, bit-serially (docs/packed_format.md, "Multi-bit activations") ----

KBITS = (2, 4)


def _kbits(bits: int, what: str) -> int:
    if bits not in KBITS:
        raise BibertError(f"{what}: bits must be 2 or 4, not {bits!r}")
    return bits


def quantize_planes(x: np.ndarray, bits: int, clip_std: float,
                    levels: bool = False) -> tuple[np.ndarray, float] | tuple[np.ndarray, float, np.ndarray]:
    """The student's k-bit quantizer of the whole tensor x [M, C] (one clip: min(max|x|,
    clip_std * std(x))), as bit-planes: returns planes uint64 [M * bits, words(C)] (row m plane
    b holds bit b of level + Q) and the step (float); with `levels`, also the levels int8 [M, C]."""
    x = _matrix(_f32(x), "quantize_planes: x")
    M, C = x.shape
    bits = _kbits(bits, "quantize_planes")
    out = np.empty((M * bits, words(C)), dtype=np.uint64)
    step = ctypes.c_float()
    lv = np.empty((M, C), dtype=np.int8) if levels else None
    _check_rc(lib().bb_quantize_planes(_ptr(x), M, C, C, bits, float(clip_std), _ptr(out), out.shape[1],
                                       ctypes.byref(step), _ptr(lv)), "quantize_planes")
    return (out, step.value, lv) if levels else (out, step.value)


def kbit_offsets(weight_bits: np.ndarray, K: int, bits: int) -> np.ndarray:
    """popcount(w_n) + Q K per weight row (bits [N, words(K)], padding 0): a k-bit Linear's
    count is sum_b 2^b popcount(plane_b XOR w_n) minus this."""
    Q = (1 << (_kbits(bits, "kbit_offsets") - 1)) - 1
    w = np.ascontiguousarray(weight_bits, dtype="<u8")
    return np.bitwise_count(w).sum(axis=1, dtype=np.int64) + Q * K


def linear_kbit(planes: np.ndarray, M: int, K: int, panels: np.ndarray, N: int, bits: int, step: float,
                alpha: np.ndarray, bias: np.ndarray, offsets: np.ndarray, residual: np.ndarray | None = None) -> np.ndarray:
    """A binary Linear on k-bit input (planes from `quantize_planes`, M rows): float [M, N] =
    ((C * step) * alpha + bias) [+ residual] with the exact integer C = sum_j level_j w_j."""
    planes, panels = _matrix(_u64(planes), "linear_kbit: planes"), _u64(panels)
    alpha, bias = _vectors(alpha, bias, "linear_kbit")
    bits = _kbits(bits, "linear_kbit")
    offsets = np.ascontiguousarray(offsets, dtype=np.int64)
    if K < 1 or N < 1 or planes.shape[0] != M * bits or planes.shape[1] < words(K) \
            or panels.shape != (-(-N // PANEL), words(K), PANEL) or alpha.shape != (N,) or offsets.shape != (N,):
        raise BibertError(f"linear_kbit: shapes do not match M={M}, K={K}, N={N}, bits={bits}")
    if residual is not None:
        residual = _f32(residual)
        _shape(residual, (M, N), "linear_kbit: residual")
    out = np.empty((M, N), dtype=np.float32)
    _check_rc(lib().bb_linear_kbit(_ptr(planes), M, planes.shape[1], K, _ptr(panels), N, bits, float(step), _ptr(alpha),
                                   _ptr(bias), _ptr(offsets), _ptr(residual), _ptr(out)), "linear_kbit")
    return out


def biattention_kbit(q: np.ndarray, k: np.ndarray, v: np.ndarray, step_v: float, heads: int, head_size: int,
                     key_valid: np.ndarray, counts: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Bi-Attention of one sequence on k-bit Q, K, V given as levels (int8 [L, heads * head_size],
    `quantize_planes(..., levels=True)`): BA = (integer q . k > 0) and key valid, context =
    fl(sum_j BA_ij level_v * step_v): float [L, heads * head_size]; with counts also the
    integer sums, int32."""
    q, k, v = (np.ascontiguousarray(a, dtype=np.int8) for a in (q, k, v))
    hd = heads * head_size
    L = q.shape[0] if q.ndim == 2 else 0
    if L < 1 or heads < 1 or head_size < 1 or any(a.shape != (L, hd) for a in (q, k, v)):
        raise BibertError(f"biattention_kbit: levels must be [L, {hd}] int8, one shape for Q, K and V")
    _shape(np.asarray(key_valid), (L,), "biattention_kbit: key_valid")
    valid = pack_bool(np.asarray(key_valid)[None])
    out = np.empty((L, hd), dtype=np.float32)
    cnt = np.empty((L, hd), dtype=np.int32) if counts else None
    _check_rc(lib().bb_biattention_kbit(_ptr(q), _ptr(k), _ptr(v), L, heads, head_size, float(step_v), _ptr(valid),
                                        _ptr(out), hd, _ptr(cnt)), "biattention_kbit")
    return (out, cnt) if counts else out


def softmax_attention_kbit(q: np.ndarray, k: np.ndarray, v: np.ndarray, steps: tuple[float, float, float], heads: int,
                           head_size: int, key_valid: np.ndarray, bits: int,
                           counts: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Softmax attention of one sequence on k-bit Q, K, V given as levels (int8 [L, heads *
    head_size]) and their steps (bb_softmax_attention_kbit): per head, the exact integer scores
    q . k scaled, a float32 softmax over the valid keys (a fixed order, every kernel family
    alike), its probabilities rounded to the grid of 2^bits - 1 steps, and context =
    fl(integer sum_j grid_ij level_v * fl(step_v / (2^bits - 1))): float [L, heads * head_size];
    with counts also the integer sums, int32. `bibert.packed.engine.softmax_attention_kbit` is
    the same formula in NumPy (its exp and sum order differ in the last bits)."""
    q, k, v = (np.ascontiguousarray(a, dtype=np.int8) for a in (q, k, v))
    hd = heads * head_size
    L = q.shape[0] if q.ndim == 2 else 0
    if L < 1 or heads < 1 or head_size < 1 or any(a.shape != (L, hd) for a in (q, k, v)):
        raise BibertError(f"softmax_attention_kbit: levels must be [L, {hd}] int8, one shape for Q, K and V")
    _shape(np.asarray(key_valid), (L,), "softmax_attention_kbit: key_valid")
    bits = _kbits(bits, "softmax_attention_kbit")
    valid = pack_bool(np.asarray(key_valid)[None])
    out = np.empty((L, hd), dtype=np.float32)
    cnt = np.empty((L, hd), dtype=np.int32) if counts else None
    step_q, step_k, step_v = (float(s) for s in steps)
    _check_rc(lib().bb_softmax_attention_kbit(_ptr(q), _ptr(k), _ptr(v), L, heads, head_size, bits, step_q, step_k,
                                              step_v, _ptr(valid), _ptr(out), hd, _ptr(cnt)),
              "softmax_attention_kbit")
    return (out, cnt) if counts else out


def gelu(x: np.ndarray) -> np.ndarray:
    """GELU of float [M, C] (erf form, float32; close to, not bit-identical with, torch's)."""
    x = _matrix(_f32(x), "gelu: x")
    out = np.empty_like(x)
    _check_rc(lib().bb_gelu(_ptr(x), x.shape[0], x.shape[1], _ptr(out)), "gelu")
    return out
