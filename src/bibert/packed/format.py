"""The packed model format's schema: what a valid `.bibert` file holds, in one place for its
reader (`bibert.packed.reader`) and its writer (`bibert.packed.writer`). NumPy only.

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

What is here:

- the constants of the layout (magic, preamble, alignment, versions, limits);
- `PackedQuant`, the typed description of a packed model's quantization, made once from the
  header's quantization object (`PackedQuant.from_dict`), with the format version it needs;
- `expected_tensors`, the one table of the tensors a file holds, from its config, side dtype
  and quantization;
- the checks of every header field, entry, tensor value and tokenizer file (`check_header`,
  `check_values`, `check_file`, `validate_packed`), which raise `PackedFormatError` naming the
  field and what is wrong with it.

Files are untrusted input: a reader checks every header field, entry and size against what
the config implies before anything is used (docs/packed_format.md, "Untrusted files").
"""
from __future__ import annotations

import json
import lzma
import math
import struct
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from ..bert_names import (ATTENTION_OUTPUT, BINARY_LINEARS, BODY, CLASSIFIER, FFN_IN, FFN_OUT, LAYER_NORMS,
                          LAYER_PREFIX, POOLER, SELF_ATTENTION, WORD_EMBEDDINGS)
from ..errors import BibertError

MAGIC = b"BIBERTPK"
PACKED_FORMAT_VERSION = 5  # the newest packed format version this bibert reads and writes
ACTIVATION_CLIP_STD = "activation_clip_std"  # k-bit activations: the clip's multiple of the std (float32 [1])
ALIGN = 64
PREAMBLE = struct.Struct("<8sIIQ")  # magic, version, reserved, header length
DIGEST = 32
SIDE_DTYPES = {"float32": np.float32, "float16": np.float16, "fp32": np.float32, "fp16": np.float16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json",
                   "added_tokens.json")
BIT_ORDER = "bit 1 = -1; element j in uint64 word j//64, bit j%64"
HEADER_SIDE_DTYPES = ("float32", "float16")  # the side_dtype values a header may hold
HEADER_KEYS = {"format_version", "config", "quantization", "side_dtype", "entries"}  # and "bit_order", optional
ENTRY_KEYS = {"kind", "name", "dtype", "shape", "offset", "nbytes"}  # and "compression" (xz), files only
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
XZ_PRESET = 9 | lzma.PRESET_EXTREME  # the writer's xz preset for tokenizer files
XZ_MEMLIMIT = 256 << 20  # the xz decoder's memory (XZ_PRESET needs about 65 MiB)


@dataclass
class PackedFile:
    """A packed model in memory: the header's config, named arrays and tokenizer files."""

    config: dict  # Hugging Face BertConfig dict (with id2label, num_labels, ...)
    quantization: dict  # the student's QuantConfig.to_dict(), as written (`PackedQuant.from_dict`)
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


# ---- nothing in a file is trusted ------------------------------------------------------


class PackedFormatError(BibertError):
    """Why a packed model is not valid: the field and what is wrong with it. The reader, the
    writer and the engine turn it into a BibertError that names the file."""


def _show(value) -> str:
    """A short repr of a header value for an error message."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _integer(value, field: str, lo: int, hi: int) -> int:
    """value is a JSON integer (not a bool or a float) in [lo, hi]."""
    if type(value) is not int or not lo <= value <= hi:
        raise PackedFormatError(f"{field} is {_show(value)}; it must be an integer in [{lo}, {hi}]")
    return value


def _string(value, field: str, choices: tuple[str, ...] | None = None) -> str:
    """value is a string (one of `choices`, if given)."""
    if not isinstance(value, str) or (choices is not None and value not in choices):
        wanted = ("a string" if choices is None else repr(choices[0]) if len(choices) == 1
                  else "one of " + ", ".join(repr(c) for c in choices))
        raise PackedFormatError(f"{field} is {_show(value)}; it must be {wanted}")
    return value


def _object(value, field: str) -> dict:
    """value is a JSON object."""
    if not isinstance(value, dict):
        raise PackedFormatError(f"{field} is {_show(value)}; it must be a JSON object")
    return value


def _keys(obj: dict, field: str, required: set[str], optional: set[str] = frozenset()) -> None:
    """obj has every key of `required` and no key outside `required | optional`."""
    missing = sorted(required - obj.keys())
    if missing:
        raise PackedFormatError(f"{field} lacks the field {missing[0]!r}")
    unknown = sorted(obj.keys() - required - optional)
    if unknown:
        raise PackedFormatError(f"{field} has an unknown field {_show(unknown[0])}")


def _no_duplicates(pairs: list) -> dict:
    """JSON object hook: a key given twice makes the object ambiguous."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen = set()
        duplicate = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise PackedFormatError(f"a JSON object repeats the key {_show(duplicate)}")
    return obj


