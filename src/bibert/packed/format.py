"""The packed 1-bit model file: export from a student folder, read back with checks.

Layout (docs/packed_format.md has the full description):

    magic "BIBERTPK" (8 bytes) | format version u32 LE | reserved u32 | header length u64 LE
    | header: UTF-8 JSON, space-padded so that the data starts 64-byte aligned
    | data: tensors and tokenizer files (xz), each at a 64-byte aligned offset (zero padding)
    | SHA-256 of every byte before it (32 bytes)

Binarized weights (every encoder Linear, the pooler and the word embedding) are stored
as sign bits, row-major uint64 words: bit 1 <=> -1, element j in word j // 64, bit j % 64,
padding bits 0; beside them the per-row scale alpha. Everything else (biases, LayerNorms,
position / token-type embeddings, classifier) is full precision in the chosen side dtype.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
import lzma
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import BibertError

MAGIC = b"BIBERTPK"
FORMAT_VERSION = 1
ALIGN = 64
PREAMBLE = struct.Struct("<8sIIQ")  # magic, version, reserved, header length
DIGEST = 32
SIDE_DTYPES = {"float32": np.float32, "float16": np.float16, "fp32": np.float32, "fp16": np.float16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json",
                   "added_tokens.json")
BINARY_LINEARS = ("attention.self.query", "attention.self.key", "attention.self.value",
                  "attention.output.dense", "intermediate.dense", "output.dense")
LAYER_NORMS = ("attention.output.LayerNorm", "output.LayerNorm")


@dataclass
class PackedFile:
    """A packed model in memory: the header's config, named arrays and tokenizer files."""

    config: dict  # Hugging Face BertConfig dict (with id2label, num_labels, ...)
    quantization: dict
    side_dtype: str
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION


@dataclass
class ExportReport:
    path: Path
    packed_bytes: int
    fp32_bytes: int  # the student's fp32 safetensors

    @property
    def ratio(self) -> float:
        return self.fp32_bytes / self.packed_bytes

    def __str__(self) -> str:
        return (f"wrote {self.path}: {self.packed_bytes / 1e6:.2f} MB packed vs "
                f"{self.fp32_bytes / 1e6:.2f} MB fp32 safetensors ({self.ratio:.1f}x smaller)")


