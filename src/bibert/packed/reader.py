"""The packed 1-bit model file: its layout, its bits, and reading it back with checks. Needs
NumPy only (exporting from a student, which needs PyTorch, is `bibert.packed.exporter`).

Layout (docs/packed_format.md has the full description):

    magic "BIBERTPK" (8 bytes) | format version u32 LE | reserved u32 | header length u64 LE
    | header: UTF-8 JSON, space-padded so that the data starts 64-byte aligned
    | data: tensors and tokenizer files (xz), each at a 64-byte aligned offset (zero padding)
    | SHA-256 of every byte before it (32 bytes)

Binarized weights (every encoder Linear, the pooler and the word embedding) are stored
as sign bits, row-major uint64 words: bit 1 <=> -1, element j in word j // 64, bit j % 64,
padding bits 0 (`pack_bool`); beside them the per-row scale alpha. Everything else (biases,
LayerNorms, position / token-type embeddings, classifier; an elastic student's per-channel
thresholds and scalar scales) is full precision in the chosen side dtype.

Files are untrusted input: `read_packed` checks every header field, entry and size against
what the config implies before anything is used, and `expected_tensors` is the one table
of the tensors a file holds (docs/packed_format.md, "Untrusted files").
"""
from __future__ import annotations

import hashlib
import json
import lzma
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..bert_names import (ATTENTION_OUTPUT, BINARY_LINEARS, BODY, CLASSIFIER, FFN_IN, FFN_OUT, LAYER_NORMS,
                          LAYER_PREFIX, POOLER, SELF_ATTENTION, WORD_EMBEDDINGS)
from ..errors import BibertError, not_a_file

MAGIC = b"BIBERTPK"
PACKED_FORMAT_VERSION = 4  # the newest packed format version this bibert reads and writes
# What each version adds (docs/packed_format.md, "Versions"): a file is written with the
# lowest version that holds it, so a reader that predates a feature asks to upgrade. The
# mode says how a model's activations are binarized (`check_quantization`).
MODE_VERSION = {"sign": 1, "elastic": 2, "2-bit": 3, "4-bit": 3, "elastic-bi-max": 4}  # mode -> first version
ACTIVATION_CLIP_STD = "activation_clip_std"  # k-bit modes: the clip's multiple of the std (float32 [1])
ALIGN = 64
PREAMBLE = struct.Struct("<8sIIQ")  # magic, version, reserved, header length
DIGEST = 32
SIDE_DTYPES = {"float32": np.float32, "float16": np.float16, "fp32": np.float32, "fp16": np.float16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json",
                   "added_tokens.json")
BIT_ORDER = "bit 1 = -1; element j in uint64 word j//64, bit j%64"
HEADER_SIDE_DTYPES = ("float32", "float16")  # the side_dtype values a header may hold
ENTRY_KEYS = {"kind", "name", "dtype", "shape", "offset", "nbytes"}
# the activations that keep the sign of their input, as the student's (bibert.modeling.GELU_FAMILY):
# the engine takes FFN-out's input bits from the pre-activation
GELU_ACTIVATIONS = ("gelu", "gelu_new", "gelu_python", "gelu_pytorch_tanh", "gelu_accurate")

# What a reader accepts. Sizes: far above any BERT, low enough that no size arithmetic can
# overflow. Every size must also agree with the tensors actually in the file.
CONFIG_LIMITS = {  # config field: (lowest, highest)
    "hidden_size": (1, 16384),
    "num_attention_heads": (1, 1024),
    "intermediate_size": (1, 65536),
    "num_hidden_layers": (1, 256),
    "vocab_size": (1, 1 << 22),
    "max_position_embeddings": (1, 1 << 16),
    "type_vocab_size": (1, 1024),
}
MAX_LABELS = 1 << 16
MAX_LABEL_CHARS = 1000
MAX_HEADER_BYTES = 16 << 20
MAX_FILE_BYTES = 64 << 20  # one tokenizer file, decompressed
XZ_MEMLIMIT = 256 << 20  # the xz decoder's memory (the writer's preset needs about 65 MiB)