def _finite_float(text: str) -> float:
    """JSON number hook: a float literal that overflows to infinity is refused."""
    value = float(text)
    if not math.isfinite(value):
        raise PackedFormatError(f"the number {_show(text)} is out of range")
    return value


def _no_constant(text: str):
    """JSON constant hook: NaN and Infinity are not JSON."""
    raise PackedFormatError(f"{text} is not a JSON value")


def load_json(raw: bytes, what: str):
    """Strict JSON of UTF-8 text: no repeated keys, no NaN / Infinity, no overflowing numbers."""
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise PackedFormatError(f"{what} is not UTF-8 text") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_float=_finite_float,
                          parse_constant=_no_constant)
    except PackedFormatError as exc:
        raise PackedFormatError(f"{what}: {exc}") from None
    except (ValueError, RecursionError) as exc:
        raise PackedFormatError(f"{what} is not valid JSON ({str(exc)[:80]})") from None


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
        raise PackedFormatError(f"config lacks the field {missing[0]!r}")
    c = {name: _integer(config[name], f"config.{name}", lo, hi) for name, (lo, hi) in CONFIG_LIMITS.items()}
    if c["hidden_size"] % c["num_attention_heads"]:
        raise PackedFormatError(f"config.num_attention_heads is {c['num_attention_heads']}; it must divide "
                                f"config.hidden_size ({c['hidden_size']})")
    _string(config["model_type"], "config.model_type", ("bert",))
    _string(config["hidden_act"], "config.hidden_act", GELU_ACTIVATIONS)
    positions = config.get("position_embedding_type", "absolute")
    if positions is not None:
        _string(positions, "config.position_embedding_type", ("absolute",))
    eps = config["layer_norm_eps"]
    if type(eps) not in (int, float) or not 0 < eps <= 1:
        raise PackedFormatError(f"config.layer_norm_eps is {_show(eps)}; it must be a number in (0, 1]")
    id2label = _object(config["id2label"], "config.id2label")
    if not 1 <= len(id2label) <= MAX_LABELS:
        raise PackedFormatError(f"config.id2label has {len(id2label)} labels; a classifier has 1 to {MAX_LABELS}")
    labels = []
    for i in range(len(id2label)):
        if str(i) not in id2label:
            raise PackedFormatError(f"config.id2label lacks label id {i}; its keys must be \"0\" to "
                                    f"\"{len(id2label) - 1}\"")
        name = id2label[str(i)]
        if not isinstance(name, str) or len(name) > MAX_LABEL_CHARS:
            raise PackedFormatError(f"config.id2label[\"{i}\"] is {_show(name)}; it must be a string of at most "
                                    f"{MAX_LABEL_CHARS} characters")
        labels.append(name)
    if "num_labels" in config:
        _integer(config["num_labels"], "config.num_labels", len(labels), len(labels))  # as many as id2label
    return ModelShape(c["hidden_size"], c["num_attention_heads"], c["intermediate_size"], c["num_hidden_layers"],
                      c["vocab_size"], c["max_position_embeddings"], c["type_vocab_size"], float(eps), tuple(labels))


ACTIVATION_BITS = (1, 2, 4)  # 1: one bit-plane; 2, 4: k-bit activations, run bit-serially
ACTIVATION_KINDS = ("sign", "elastic")  # how 1-bit activations are binarized
ATTENTION_KINDS = ("bi", "bi-max", "softmax")  # Bi-Attention, relative to a query's best key, or softmax (k-bit)


