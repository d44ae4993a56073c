"""Writing a packed model file: a `PackedFile` in the layout of `bibert.packed.format`, checked
there first, so that nothing `bibert.packed.reader` would refuse is written. NumPy only."""
from __future__ import annotations

import hashlib
import json
import lzma
import os
from pathlib import Path

import numpy as np

from ..checkpoint import atomic_write
from ..errors import BibertError
from .format import BIT_ORDER, MAGIC, PREAMBLE, XZ_PRESET, PackedFile, PackedFormatError, aligned, validate_packed


def write_packed(packed: PackedFile, path: str | os.PathLike) -> None:
    """Serialise `packed` with the lowest format version that holds it, atomically (a temporary
    file renamed into place) and with the usual permissions (0666 less the umask). A model
    that `read_packed` would refuse is not written."""
    path = Path(path)
    try:
        _, quant = validate_packed(packed)
    except PackedFormatError as exc:
        raise BibertError(f"refusing to write {path}: {exc}") from None
    version = quant.format_version
    entries, blobs, offset = [], [], 0
    items = [("tensor", k, np.ascontiguousarray(v)) for k, v in packed.tensors.items()]
    items += [("file", k, np.frombuffer(lzma.compress(v, preset=XZ_PRESET), dtype=np.uint8))
              for k, v in packed.files.items()]
    for kind, name, arr in items:
        entries.append({"kind": kind, "name": name, "dtype": arr.dtype.str, "shape": list(arr.shape),
                        "offset": offset, "nbytes": arr.nbytes, **({"compression": "xz"} if kind == "file" else {})})
        blobs.append((offset, arr.tobytes()))
        offset = aligned(offset + arr.nbytes)
    header = {"format_version": version, "config": packed.config, "quantization": packed.quantization,
              "side_dtype": packed.side_dtype, "bit_order": BIT_ORDER, "entries": entries}
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    head += b" " * (aligned(PREAMBLE.size + len(head)) - PREAMBLE.size - len(head))
    data = bytearray(offset)
    for off, raw in blobs:
        data[off:off + len(raw)] = raw
    body = PREAMBLE.pack(MAGIC, version, 0, len(head)) + head + bytes(data)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(body)
            f.write(hashlib.sha256(body).digest())

    atomic_write(path, write)