@dataclass
class PackedFile:
    """A packed model in memory: the header's config, named arrays and tokenizer files."""

    config: dict  # Hugging Face BertConfig dict (with id2label, num_labels, ...)
    quantization: dict
    side_dtype: str
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)
    format_version: int = PACKED_FORMAT_VERSION


def words(bits: int) -> int:
    """uint64 words holding `bits` bits."""
    return (bits + 63) // 64


def pack_bool(b: np.ndarray) -> np.ndarray:
    """bool rows [M, K] -> bit rows uint64 [M, words(K)]: bit set where True, padding bits 0.
    Sign bits of values x are pack_bool(x < 0) (sign(x) = +1 iff x >= 0)."""
    b = np.asarray(b, dtype=bool)
    M, K = b.shape
    padded = np.zeros((M, words(K) * 64), dtype=bool)
    padded[:, :K] = b
    return np.packbits(padded, axis=1, bitorder="little").view("<u8").astype(np.uint64)


def unpack_bool(bits: np.ndarray, K: int) -> np.ndarray:
    """bit rows uint64 [M, W] -> bool [M, K]."""
    bits = np.ascontiguousarray(bits, dtype="<u8")
    return np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little")[:, :K].astype(bool)


def aligned(n: int) -> int:
    """n rounded up to the data section's alignment."""
    return -(-n // ALIGN) * ALIGN


def required_version(mode: str) -> int:
    """The lowest format version that holds a model of this mode (`check_quantization`): the
    version a file is written with."""
    return MODE_VERSION[mode]


# ---- nothing in a file is trusted ------------------------------------------------------


class _Invalid(Exception):
    """Why a packed file is not valid: the field and what is wrong with it."""


def _show(value) -> str:
    """A short repr of a header value for an error message."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _integer(value, field: str, lo: int, hi: int) -> int:
    """value is a JSON integer (not a bool or a float) in [lo, hi]."""
    if type(value) is not int or not lo <= value <= hi:
        raise _Invalid(f"{field} is {_show(value)}; it must be an integer in [{lo}, {hi}]")
    return value


def _string(value, field: str, choices: tuple[str, ...] | None = None) -> str:
    """value is a string (one of `choices`, if given)."""
    if not isinstance(value, str) or (choices is not None and value not in choices):
        wanted = ("a string" if choices is None else repr(choices[0]) if len(choices) == 1
                  else "one of " + ", ".join(repr(c) for c in choices))
        raise _Invalid(f"{field} is {_show(value)}; it must be {wanted}")
    return value


def _object(value, field: str) -> dict:
    """value is a JSON object."""
    if not isinstance(value, dict):
        raise _Invalid(f"{field} is {_show(value)}; it must be a JSON object")
    return value


def _keys(obj: dict, field: str, required: set[str], optional: set[str] = frozenset()) -> None:
    """obj has every key of `required` and no key outside `required | optional`."""
    missing = sorted(required - obj.keys())
    if missing:
        raise _Invalid(f"{field} lacks the field {missing[0]!r}")
    unknown = sorted(obj.keys() - required - optional)
    if unknown:
        raise _Invalid(f"{field} has an unknown field {_show(unknown[0])}")


def _no_duplicates(pairs: list) -> dict:
    """JSON object hook: a key given twice makes the object ambiguous."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen = set()
        duplicate = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _Invalid(f"a JSON object repeats the key {_show(duplicate)}")
    return obj


def _finite_float(text: str) -> float:
    """JSON number hook: a float literal that overflows to infinity is refused."""
    value = float(text)
    if not math.isfinite(value):
        raise _Invalid(f"the number {_show(text)} is out of range")
    return value


def _no_constant(text: str):
    """JSON constant hook: NaN and Infinity are not JSON."""
    raise _Invalid(f"{text} is not a JSON value")


def _load_json(raw: bytes, what: str):
    """Strict JSON of UTF-8 text: no repeated keys, no NaN / Infinity, no overflowing numbers."""
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise _Invalid(f"{what} is not UTF-8 text") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_float=_finite_float,
                          parse_constant=_no_constant)
    except _Invalid as exc:
        raise _Invalid(f"{what}: {exc}") from None
    except (ValueError, RecursionError) as exc:
        raise _Invalid(f"{what} is not valid JSON ({str(exc)[:80]})") from None


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a packed model, read from its config and checked."""

    hidden: int
    heads: int
    intermediate: int
    layers: int
    vocab: int
    positions: int
    token_types: int
    layer_norm_eps: float
    labels: tuple[str, ...]  # label names, id order

    @property
    def head_size(self) -> int:
        return self.hidden // self.heads

    @property
    def num_labels(self) -> int:
        return len(self.labels)


def model_shape(config) -> ModelShape:
    """Checks the header's config (every field the engine reads: its type, its range and
    how it agrees with the others) and returns the model's sizes."""
    config = _object(config, "config")
    missing = [name for name in (*CONFIG_LIMITS, "model_type", "hidden_act", "layer_norm_eps", "id2label")
               if name not in config]  # the engine reads no other field (dropout, label2id, ...)
    if missing:
        raise _Invalid(f"config lacks the field {missing[0]!r}")
    c = {name: _integer(config[name], f"config.{name}", lo, hi) for name, (lo, hi) in CONFIG_LIMITS.items()}
    if c["hidden_size"] % c["num_attention_heads"]:
        raise _Invalid(f"config.num_attention_heads is {c['num_attention_heads']}; it must divide "
                       f"config.hidden_size ({c['hidden_size']})")
    _string(config["model_type"], "config.model_type", ("bert",))
    _string(config["hidden_act"], "config.hidden_act", GELU_ACTIVATIONS)
    positions = config.get("position_embedding_type", "absolute")
    if positions is not None:
        _string(positions, "config.position_embedding_type", ("absolute",))
    eps = config["layer_norm_eps"]
    if type(eps) not in (int, float) or not 0 < eps <= 1:
        raise _Invalid(f"config.layer_norm_eps is {_show(eps)}; it must be a number in (0, 1]")
    id2label = _object(config["id2label"], "config.id2label")
    if not 1 <= len(id2label) <= MAX_LABELS:
        raise _Invalid(f"config.id2label has {len(id2label)} labels; a classifier has 1 to {MAX_LABELS}")
    labels = []
    for i in range(len(id2label)):
        if str(i) not in id2label:
            raise _Invalid(f"config.id2label lacks label id {i}; its keys must be \"0\" to \"{len(id2label) - 1}\"")
        name = id2label[str(i)]
        if not isinstance(name, str) or len(name) > MAX_LABEL_CHARS:
            raise _Invalid(f"config.id2label[\"{i}\"] is {_show(name)}; it must be a string of at most "
                           f"{MAX_LABEL_CHARS} characters")
        labels.append(name)
    if "num_labels" in config:
        _integer(config["num_labels"], "config.num_labels", len(labels), len(labels))  # as many as id2label
    return ModelShape(c["hidden_size"], c["num_attention_heads"], c["intermediate_size"], c["num_hidden_layers"],
                      c["vocab_size"], c["max_position_embeddings"], c["type_vocab_size"], float(eps), tuple(labels))