def _activation_bits(value) -> int:
    """value is one of ACTIVATION_BITS (an integer, not a bool)."""
    if type(value) is not int or value not in ACTIVATION_BITS:
        raise PackedFormatError(f"quantization.activation_bits is {_show(value)}; it must be 1, 2 or 4")
    return value


@dataclass(frozen=True)
class PackedQuant:
    """The quantization of a packed model, as the engine computes it: binary weights and word
    embedding, Bi-Attention, and

        activation_bits  1, or 2 / 4: k-bit activations, run bit-serially;
        activations      "sign" (the paper's sign(x)) or "elastic" (docs/method.md §7),
                         "elastic" with 1-bit activations only;
        attention        "bi", or "bi-max" (relative to each query's best key) with elastic
                         activations only.

    Made once from a file's quantization object with `from_dict`, which checks every field;
    building one checks the same combinations, with the same messages. Every valid
    description is a key of QUANT_VERSIONS."""

    activation_bits: int = 1
    activations: Literal["sign", "elastic"] = "sign"
    attention: Literal["bi", "bi-max", "softmax"] = "bi"

    def __post_init__(self) -> None:
        bits = _activation_bits(self.activation_bits)
        attention = _string(self.attention, "quantization.attention", ATTENTION_KINDS)
        activations = _string(self.activations, "quantization.activations", ACTIVATION_KINDS)
        if bits > 1:
            if activations != "sign":
                raise PackedFormatError(f"quantization.activations is {activations!r} with {bits}-bit activations; "
                                        "it must be 'sign'")
            if attention not in ("bi", "softmax"):
                raise PackedFormatError(f"quantization.attention is {attention!r} with {bits}-bit activations; it "
                                        "must be 'bi' or 'softmax'")
        elif attention == "softmax":
            raise PackedFormatError("quantization.attention is 'softmax' with 1-bit activations; softmax attention "
                                    "is packed with 2- or 4-bit activations only")
        elif attention == "bi-max" and activations != "elastic":
            raise PackedFormatError(f"quantization.attention is 'bi-max' with activations {activations!r}; it needs "
                                    "'elastic'")

    @classmethod
    def from_dict(cls, quantization) -> "PackedQuant":
        """The description of a file's quantization object (the student's `QuantConfig.to_dict()`),
        checked: known fields only, binary weights and word embedding, a quantization config
        version this bibert knows ("activations" is absent in version 1: "sign"), and a
        combination the engine computes."""
        from ..config import QuantConfig

        q = _object(quantization, "quantization")
        _keys(q, "quantization", {"weight_bits", "embedding_bits", "activation_bits", "attention", "version"},
              {"activations"})
        for name in ("weight_bits", "embedding_bits"):
            _integer(q[name], f"quantization.{name}", 1, 1)
        bits = _activation_bits(q["activation_bits"])
        attention = _string(q["attention"], "quantization.attention", ATTENTION_KINDS)
        _integer(q["version"], "quantization.version", 1, QuantConfig.VERSION)
        activations = "sign" if "activations" not in q else \
            _string(q["activations"], "quantization.activations", ACTIVATION_KINDS)
        return cls(bits, activations, attention)

    def to_dict(self) -> dict:
        """The quantization object of a student with this quantization (`QuantConfig.to_dict()`,
        the current quantization config version)."""
        from ..config import QuantConfig

        return QuantConfig(1, 1, self.activation_bits, self.attention, self.activations).to_dict()

    @property
    def is_kbit(self) -> bool:
        """2- or 4-bit activations: every quantized input is k bit-planes."""
        return self.activation_bits > 1

    @property
    def kbits(self) -> int:
        """k of k-bit activations; 0 for 1-bit ones."""
        return self.activation_bits if self.is_kbit else 0

    @property
    def elastic(self) -> bool:
        """Elastic binarization: per-channel thresholds and a scale on each quantized input."""
        return self.activations == "elastic"

    @property
    def softmax(self) -> bool:
        """Softmax attention on k-bit Q, K, V, its probabilities on a k-bit grid (the student's
        straightforward k-bit attention, docs/method.md §3)."""
        return self.attention == "softmax"

    @property
    def relative_attention(self) -> bool:
        """Attention "bi-max": each row's limits depend on its best real key."""
        return self.attention == "bi-max"

    @property
    def format_version(self) -> int:
        """The lowest format version that holds a model of this quantization: the version a
        file is written with."""
        return QUANT_VERSIONS[self]

    @property
    def name(self) -> str:
        """A short name for messages: "sign", "elastic", "elastic-bi-max", "2-bit" or "4-bit"."""
        if self.is_kbit:
            return f"{self.activation_bits}-bit" + ("-softmax" if self.softmax else "")
        return f"{self.activations}-{self.attention}" if self.relative_attention else self.activations

    def __str__(self) -> str:
        return self.name


