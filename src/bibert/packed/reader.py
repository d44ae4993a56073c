"""Reading a packed model file back, with checks. Needs NumPy only (exporting from a student,
which needs PyTorch, is `bibert.packed.exporter`; writing a `PackedFile` is
`bibert.packed.writer`).

The layout and what a valid file holds are `bibert.packed.format`'s: this module reads the
bytes in order (preamble, checksum, header, entries, data) and has each part checked there
before anything is used (docs/packed_format.md, "Untrusted files").
"""
from __future__ import annotations

import hashlib
import lzma
import os
from pathlib import Path

import numpy as np

from ..errors import BibertError, not_a_file
# The schema's names that were defined here before `format` held them, still importable from here.
from .format import (ACTIVATION_CLIP_STD, ALIGN, BIT_ORDER, CONFIG_LIMITS, DIGEST, ELASTIC_INPUTS,  # noqa: F401
                     EMBEDDINGS, ENTRY_KEYS, GELU_ACTIVATIONS, HEADER_SIDE_DTYPES, MAGIC, MAX_FILE_BYTES,
                     MAX_HEADER_BYTES, MAX_LABEL_CHARS, MAX_LABELS, PACKED_FORMAT_VERSION, POOLER_DENSE, PREAMBLE,
                     QUANTIZER_SCALE, QUANTIZER_THRESHOLD, SCORE_COUNT_MIN, SCORE_THRESHOLD, SIDE_DTYPES,
                     TOKENIZER_FILES, TRAINING_ONLY, XZ_MEMLIMIT, ModelShape, PackedFile, PackedFormatError,
                     TensorSpec, aligned, check_file, check_header, check_packed, check_values, expected_tensors,
                     load_json, model_shape, pack_bool, unpack_bool, words)


def _decompress(raw: bytes, compression: str | None, name: str) -> bytes:
    """A file entry's bytes, decompressed to at most MAX_FILE_BYTES (a larger output, a damaged
    or truncated stream, or data after its end make the file invalid)."""
    if compression is None:
        return raw
    d = lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=XZ_MEMLIMIT)
    try:
        out = d.decompress(raw, max_length=MAX_FILE_BYTES + 1)
    except lzma.LZMAError as exc:
        raise PackedFormatError(f"file {name}: the xz data is damaged ({exc})") from None
    if len(out) > MAX_FILE_BYTES:
        raise PackedFormatError(f"file {name} decompresses to more than {MAX_FILE_BYTES} bytes")
    if not d.eof:
        raise PackedFormatError(f"file {name}: the xz data is truncated")
    if d.unused_data:
        raise PackedFormatError(f"file {name}: data follows the end of the xz stream")
    return out


def _parse(raw: bytes, path: Path) -> PackedFile:
    """The packed model in `raw`: preamble, checksum, header, entries, data, each checked
    before it is used."""
    if len(raw) < PREAMBLE.size + DIGEST or raw[:8] != MAGIC:
        raise PackedFormatError("too short or bad magic (a packed model starts with BIBERTPK)")
    _, version, reserved, head_len = PREAMBLE.unpack_from(raw)
    if version > PACKED_FORMAT_VERSION:
        raise BibertError(f"{path} has packed format version {version}; this bibert reads up to "
                          f"{PACKED_FORMAT_VERSION}: upgrade bibert")
    if version < 1:
        raise PackedFormatError(f"format version {version}; versions start at 1")
    body, digest = memoryview(raw)[:-DIGEST], raw[-DIGEST:]
    if hashlib.sha256(body).digest() != digest:
        raise PackedFormatError("it is damaged or truncated (SHA-256 checksum mismatch); export it again")
    if reserved:
        raise PackedFormatError(f"the reserved preamble field is {reserved}; it must be 0")
    data_start = PREAMBLE.size + head_len
    if head_len > MAX_HEADER_BYTES or data_start > len(body) or data_start % ALIGN:
        raise PackedFormatError(f"the header length {head_len} does not fit the file (at most {MAX_HEADER_BYTES} "
                                f"bytes, ending at a multiple of {ALIGN} before the checksum)")
    header = load_json(body[PREAMBLE.size:data_start], "the header")
    data = body[data_start:]
    table, entries = check_header(header, version, len(data))
    packed = PackedFile(header["config"], header["quantization"], header["side_dtype"], format_version=version)
    for e in entries:
        chunk = data[e.offset:e.offset + e.nbytes]
        if e.kind == "file":
            content = _decompress(bytes(chunk), e.compression, e.name)
            check_file(e.name, content)
            packed.files[e.name] = content
        else:
            arr = np.frombuffer(chunk, dtype=np.dtype(e.dtype)).reshape(e.shape)
            check_values(e.name, arr, table[e.name])
            packed.tensors[e.name] = arr
    return packed


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
    except PackedFormatError as exc:
        raise BibertError(f"{path} is not a valid bibert file: {exc}") from None