def check_quantization(quantization) -> str:
    """The student's quantization must be one the engine computes: binary weights and word
    embedding, Bi-Attention, and 1-bit activations (sign, or elastic: docs/method.md §7) or
    2- or 4-bit ones (bit-serial); attention "bi", or "bi-max" with elastic activations.
    Returns the mode: "sign", "elastic", "elastic-bi-max", "2-bit" or "4-bit"."""
    from ..config import QuantConfig

    q = _object(quantization, "quantization")
    _keys(q, "quantization", {"weight_bits", "embedding_bits", "activation_bits", "attention", "version"},
          {"activations"})
    for name in ("weight_bits", "embedding_bits"):
        _integer(q[name], f"quantization.{name}", 1, 1)
    bits = q["activation_bits"]
    if type(bits) is not int or bits not in (1, 2, 4):
        raise _Invalid(f"quantization.activation_bits is {_show(bits)}; it must be 1, 2 or 4")
    attention = _string(q["attention"], "quantization.attention", ("bi", "bi-max"))
    _integer(q["version"], "quantization.version", 1, QuantConfig.VERSION)
    activations = "sign" if "activations" not in q else \
        _string(q["activations"], "quantization.activations", ("sign", "elastic"))
    if bits > 1:
        if activations != "sign":
            raise _Invalid(f"quantization.activations is {activations!r} with {bits}-bit activations; it must be "
                           "'sign'")
        if attention != "bi":
            raise _Invalid(f"quantization.attention is {attention!r} with {bits}-bit activations; it must be 'bi'")
        return f"{bits}-bit"
    if attention == "bi-max":
        if activations != "elastic":
            raise _Invalid(f"quantization.attention is 'bi-max' with activations {activations!r}; it needs "
                           "'elastic'")
        return "elastic-bi-max"
    return activations