# Every quantization the format holds, with the version that added it (docs/packed_format.md,
# "Versions"): a file is written with the lowest version that holds it, so that a reader that
# predates a feature asks to upgrade.
QUANT_VERSIONS: dict[PackedQuant, int] = {
    PackedQuant(1, "sign", "bi"): 1,
    PackedQuant(1, "elastic", "bi"): 2,
    PackedQuant(2, "sign", "bi"): 3,
    PackedQuant(4, "sign", "bi"): 3,
    PackedQuant(1, "elastic", "bi-max"): 4,
    PackedQuant(2, "sign", "softmax"): 5,
    PackedQuant(4, "sign", "softmax"): 5,
}


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


def expected_tensors(config, side_dtype: str, quant: PackedQuant = PackedQuant()) -> dict[str, TensorSpec]:
    """Every tensor entry of a packed model with this config, side dtype and quantization, in
    file order: the one place that says which tensors a file holds (a format addition is a
    new row here). Raises PackedFormatError for a config the engine cannot run."""
    if not isinstance(quant, PackedQuant):
        raise TypeError(f"quant is a {type(quant).__name__}; expected_tensors takes a PackedQuant")
    s = model_shape(config)
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
        if quant.elastic:
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
        if quant.relative_attention:
            table[p + SCORE_COUNT_MIN] = TensorSpec("<i4", (s.heads, s.head_size + 1), counts=s.head_size)
        elif quant.elastic:
            full(p + SCORE_THRESHOLD, s.heads)
    binary(POOLER_DENSE, H, H)
    quantizer(POOLER_DENSE, H)
    if quant.is_kbit:
        table[ACTIVATION_CLIP_STD] = TensorSpec("<f4", (1,))
    full(f"{CLASSIFIER}.weight", s.num_labels, H)
    full(f"{CLASSIFIER}.bias", s.num_labels)
    return table


def _check_padding(name: str, bits: np.ndarray, width: int) -> None:
    """The bits after `width` in each row of sign bits must be 0."""
    if width % 64:
        tail = bits[:, -1] & ~np.uint64((1 << (width % 64)) - 1)
        if tail.any():
            raise PackedFormatError(f"tensor {name}: padding bits after bit {width} of a row are not 0")


def _check_count_minima(name: str, table: np.ndarray, d: int) -> None:
    """A relative Bi-Attention table [heads, d + 1] (`score_count_minima`): column j, for a row
    whose best real key has the count c_max = 2j - d, holds the smallest attended count, a
    count (-d to d, of d's parity) of at most c_max, or d + 2 where the row attends to nothing;
    a head either attends its best key for every c_max or never; the smallest attended count
    never falls as c_max rises."""
    c = table.astype(np.int64)
    if np.any((c < -d) | (c > d + 2) | ((c + d) % 2 != 0)):
        raise PackedFormatError(f"tensor {name}: a count is not one of -{d}, -{d - 2}, ..., {d + 2}")
    none = c == d + 2
    if np.any(none.any(axis=1) & ~none.all(axis=1)):
        raise PackedFormatError(f"tensor {name}: a head attends to nothing for some row maxima but not for all")
    c_max = np.arange(-d, d + 1, 2)
    if np.any(~none & (c > c_max[None, :])):
        raise PackedFormatError(f"tensor {name}: a smallest attended count exceeds its row maximum")
    if np.any(np.diff(c, axis=1) < 0):
        raise PackedFormatError(f"tensor {name}: the smallest attended count falls as the row maximum rises")