def pack_sign_rows(signs: np.ndarray) -> np.ndarray:
    """{-1, +1} (or any real, bit = value < 0) rows [R, C] -> uint64 [R, ceil(C/64)]."""
    neg = np.asarray(signs) < 0
    R, C = neg.shape
    padded = np.zeros((R, -(-C // 64) * 64), dtype=bool)
    padded[:, :C] = neg
    return np.packbits(padded, axis=1, bitorder="little").view("<u8").astype(np.uint64)


def _check_exportable(config: dict, directory) -> None:
    from ..modeling import GELU_FAMILY

    if "bibert_format_version" not in config or "quantization" not in config:
        raise BibertError(f"{directory} is not a BiBERT student folder (no quantization in config.json)")
    q = config["quantization"]
    bits = (q.get("weight_bits"), q.get("embedding_bits"), q.get("activation_bits"))
    if bits != (1, 1, 1) or q.get("attention") != "bi":
        raise BibertError(
            f"only fully binarized students (bits 1-1-1, attention 'bi') can be packed; {directory} is "
            f"{'-'.join(map(str, bits))} with attention {q.get('attention')!r}"
        )
    if config.get("hidden_act") not in GELU_FAMILY:
        raise BibertError(f"hidden_act {config.get('hidden_act')!r} does not keep the sign of its input; "
                          "the packed engine needs a GELU")


def export_packed(student_dir: str | os.PathLike, out: str | os.PathLike, side_dtype: str = "float32",
                  tokenizer_dir: str | os.PathLike | None = None) -> ExportReport:
    """Write the packed model of a BiBERT student folder (`save_pretrained` output) to `out`."""
    import torch
    from safetensors.torch import load_file

    from ..modeling import WEIGHTS_NAME, read_config
    from ..quantizers import weight_scale_and_signs

    if side_dtype not in SIDE_DTYPES:
        raise BibertError(f"side dtype {side_dtype!r}: choose float32 or float16")
    side = SIDE_DTYPES[side_dtype]
    student_dir = Path(student_dir)
    config = read_config(student_dir)
    _check_exportable(config, student_dir)
    weights_path = student_dir / WEIGHTS_NAME
    if not weights_path.is_file():
        raise BibertError(f"{student_dir} has no {WEIGHTS_NAME}")
    try:
        state = load_file(str(weights_path))
    except Exception as exc:
        raise BibertError(f"cannot read {weights_path}: {exc}") from None
    state = {k if k.startswith(("bert.", "classifier.")) else f"bert.{k}": v for k, v in state.items()}

    tensors: dict[str, np.ndarray] = {}

    def take(name: str) -> torch.Tensor:
        if name not in state:
            raise BibertError(f"{weights_path} lacks {name}")
        return state[name].float()

    def binary(name: str, with_bias: bool = True) -> None:
        alpha, signs = weight_scale_and_signs(take(name + ".weight"))
        tensors[name + ".bits"] = pack_sign_rows(signs.numpy())
        tensors[name + ".alpha"] = alpha.numpy().astype(side)
        if with_bias:
            tensors[name + ".bias"] = take(name + ".bias").numpy().astype(side)

    def full(name: str) -> None:
        tensors[name] = take(name).numpy().astype(side)

    binary("bert.embeddings.word_embeddings", with_bias=False)
    for name in ("position_embeddings.weight", "token_type_embeddings.weight", "LayerNorm.weight", "LayerNorm.bias"):
        full("bert.embeddings." + name)
    for n in range(config["num_hidden_layers"]):
        p = f"bert.encoder.layer.{n}."
        for lin in BINARY_LINEARS:
            binary(p + lin)
        for ln in LAYER_NORMS:
            full(p + ln + ".weight")
            full(p + ln + ".bias")
    binary("bert.pooler.dense")
    full("classifier.weight")
    full("classifier.bias")

    tok_dir = Path(tokenizer_dir) if tokenizer_dir else student_dir
    files = {name: (tok_dir / name).read_bytes() for name in TOKENIZER_FILES if (tok_dir / name).is_file()}
    if "tokenizer.json" not in files and "vocab.txt" not in files:
        raise BibertError(f"no tokenizer (tokenizer.json or vocab.txt) in {tok_dir}: copy the teacher's "
                          "tokenizer files there or pass --tokenizer DIR")
    if "tokenizer.json" in files:  # it holds the vocabulary too
        files.pop("vocab.txt", None)

    hf_config = {k: v for k, v in config.items() if k not in ("bibert_format_version", "quantization")}
    packed = PackedFile(hf_config, config["quantization"], np.dtype(side).name, tensors, files)
    out = Path(out)
    write_packed(packed, out)
    return ExportReport(out, out.stat().st_size, weights_path.stat().st_size)


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def write_packed(packed: PackedFile, path: Path) -> None:
    """Serialise `packed` (atomically: a temporary file renamed into place)."""
    entries, blobs, offset = [], [], 0
    items = [("tensor", k, np.ascontiguousarray(v)) for k, v in packed.tensors.items()]
    items += [("file", k, np.frombuffer(lzma.compress(v, preset=9 | lzma.PRESET_EXTREME), dtype=np.uint8)) for k, v in packed.files.items()]
    for kind, name, arr in items:
        entries.append({"kind": kind, "name": name, "dtype": arr.dtype.str, "shape": list(arr.shape),
                        "offset": offset, "nbytes": arr.nbytes, **({"compression": "xz"} if kind == "file" else {})})
        blobs.append((offset, arr.tobytes()))
        offset = _aligned(offset + arr.nbytes)
    header = {"format_version": FORMAT_VERSION, "config": packed.config, "quantization": packed.quantization,
              "side_dtype": packed.side_dtype, "bit_order": "bit 1 = -1; element j in uint64 word j//64, bit j%64",
              "entries": entries}
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    head += b" " * (_aligned(PREAMBLE.size + len(head)) - PREAMBLE.size - len(head))
    data = bytearray(offset)
    for off, raw in blobs:
        data[off:off + len(raw)] = raw
    body = PREAMBLE.pack(MAGIC, FORMAT_VERSION, 0, len(head)) + head + bytes(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(body)
            f.write(hashlib.sha256(body).digest())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _decompress(raw: bytes, compression: str | None, path: Path) -> bytes:
    if compression is None:
        return raw
    if compression != "xz":
        raise BibertError(f"{path}: unknown compression {compression!r}; upgrade bibert")
    return lzma.decompress(raw)


def read_packed(path: str | os.PathLike) -> PackedFile:
    """Read and verify a packed model (magic, format version, SHA-256, entry bounds)."""
    path = Path(path)
    if not path.is_file():
        raise BibertError(f"packed model {path} does not exist")
    raw = path.read_bytes()
    if len(raw) < PREAMBLE.size + DIGEST or raw[:8] != MAGIC:
        raise BibertError(f"{path} is not a packed bibert model (bad magic or too short)")
    _, version, _, head_len = PREAMBLE.unpack_from(raw)
    if version > FORMAT_VERSION:
        raise BibertError(f"{path} has packed format version {version}; this bibert reads up to "
                          f"{FORMAT_VERSION}: upgrade bibert")
    body, digest = memoryview(raw)[:-DIGEST], raw[-DIGEST:]
    if hashlib.sha256(body).digest() != digest:
        raise BibertError(f"{path} is damaged or truncated (SHA-256 checksum mismatch); export it again")
    data_start = PREAMBLE.size + head_len
    try:
        header = json.loads(bytes(body[PREAMBLE.size:data_start]))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BibertError(f"{path} has an unreadable header ({exc})") from None
    packed = PackedFile(header["config"], header["quantization"], header["side_dtype"],
                        format_version=version)
    data = body[data_start:]
    for e in header["entries"]:
        if e["offset"] < 0 or e["offset"] + e["nbytes"] > len(data):
            raise BibertError(f"{path}: entry {e['name']} lies outside the file")
        chunk = data[e["offset"]:e["offset"] + e["nbytes"]]
        if e["kind"] == "file":
            packed.files[e["name"]] = _decompress(bytes(chunk), e.get("compression"), path)
        else:
            arr = np.frombuffer(chunk, dtype=np.dtype(e["dtype"]))
            packed.tensors[e["name"]] = arr.reshape(e["shape"])
    return packed