@dataclass(frozen=True)
class TensorSpec:
    """What one tensor entry must be: its dtype (NumPy type string) and shape; for sign-bit
    rows, `width` is the number of meaningful bits in a row (the padding bits after it are 0);
    for a relative Bi-Attention table, `counts` is the head size d (`_check_count_minima`)."""

    dtype: str
    shape: tuple[int, ...]
    width: int | None = None
    counts: int | None = None


QUANTIZER_THRESHOLD, QUANTIZER_SCALE = ".input_quantizer.threshold", ".input_quantizer.scale"
SCORE_THRESHOLD = f"{SELF_ATTENTION}.score_quantizer.threshold"  # per head; 0 is the paper's Bi-Attention
# "bi-max": per head and row maximum c_max, the smallest attended count (`exporter.score_count_minima`)
SCORE_COUNT_MIN = f"{SELF_ATTENTION}.score_quantizer.count_min"
TRAINING_ONLY = (".window",)  # state-dict entries that do not change the forward (a quantizer's STE window)
# elastic binarization: the modules whose input quantizer a file holds, per layer (and the
# pooler); attention.self's one quantizer feeds query, key and value (docs/method.md §7)
ELASTIC_INPUTS = (SELF_ATTENTION, ATTENTION_OUTPUT, FFN_IN, FFN_OUT)
EMBEDDINGS = f"{BODY}.embeddings."  # the full-precision embedding tables and their LayerNorm
POOLER_DENSE = f"{BODY}.{POOLER}"