def check_values(name: str, arr: np.ndarray, spec: TensorSpec) -> None:
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
                raise PackedFormatError("file tokenizer.json: a normalizer, pre-tokenizer, post-processor or decoder "
                                        f"step holds a regular expression ({_show(node['Regex'])}), which the loader "
                                        "refuses")
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def check_file(name: str, raw: bytes) -> None:
    """A tokenizer file is UTF-8 text; a .json one is a JSON object; tokenizer.json holds no
    regular expression in its text steps."""
    if name.endswith(".json"):
        content = _object(load_json(raw, f"file {name}"), f"file {name}")
        if name == "tokenizer.json":
            _check_tokenizer_steps(content)
    else:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            raise PackedFormatError(f"file {name} is not UTF-8 text") from None


@dataclass(frozen=True)
class Entry:
    """One checked entry of the header's list: a tensor or a tokenizer file and its bytes in
    the data section."""

    kind: str
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    compression: str | None = None


def _check_entry(e, i: int, table: dict[str, TensorSpec], data_len: int) -> Entry:
    """One entry of the header's list: its kind and name (a tensor of the table or a file of
    the fixed tokenizer list), dtype, shape and byte count as the config implies, and an
    aligned offset that keeps it inside the data section."""
    e = _object(e, f"entries[{i}]")
    name = _string(e.get("name"), f"entries[{i}].name")
    kind = _string(e.get("kind"), f"entries[{i}].kind", ("tensor", "file"))
    if kind == "file":
        if name not in TOKENIZER_FILES:  # never a path: only these exact names
            raise PackedFormatError(f"file entry {_show(name)}: a file entry must be one of "
                                    f"{', '.join(TOKENIZER_FILES)}")
        where = f"file entry {name}"
        _keys(e, where, ENTRY_KEYS, {"compression"})
    else:
        if name not in table:
            raise PackedFormatError(f"tensor entry {_show(name)} is not a tensor of a model with this config")
        where = f"tensor entry {name}"
        _keys(e, where, ENTRY_KEYS)
    nbytes = _integer(e["nbytes"], f"{where}: nbytes", 0, data_len)
    offset = _integer(e["offset"], f"{where}: offset", 0, data_len)
    if offset % ALIGN:
        raise PackedFormatError(f"{where}: offset {offset} is not a multiple of {ALIGN}")
    if offset + nbytes > data_len:
        raise PackedFormatError(f"{where} ends at byte {offset + nbytes} of a data section of {data_len} bytes")
    dtype = _string(e["dtype"], f"{where}: dtype", (table[name].dtype if kind == "tensor" else "|u1",))
    shape = e["shape"]
    if not isinstance(shape, list) or len(shape) > 4 or any(type(d) is not int for d in shape):
        raise PackedFormatError(f"{where}: shape is {_show(shape)}; it must be a list of integers")
    wanted = table[name].shape if kind == "tensor" else (nbytes,)
    if tuple(shape) != wanted:
        source = "the config implies" if kind == "tensor" else "its nbytes imply"
        raise PackedFormatError(f"{where}: shape is {_show(shape)}; {source} {list(wanted)}")
    if nbytes != math.prod(wanted) * np.dtype(dtype).itemsize:
        raise PackedFormatError(f"{where}: nbytes is {nbytes}; a {dtype} array of shape {list(wanted)} has "
                                f"{math.prod(wanted) * np.dtype(dtype).itemsize}")
    compression = None
    if kind == "file":
        if "compression" in e:
            compression = _string(e["compression"], f"{where}: compression", ("xz",))
        elif nbytes > MAX_FILE_BYTES:
            raise PackedFormatError(f"{where} holds {nbytes} bytes; a tokenizer file has at most {MAX_FILE_BYTES}")
    return Entry(kind, name, dtype, wanted, offset, nbytes, compression)


def _check_entries(entries, table: dict[str, TensorSpec], data_len: int) -> list[Entry]:
    """The header's entry list: every entry valid, no name twice, every tensor of the table
    present, a tokenizer present, and no two entries sharing a byte."""
    if not isinstance(entries, list):
        raise PackedFormatError(f"entries is {_show(entries)}; it must be a list")
    if len(entries) > len(table) + len(TOKENIZER_FILES):
        raise PackedFormatError(f"entries lists {len(entries)} entries; a model with this config has at most "
                                f"{len(table) + len(TOKENIZER_FILES)}")
    checked, names = [], set()
    for i, e in enumerate(entries):
        entry = _check_entry(e, i, table, data_len)
        if entry.name in names:
            raise PackedFormatError(f"entry {entry.name} appears twice")
        names.add(entry.name)
        checked.append(entry)
    missing = [name for name in table if name not in names]
    if missing:
        raise PackedFormatError(f"tensor entry {missing[0]} is missing")
    if not names & {"tokenizer.json", "vocab.txt"}:
        raise PackedFormatError("there is no tokenizer (file entry tokenizer.json or vocab.txt)")
    end, last = 0, None
    for entry in sorted(checked, key=lambda x: (x.offset, x.nbytes)):
        if entry.offset < end:
            raise PackedFormatError(f"entries {last} and {entry.name} overlap")
        if entry.nbytes:
            end, last = entry.offset + entry.nbytes, entry.name
    return checked


def check_header(header, version: int, data_len: int) -> tuple[dict[str, TensorSpec], list[Entry]]:
    """The header object of a file of format `version` with a data section of `data_len`
    bytes: known fields only, each of the right type and range, a quantization this version
    holds, the config one the engine runs, and entries that match it. Returns the tensor
    table and the entries."""
    header = _object(header, "the header")
    _keys(header, "header", HEADER_KEYS, {"bit_order"})
    _integer(header["format_version"], "header.format_version (the preamble's version)", version, version)
    if "bit_order" in header:
        _string(header["bit_order"], "header.bit_order", (BIT_ORDER,))
    quant = PackedQuant.from_dict(header["quantization"])
    if quant.format_version > version:
        raise PackedFormatError(f"quantization {quant.name!r} needs format version {quant.format_version}; the file "
                                f"has version {version}")
    table = expected_tensors(header["config"], header["side_dtype"], quant)
    return table, _check_entries(header["entries"], table, data_len)


def validate_packed(packed: PackedFile) -> tuple[ModelShape, PackedQuant]:
    """A PackedFile in memory (read, or built by hand): its config, quantization and side
    dtype, exactly the table's tensors with their dtypes and shapes, zero padding bits, and
    tokenizer files of the fixed names only. Returns the model's sizes and quantization."""
    if not isinstance(packed, PackedFile) or not isinstance(packed.tensors, dict) or not isinstance(packed.files, dict):
        raise PackedFormatError("it is not a PackedFile with dictionaries of tensors and files")
    quant = PackedQuant.from_dict(packed.quantization)
    table = expected_tensors(packed.config, packed.side_dtype, quant)
    unexpected = sorted(map(str, packed.tensors.keys() - table.keys()))
    if unexpected:
        raise PackedFormatError(f"{_show(unexpected[0])} is not a tensor of a model with this config")
    for name, spec in table.items():
        arr = packed.tensors.get(name)
        if arr is None:
            raise PackedFormatError(f"tensor {name} is missing")
        if not isinstance(arr, np.ndarray) or arr.dtype.str != spec.dtype or arr.shape != spec.shape:
            got = f"{arr.dtype.str} {list(arr.shape)}" if isinstance(arr, np.ndarray) else type(arr).__name__
            raise PackedFormatError(f"tensor {name} is {got}; the config implies {spec.dtype} {list(spec.shape)}")
        check_values(name, arr, spec)
    for name, content in packed.files.items():
        if name not in TOKENIZER_FILES or not isinstance(content, bytes):
            raise PackedFormatError(f"file {_show(name)}: files are bytes named one of {', '.join(TOKENIZER_FILES)}")
        check_file(name, content)
    if not packed.files.keys() & {"tokenizer.json", "vocab.txt"}:
        raise PackedFormatError("there is no tokenizer (file tokenizer.json or vocab.txt)")
    return model_shape(packed.config), quant


def check_packed(packed: PackedFile, source: str = "the packed model") -> tuple[ModelShape, PackedQuant]:
    """`validate_packed` with its failure as a BibertError naming `source`."""
    try:
        return validate_packed(packed)
    except PackedFormatError as exc:
        raise BibertError(f"{source} is not a valid bibert file: {exc}") from None