def expected_tensors(config, side_dtype: str, mode: str = "sign") -> dict[str, TensorSpec]:
    """Every tensor entry of a packed model with this config, side dtype and mode
    (`check_quantization`), in file order: the one place that says which tensors a file
    holds (a format addition is a new row here). Raises _Invalid for a config the engine
    cannot run."""
    s = model_shape(config)
    _string(mode, "the quantization mode", tuple(MODE_VERSION))
    activations = mode
    side = np.dtype(SIDE_DTYPES[_string(side_dtype, "side_dtype", HEADER_SIDE_DTYPES)]).newbyteorder("<").str
    H, I = s.hidden, s.intermediate
    table: dict[str, TensorSpec] = {}

    def binary(name: str, out: int, width: int, bias: bool = True) -> None:
        table[name + ".bits"] = TensorSpec("<u8", (out, -(-width // 64)), width)
        table[name + ".alpha"] = TensorSpec(side, (out,))
        if bias:
            table[name + ".bias"] = TensorSpec(side, (out,))

    def full(name: str, *shape: int) -> None:
        table[name] = TensorSpec(side, shape)

    def quantizer(name: str, channels: int) -> None:  # elastic: threshold per channel, one scale
        if activations in ("elastic", "elastic-bi-max"):
            full(name + QUANTIZER_THRESHOLD, channels)
            full(name + QUANTIZER_SCALE, 1)

    e = EMBEDDINGS
    binary(f"{BODY}.{WORD_EMBEDDINGS}", s.vocab, H, bias=False)
    full(e + "position_embeddings.weight", s.positions, H)
    full(e + "token_type_embeddings.weight", s.token_types, H)
    full(e + "LayerNorm.weight", H)
    full(e + "LayerNorm.bias", H)
    linear_sizes = {FFN_IN: (I, H), FFN_OUT: (H, I)}  # (out, in); the others H x H
    for n in range(s.layers):
        p = LAYER_PREFIX.format(n)
        for lin in BINARY_LINEARS:
            binary(p + lin, *linear_sizes.get(lin, (H, H)))
        for ln in LAYER_NORMS:
            full(p + ln + ".weight", H)
            full(p + ln + ".bias", H)
        for module in ELASTIC_INPUTS:
            quantizer(p + module, I if module == FFN_OUT else H)
        if activations == "elastic":
            full(p + SCORE_THRESHOLD, s.heads)
        elif activations == "elastic-bi-max":
            table[p + SCORE_COUNT_MIN] = TensorSpec("<i4", (s.heads, s.head_size + 1), counts=s.head_size)
    binary(POOLER_DENSE, H, H)
    quantizer(POOLER_DENSE, H)
    if mode in ("2-bit", "4-bit"):
        table[ACTIVATION_CLIP_STD] = TensorSpec("<f4", (1,))
    full(f"{CLASSIFIER}.weight", s.num_labels, H)
    full(f"{CLASSIFIER}.bias", s.num_labels)
    return table


def _check_padding(name: str, bits: np.ndarray, width: int) -> None:
    """The bits after `width` in each row of sign bits must be 0."""
    if width % 64:
        tail = bits[:, -1] & ~np.uint64((1 << (width % 64)) - 1)
        if tail.any():
            raise _Invalid(f"tensor {name}: padding bits after bit {width} of a row are not 0")


def _check_count_minima(name: str, table: np.ndarray, d: int) -> None:
    """A relative Bi-Attention table [heads, d + 1] (`score_count_minima`): column j, for a row
    whose best real key has the count c_max = 2j - d, holds the smallest attended count, a
    count (-d to d, of d's parity) of at most c_max, or d + 2 where the row attends to nothing;
    a head either attends its best key for every c_max or never; the smallest attended count
    never falls as c_max rises."""
    c = table.astype(np.int64)
    if np.any((c < -d) | (c > d + 2) | ((c + d) % 2 != 0)):
        raise _Invalid(f"tensor {name}: a count is not one of -{d}, -{d - 2}, ..., {d + 2}")
    none = c == d + 2
    if np.any(none.any(axis=1) & ~none.all(axis=1)):
        raise _Invalid(f"tensor {name}: a head attends to nothing for some row maxima but not for all")
    c_max = np.arange(-d, d + 1, 2)
    if np.any(~none & (c > c_max[None, :])):
        raise _Invalid(f"tensor {name}: a smallest attended count exceeds its row maximum")
    if np.any(np.diff(c, axis=1) < 0):
        raise _Invalid(f"tensor {name}: the smallest attended count falls as the row maximum rises")


def _check_values(name: str, arr: np.ndarray, spec: TensorSpec) -> None:
    """The values a tensor's spec constrains: zero padding bits, a valid relative table."""
    if spec.width is not None:
        _check_padding(name, arr, spec.width)
    if spec.counts is not None:
        _check_count_minima(name, arr, spec.counts)


def _check_tokenizer_steps(tokenizer: dict) -> None:
    """tokenizer.json's text steps (normalizer, pre-tokenizer, post-processor, decoder) hold
    no regular expression: the tokenizers library runs them with a backtracking engine, where
    a crafted pattern can take minutes on an ordinary text (BERT's own steps use none)."""
    stack = [tokenizer.get(step) for step in ("normalizer", "pre_tokenizer", "post_processor", "decoder")]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if "Regex" in node:
                raise _Invalid("file tokenizer.json: a normalizer, pre-tokenizer, post-processor or decoder step "
                               f"holds a regular expression ({_show(node['Regex'])}), which the loader refuses")
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def _check_file(name: str, raw: bytes) -> None:
    """A tokenizer file is UTF-8 text; a .json one is a JSON object; tokenizer.json holds no
    regular expression in its text steps."""
    if name.endswith(".json"):
        content = _object(_load_json(raw, f"file {name}"), f"file {name}")
        if name == "tokenizer.json":
            _check_tokenizer_steps(content)
    else:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _Invalid(f"file {name} is not UTF-8 text") from None


def _decompress(raw: bytes, compression: str | None, name: str) -> bytes:
    """A file entry's bytes, decompressed to at most MAX_FILE_BYTES (a larger output, a damaged
    or truncated stream, or data after its end make the file invalid)."""
    if compression is None:
        return raw
    d = lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=XZ_MEMLIMIT)
    try:
        out = d.decompress(raw, max_length=MAX_FILE_BYTES + 1)
    except lzma.LZMAError as exc:
        raise _Invalid(f"file {name}: the xz data is damaged ({exc})") from None
    if len(out) > MAX_FILE_BYTES:
        raise _Invalid(f"file {name} decompresses to more than {MAX_FILE_BYTES} bytes")
    if not d.eof:
        raise _Invalid(f"file {name}: the xz data is truncated")
    if d.unused_data:
        raise _Invalid(f"file {name}: data follows the end of the xz stream")
    return out


@dataclass(frozen=True)
class _Entry:
    kind: str
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    compression: str | None = None


def _check_entry(e, i: int, table: dict[str, TensorSpec], data_len: int) -> _Entry:
    """One entry of the header's list: its kind and name (a tensor of the table or a file of
    the fixed tokenizer list), dtype, shape and byte count as the config implies, and an
    aligned offset that keeps it inside the data section."""
    e = _object(e, f"entries[{i}]")
    name = _string(e.get("name"), f"entries[{i}].name")
    kind = _string(e.get("kind"), f"entries[{i}].kind", ("tensor", "file"))
    if kind == "file":
        if name not in TOKENIZER_FILES:  # never a path: only these exact names
            raise _Invalid(f"file entry {_show(name)}: a file entry must be one of {', '.join(TOKENIZER_FILES)}")
        where = f"file entry {name}"
        _keys(e, where, ENTRY_KEYS, {"compression"})
    else:
        if name not in table:
            raise _Invalid(f"tensor entry {_show(name)} is not a tensor of a model with this config")
        where = f"tensor entry {name}"
        _keys(e, where, ENTRY_KEYS)
    nbytes = _integer(e["nbytes"], f"{where}: nbytes", 0, data_len)
    offset = _integer(e["offset"], f"{where}: offset", 0, data_len)
    if offset % ALIGN:
        raise _Invalid(f"{where}: offset {offset} is not a multiple of {ALIGN}")
    if offset + nbytes > data_len:
        raise _Invalid(f"{where} ends at byte {offset + nbytes} of a data section of {data_len} bytes")
    dtype = _string(e["dtype"], f"{where}: dtype", (table[name].dtype if kind == "tensor" else "|u1",))
    shape = e["shape"]
    if not isinstance(shape, list) or len(shape) > 4 or any(type(d) is not int for d in shape):
        raise _Invalid(f"{where}: shape is {_show(shape)}; it must be a list of integers")
    wanted = table[name].shape if kind == "tensor" else (nbytes,)
    if tuple(shape) != wanted:
        source = "the config implies" if kind == "tensor" else "its nbytes imply"
        raise _Invalid(f"{where}: shape is {_show(shape)}; {source} {list(wanted)}")
    if nbytes != math.prod(wanted) * np.dtype(dtype).itemsize:
        raise _Invalid(f"{where}: nbytes is {nbytes}; a {dtype} array of shape {list(wanted)} has "
                       f"{math.prod(wanted) * np.dtype(dtype).itemsize}")
    compression = None
    if kind == "file":
        if "compression" in e:
            compression = _string(e["compression"], f"{where}: compression", ("xz",))
        elif nbytes > MAX_FILE_BYTES:
            raise _Invalid(f"{where} holds {nbytes} bytes; a tokenizer file has at most {MAX_FILE_BYTES}")
    return _Entry(kind, name, dtype, wanted, offset, nbytes, compression)


def _check_entries(entries, table: dict[str, TensorSpec], data_len: int) -> list[_Entry]:
    """The header's entry list: every entry valid, no name twice, every tensor of the table
    present, a tokenizer present, and no two entries sharing a byte."""
    if not isinstance(entries, list):
        raise _Invalid(f"entries is {_show(entries)}; it must be a list")
    if len(entries) > len(table) + len(TOKENIZER_FILES):
        raise _Invalid(f"entries lists {len(entries)} entries; a model with this config has at most "
                       f"{len(table) + len(TOKENIZER_FILES)}")
    checked, names = [], set()
    for i, e in enumerate(entries):
        entry = _check_entry(e, i, table, data_len)
        if entry.name in names:
            raise _Invalid(f"entry {entry.name} appears twice")
        names.add(entry.name)
        checked.append(entry)
    missing = [name for name in table if name not in names]
    if missing:
        raise _Invalid(f"tensor entry {missing[0]} is missing")
    if not names & {"tokenizer.json", "vocab.txt"}:
        raise _Invalid("there is no tokenizer (file entry tokenizer.json or vocab.txt)")
    end, last = 0, None
    for entry in sorted(checked, key=lambda x: (x.offset, x.nbytes)):
        if entry.offset < end:
            raise _Invalid(f"entries {last} and {entry.name} overlap")
        if entry.nbytes:
            end, last = entry.offset + entry.nbytes, entry.name
    return checked


def _check_header(header, version: int, data_len: int) -> tuple[dict[str, TensorSpec], list[_Entry]]:
    """The header object: known fields only, each of the right type and range, the config
    one the engine runs, and entries that match it."""
    header = _object(header, "the header")
    _keys(header, "header", {"format_version", "config", "quantization", "side_dtype", "entries"}, {"bit_order"})
    _integer(header["format_version"], "header.format_version (the preamble's version)", version, version)
    if "bit_order" in header:
        _string(header["bit_order"], "header.bit_order", (BIT_ORDER,))
    mode = check_quantization(header["quantization"])
    if required_version(mode) > version:
        raise _Invalid(f"quantization {mode!r} needs format version {required_version(mode)}; the file has "
                       f"version {version}")
    table = expected_tensors(header["config"], header["side_dtype"], mode)
    return table, _check_entries(header["entries"], table, data_len)


def _parse(raw: bytes, path: Path) -> PackedFile:
    """The packed model in `raw`: preamble, checksum, header, entries, data, each checked
    before it is used."""
    if len(raw) < PREAMBLE.size + DIGEST or raw[:8] != MAGIC:
        raise _Invalid("too short or bad magic (a packed model starts with BIBERTPK)")
    _, version, reserved, head_len = PREAMBLE.unpack_from(raw)
    if version > PACKED_FORMAT_VERSION:
        raise BibertError(f"{path} has packed format version {version}; this bibert reads up to "
                          f"{PACKED_FORMAT_VERSION}: upgrade bibert")
    if version < 1:
        raise _Invalid(f"format version {version}; versions start at 1")
    body, digest = memoryview(raw)[:-DIGEST], raw[-DIGEST:]
    if hashlib.sha256(body).digest() != digest:
        raise _Invalid("it is damaged or truncated (SHA-256 checksum mismatch); export it again")
    if reserved:
        raise _Invalid(f"the reserved preamble field is {reserved}; it must be 0")
    data_start = PREAMBLE.size + head_len
    if head_len > MAX_HEADER_BYTES or data_start > len(body) or data_start % ALIGN:
        raise _Invalid(f"the header length {head_len} does not fit the file (at most {MAX_HEADER_BYTES} bytes, "
                       f"ending at a multiple of {ALIGN} before the checksum)")
    header = _load_json(body[PREAMBLE.size:data_start], "the header")
    data = body[data_start:]
    table, entries = _check_header(header, version, len(data))
    packed = PackedFile(header["config"], header["quantization"], header["side_dtype"], format_version=version)
    for e in entries:
        chunk = data[e.offset:e.offset + e.nbytes]
        if e.kind == "file":
            content = _decompress(bytes(chunk), e.compression, e.name)
            _check_file(e.name, content)
            packed.files[e.name] = content
        else:
            arr = np.frombuffer(chunk, dtype=np.dtype(e.dtype)).reshape(e.shape)
            _check_values(e.name, arr, table[e.name])
            packed.tensors[e.name] = arr
    return packed


def _check_packed(packed: PackedFile) -> ModelShape:
    """A PackedFile in memory (read, or built by hand): its config, quantization and side
    dtype, exactly the table's tensors with their dtypes and shapes, zero padding bits, and
    tokenizer files of the fixed names only."""
    if not isinstance(packed, PackedFile) or not isinstance(packed.tensors, dict) or not isinstance(packed.files, dict):
        raise _Invalid("it is not a PackedFile with dictionaries of tensors and files")
    table = expected_tensors(packed.config, packed.side_dtype, check_quantization(packed.quantization))
    unexpected = sorted(map(str, packed.tensors.keys() - table.keys()))
    if unexpected:
        raise _Invalid(f"{_show(unexpected[0])} is not a tensor of a model with this config")
    for name, spec in table.items():
        arr = packed.tensors.get(name)
        if arr is None:
            raise _Invalid(f"tensor {name} is missing")
        if not isinstance(arr, np.ndarray) or arr.dtype.str != spec.dtype or arr.shape != spec.shape:
            got = f"{arr.dtype.str} {list(arr.shape)}" if isinstance(arr, np.ndarray) else type(arr).__name__
            raise _Invalid(f"tensor {name} is {got}; the config implies {spec.dtype} {list(spec.shape)}")
        _check_values(name, arr, spec)
    for name, content in packed.files.items():
        if name not in TOKENIZER_FILES or not isinstance(content, bytes):
            raise _Invalid(f"file {_show(name)}: files are bytes named one of {', '.join(TOKENIZER_FILES)}")
        _check_file(name, content)
    if not packed.files.keys() & {"tokenizer.json", "vocab.txt"}:
        raise _Invalid("there is no tokenizer (file tokenizer.json or vocab.txt)")
    return model_shape(packed.config)


def check_packed(packed: PackedFile, source: str = "the packed model") -> ModelShape:
    """`_check_packed` with its failure as a BibertError naming `source`."""
    try:
        return _check_packed(packed)
    except _Invalid as exc:
        raise BibertError(f"{source} is not a valid bibert file: {exc}") from None


def read_packed(path: str | os.PathLike) -> PackedFile:
    """Read and verify a packed model: magic, format version, SHA-256, then every header
    field and entry against what the config implies (docs/packed_format.md, "Untrusted
    files"). Any problem is a BibertError saying the file is not valid and why."""
    path = Path(path)
    if not path.is_file():
        raise not_a_file(path, "packed model", "a packed model is one file: write it from a student folder with "
                         "`bibert export --model DIR --out model.bibert`")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise BibertError(f"cannot read {path}: {exc.strerror or exc}") from None
    except MemoryError:
        raise BibertError(f"cannot read {path}: it does not fit in memory") from None
    try:
        return _parse(raw, path)
    except _Invalid as exc:
        raise BibertError(f"{path} is not a valid bibert file: {exc}") from None
