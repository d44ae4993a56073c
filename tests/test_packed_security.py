"""Packed files from untrusted sources, attacked as an attacker would: random damage, and
crafted files whose SHA-256 is recomputed exactly as docs/packed_format.md specifies (the
checksum guards against accidents, not against a crafted file). Every such file must end
in a BibertError that says the file is not valid: never another exception, a crash, a hang
or a file written outside a private temporary folder. The cases run in a child process, so
that a crash fails a test (naming its case) instead of killing pytest. Also: the native
kernels refuse bad sizes and pointers themselves, and empty or malformed inputs to
`forward` / `predict` give a clear BibertError or an empty result."""
from __future__ import annotations

import copy
import hashlib
import json
import lzma
import math
import os
import random
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertConfig

from bibert import BibertError, QuantConfig
from bibert.modeling import BiBertForSequenceClassification
from bibert.packed import PackedModel, export_packed, kernels, load_packed, read_packed
from bibert.packed.format import ALIGN, MAGIC, MAX_FILE_BYTES, PACKED_FORMAT_VERSION, PREAMBLE, PackedFile

INVALID = "is not a valid bibert file"
WORDS = ["the", "movie", "was", "good", "bad", "fun", "dull", "plot", "evil"]
TEXTS, PAIRS = ["the movie was good", "evil fun zzz"], ["a dull plot", "bad"]
TOKEN = "escaped7f3a"  # in the name of every file an attack tries to write
CHILD_TIMEOUT = 300


# ---- a tiny model and the file layout ------------------------------------------------


@pytest.fixture(autouse=True)
def kernel_from_environment():
    """The kernel family the environment asks for (portable under `make asan`), whatever an
    earlier test left set."""
    previous = kernels.get_kernel()
    kernels.set_kernel(os.environ.get("BIBERT_KERNEL", "auto"))
    yield
    kernels.set_kernel(previous)


def _tiny_student(folder: Path, quant: QuantConfig | None = None) -> Path:
    """A tiny random 1-1-1 student (hidden 35, 5 heads, so that 4 or 6 heads do not divide
    it; 2 layers; FFN 40; 3 labels) packed with float32 side parameters."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    config = BertConfig(vocab_size=len(vocab), hidden_size=35, num_hidden_layers=2, num_attention_heads=5,
                        intermediate_size=40, max_position_embeddings=16, num_labels=3)
    torch.manual_seed(0)
    student = BiBertForSequenceClassification(config, quant).eval()
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "LayerNorm.weight" not in name:
                p.normal_(0, 0.5)
    student.save_pretrained(folder)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer",
                                                              "do_lower_case": True}))
    out = folder / "model.bibert"
    export_packed(folder, out)
    return out


@pytest.fixture(scope="module")
def packed_path(tmp_path_factory) -> Path:
    """The tiny sign student's file (format version 1)."""
    return _tiny_student(tmp_path_factory.mktemp("student"))


@pytest.fixture(scope="module")
def kbit_path(tmp_path_factory) -> Path:
    """The tiny student with 4-bit activations (bit-serial; format version 3)."""
    return _tiny_student(tmp_path_factory.mktemp("kbit"), QuantConfig(1, 1, 4))


@pytest.fixture(scope="module")
def elastic_path(tmp_path_factory) -> Path:
    """The tiny student with elastic binarization (thresholds and scales; format version 2)."""
    return _tiny_student(tmp_path_factory.mktemp("elastic"), QuantConfig(activations="elastic"))


@pytest.fixture(scope="module")
def bimax_path(tmp_path_factory) -> Path:
    """The tiny elastic student with Bi-Attention relative to each query's best key (a table of
    smallest attended counts per head; format version 4)."""
    return _tiny_student(tmp_path_factory.mktemp("bimax"), QuantConfig(activations="elastic", attention="bi-max"))


def split(raw: bytes) -> tuple[dict, bytes]:
    """A packed file's header (parsed) and data section."""
    _, _, _, head_len = PREAMBLE.unpack_from(raw)
    return json.loads(raw[PREAMBLE.size:PREAMBLE.size + head_len]), raw[PREAMBLE.size + head_len:-32]


def assemble(header: dict | None, data: bytes, version: int = 1, reserved: int = 0, head: bytes | None = None,
             head_len: int | None = None, magic: bytes = MAGIC) -> bytes:
    """A packed file as docs/packed_format.md lays it out: preamble, the header (`header`
    dumped as the writer dumps it, or the raw bytes `head`) padded with spaces to a 64-byte
    boundary, the data, and the SHA-256 of every byte before it."""
    if head is None:
        head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    head += b" " * (-(PREAMBLE.size + len(head)) % ALIGN)
    body = PREAMBLE.pack(magic, version, reserved, len(head) if head_len is None else head_len) + head + data
    return body + hashlib.sha256(body).digest()


def entry(header: dict, name: str) -> dict:
    return next(e for e in header["entries"] if e["name"] == name)


def file_entries(header: dict, data: bytes, files: dict[str, bytes], compression: str | None = "xz",
                 raw: bool = False) -> tuple[dict, bytes]:
    """header and data with the tokenizer files replaced by `files` (compressed with xz
    unless `raw`; `compression` is what the entries claim), appended at aligned offsets."""
    header = copy.deepcopy(header)
    header["entries"] = [e for e in header["entries"] if e["kind"] != "file"]
    data = bytearray(data)
    for name, content in files.items():
        blob = content if raw else lzma.compress(content)
        data += b"\0" * (-len(data) % ALIGN)
        e = {"kind": "file", "name": name, "dtype": "|u1", "shape": [len(blob)], "offset": len(data),
             "nbytes": len(blob)}
        if compression is not None:
            e["compression"] = compression
        header["entries"].append(e)
        data += blob
    data += b"\0" * (-len(data) % ALIGN)
    return header, bytes(data)


def bert_tokenizer_json(words: list[str], pre_regex: str | None = None, replace_regex: str | None = None) -> bytes:
    """A BERT WordPiece tokenizer.json over `words`; with a regular expression in a Split
    pre-tokenizer or a Replace normalizer step if asked."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    if replace_regex:
        tok.normalizer = normalizers.Sequence([normalizers.Replace(Regex(replace_regex), " "), tok.normalizer])
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    if pre_regex:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pre_regex), "isolated"),
                                                     tok.pre_tokenizer])
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.decoder = decoders.WordPiece()
    return tok.to_str().encode()


def xz_with_huge_dictionary() -> bytes:
    """A valid xz stream of 5 bytes whose header asks for a 1.5 GiB dictionary (the
    decoder's memory limit must stop it)."""
    x = bytearray(lzma.compress(b"hello", format=lzma.FORMAT_XZ, filters=[{"id": lzma.FILTER_LZMA2,
                                                                          "dict_size": 1 << 20}]))
    size = (x[12] + 1) * 4  # the block header after the 12-byte stream header
    assert x[14] == 0x21 and x[15] == 1  # one LZMA2 filter, one property byte
    x[16] = 40  # dictionary size code 40: 1.5 GiB
    x[12 + size - 4:12 + size] = struct.pack("<I", zlib.crc32(bytes(x[12:12 + size - 4])))
    return bytes(x)


# ---- the crafted cases -----------------------------------------------------------------


class Cases:
    """Named attack files and the outcome each must have: "invalid" (a BibertError saying
    the file is not valid), "newer" (a BibertError asking to upgrade) or "safe" (refused as
    invalid, or loaded and run normally: a rewrite that may still be a valid model)."""

    def __init__(self, raw: bytes):
        self.raw = raw
        self.header, self.data = split(raw)
        self.version = PREAMBLE.unpack_from(raw)[1]
        self.files: dict[str, tuple[bytes, str]] = {}

    def add(self, name: str, raw: bytes, expect: str = "invalid") -> None:
        assert name not in self.files, name
        self.files[name] = (raw, expect)

    def header_case(self, name: str, mutate, expect: str = "invalid") -> None:
        """The model with its header changed by mutate(header) (in place)."""
        header = copy.deepcopy(self.header)
        mutate(header)
        self.add(name, assemble(header, self.data, self.version), expect)


DELETE = object()


def setter(*path, value):
    """A header mutation: the field at `path` set to `value` (or deleted)."""
    def mutate(h):
        obj = h
        for key in path[:-1]:
            obj = obj[key]
        if value is DELETE:
            del obj[path[-1]]
        else:
            obj[path[-1]] = value
    return mutate


def crafted_cases(raw: bytes, sentinel: Path) -> Cases:
    """Checksum-valid files rewritten field by field."""
    c = Cases(raw)
    h, data = c.header, c.data
    assert assemble(h, data) == raw  # the crafted files are laid out exactly as the writer does

    # preamble and envelope
    c.add("version-0", assemble(h, data, version=0))
    c.add("version-next", assemble(h, data, version=PACKED_FORMAT_VERSION + 1), "newer")
    c.add("version-2-header-1", assemble(h, data, version=2))  # the header's version must be the preamble's
    c.add("version-2-sign-model", assemble({**h, "format_version": 2}, data, version=2), "safe")  # allowed
    c.add("version-max", assemble(h, data, version=2**32 - 1), "newer")
    c.add("reserved-1", assemble(h, data, reserved=1))
    c.add("magic-wrong", assemble(h, data, magic=b"BIBERTPX"))
    c.add("empty", b"")
    c.add("magic-only", MAGIC)
    head_len = PREAMBLE.unpack_from(raw)[3]
    for label, value in (("0", 0), ("max", 2**64 - 1), ("past-end", len(raw)), ("short", head_len - 64),
                         ("long", head_len + 64), ("unaligned", head_len - 1)):
        c.add(f"head-len-{label}", assemble(h, data, head_len=value))
    body = PREAMBLE.pack(MAGIC, 1, 0, 0)
    c.add("no-header", body + hashlib.sha256(body).digest())

    # header bytes and JSON
    text = json.dumps(h, sort_keys=True, separators=(",", ":"))
    for label, head in (("not-utf8", b"\xff\xfe" + text.encode()), ("utf16", text.encode("utf-16")),
                        ("not-json", b"{"), ("list", b"[]"), ("number", b"1"), ("string", b'"x"'), ("null", b"null"),
                        ("deep", b"[" * 100000 + b"]" * 100000), ("nul-padding", text.encode() + b"\0" * 3),
                        ("nan", text.replace('"layer_norm_eps":1e-12', '"layer_norm_eps":NaN').encode()),
                        ("infinity", text.replace('"layer_norm_eps":1e-12', '"layer_norm_eps":-Infinity').encode()),
                        ("float-overflow", text.replace('"layer_norm_eps":1e-12', '"layer_norm_eps":1e999').encode()),
                        ("int-5000-digits", text.replace('"hidden_size":35', '"hidden_size":' + "9" * 5000).encode()),
                        ("duplicate-key", text.replace('{"bit_order"', '{"config":{},"bit_order"', 1).encode()),
                        ("duplicate-config-key", text.replace('"hidden_size":35', '"hidden_size":35,"hidden_size":36')
                         .encode())):
        assert head != text.encode(), label
        c.add(f"header-{label}", assemble(None, data, head=head))
    for key in ("format_version", "config", "quantization", "side_dtype", "entries"):
        c.header_case(f"header-missing-{key}", setter(key, value=DELETE))
    c.header_case("header-unknown-field", setter("extra", value=1))
    for label, value in (("2", 2), ("0", 0), ("str", "1"), ("float", 1.0), ("bool", True), ("null", None)):
        c.header_case(f"format-version-{label}", setter("format_version", value=value))
    c.header_case("bit-order-changed", setter("bit_order", value="bit 0 = -1"))
    c.header_case("bit-order-int", setter("bit_order", value=1))
    for label, value in (("float64", "float64"), ("int8", "int8"), ("empty", ""), ("null", None), ("int", 1),
                         ("list", ["float32"]), ("alias-fp32", "fp32"), ("float16-for-f4-entries", "float16"),
                         ("object", "object")):
        c.header_case(f"side-dtype-{label}", setter("side_dtype", value=value))

    # quantization
    for label, value in (("list", []), ("null", None), ("string", "1-1-1")):
        c.header_case(f"quantization-{label}", setter("quantization", value=value))
    for field in ("weight_bits", "embedding_bits", "activation_bits"):
        for label, value in (("0", 0), ("2", 2), ("32", 32), ("bool", True), ("str", "1"), ("float", 1.0),
                             ("null", None), ("missing", DELETE)):
            c.header_case(f"quantization-{field}-{label}", setter("quantization", field, value=value))
    for label, value in (("softmax", "softmax"), ("null", None), ("missing", DELETE)):
        c.header_case(f"quantization-attention-{label}", setter("quantization", "attention", value=value))
    for label, value in (("0", 0), ("99", 99), ("str", "1"), ("null", None), ("missing", DELETE)):
        c.header_case(f"quantization-version-{label}", setter("quantization", "version", value=value))
    for label, value in (("elastic", "elastic"), ("int", 1)):
        c.header_case(f"quantization-activations-{label}", setter("quantization", "activations", value=value))
    c.header_case("quantization-unknown-field", setter("quantization", "group_size", value=64))

    # every size of the config: 0, negative, huge, off by one, the wrong type, missing
    config = h["config"]
    for field in ("hidden_size", "num_attention_heads", "intermediate_size", "num_hidden_layers", "vocab_size",
                  "max_position_embeddings", "type_vocab_size"):
        v = config[field]
        for label, value in (("0", 0), ("neg1", -1), ("int64-min", -2**63), ("2pow31", 2**31), ("2pow64", 2**64 + 1),
                             ("1e30", 10**30), ("plus1", v + 1), ("minus1", v - 1), ("str", str(v)),
                             ("float", float(v)), ("list", [v]), ("null", None), ("bool", True), ("dict", {}),
                             ("missing", DELETE)):
            if value == v:  # e.g. True for a field that is 1
                continue
            c.header_case(f"config-{field}-{label}", setter("config", field, value=value))
    for label, value in (("0", 0), ("neg", -1e-12), ("2", 2.0), ("str", "1e-12"), ("null", None), ("list", [1e-12]),
                         ("bool", True), ("underflow-to-0", 1e-400), ("missing", DELETE)):
        c.header_case(f"config-layer_norm_eps-{label}", setter("config", "layer_norm_eps", value=value))
    for label, value in (("relu", "relu"), ("empty", ""), ("null", None), ("int", 1), ("list", ["gelu"]),
                         ("missing", DELETE)):
        c.header_case(f"config-hidden_act-{label}", setter("config", "hidden_act", value=value))
    for label, value in (("roberta", "roberta"), ("null", None), ("missing", DELETE)):
        c.header_case(f"config-model_type-{label}", setter("config", "model_type", value=value))
    for label, value in (("relative", "relative_key"), ("int", 1)):
        c.header_case(f"config-position_embedding_type-{label}",
                      setter("config", "position_embedding_type", value=value))
    for label, value in (("empty", {}), ("list", ["a", "b", "c"]), ("null", None), ("str", "x"), ("missing", DELETE),
                         ("2-labels", {"0": "a", "1": "b"}), ("4-labels", {str(i): "x" for i in range(4)}),
                         ("no-0", {"1": "a", "2": "b", "3": "c"}), ("int-names", {"0": 0, "1": 1, "2": 2}),
                         ("long-name", {"0": "x" * 5000, "1": "b", "2": "c"}),
                         ("100k-labels", {str(i): "x" for i in range(100_000)})):
        c.header_case(f"config-id2label-{label}", setter("config", "id2label", value=value))
    for label, value in (("2", 2), ("str", "3"), ("bool", True), ("float", 3.0)):
        c.header_case(f"config-num_labels-{label}", setter("config", "num_labels", value=value))
    for label, value in (("list", []), ("str", "bert"), ("null", None)):
        c.header_case(f"config-{label}", setter("config", value=value))

    # the entry list
    for label, value in (("dict", {}), ("null", None), ("str", "x"), ("empty", [])):
        c.header_case(f"entries-{label}", setter("entries", value=value))
    for label, value in (("int", 1), ("list", []), ("null", None)):
        c.header_case(f"entries-item-{label}", lambda hh, value=value: hh["entries"].insert(0, value))
    c.header_case("entries-duplicate", lambda hh: hh["entries"].append(dict(hh["entries"][0])))
    c.header_case("entries-300", lambda hh: hh["entries"].extend([dict(hh["entries"][0])] * 300))
    names = [e["name"] for e in h["entries"]]
    for name in (names[0], "bert.encoder.layer.1.intermediate.dense.alpha", "classifier.bias",
                 "bert.pooler.dense.bits"):
        c.header_case(f"drop-{name}", lambda hh, name=name: hh["entries"].remove(entry(hh, name)))
    c.header_case("drop-vocab-no-tokenizer", lambda hh: hh["entries"].remove(entry(hh, "vocab.txt")))
    c.header_case("drop-all-tensors", lambda hh: hh.__setitem__("entries", [e for e in hh["entries"]
                                                                          if e["kind"] == "file"]))

    def renamed(name, new):
        return lambda hh: entry(hh, name).__setitem__("name", new)

    for label, new in (("unknown", "bert.embeddings.extra.weight"), ("layer-2", "bert.encoder.layer.2.output.dense.bits"),
                       ("null", None), ("int", 1), ("list", ["a"])):
        c.header_case(f"tensor-name-{label}", renamed("classifier.bias", new))
    for label, value in (("weird", "weird"), ("null", None), ("missing", DELETE), ("file", "file")):
        c.header_case(f"tensor-kind-{label}", lambda hh, value=value: setter("kind", value=value)(entry(hh, names[0])))
    c.header_case("file-kind-tensor", lambda hh: entry(hh, "vocab.txt").__setitem__("kind", "tensor"))
    c.header_case("tensor-extra-key", lambda hh: entry(hh, names[0]).__setitem__("extra", 1))
    c.header_case("tensor-compression-key", lambda hh: entry(hh, names[0]).__setitem__("compression", "xz"))
    for key in ("dtype", "shape", "offset", "nbytes", "name"):
        c.header_case(f"tensor-missing-{key}", lambda hh, key=key: entry(hh, names[0]).pop(key))

    # each tensor's dtype, shape, byte count and offset
    for name in ("bert.embeddings.word_embeddings.bits", "bert.embeddings.position_embeddings.weight",
                 "bert.encoder.layer.1.intermediate.dense.bits", "classifier.weight"):
        e = entry(h, name)
        short = name.split(".")[-2] + "." + name.split(".")[-1]
        r, cols = (e["shape"] + [1])[:2]
        item = e["nbytes"] // (r * cols)
        for label, value in (("f8", "<f8"), ("big-endian", ">" + e["dtype"][1:]), ("u4", "<u4"), ("object", "|O"),
                             ("void", "V8"), ("garbage", "zz"), ("empty", ""), ("null", None), ("int", 1),
                             ("f2", "<f2")):
            if value != e["dtype"]:
                c.header_case(f"{short}-dtype-{label}", setter("entries", names.index(name), "dtype", value=value))
        for label, value in (("rows-plus1", [r + 1, cols]), ("cols-plus1", [r, cols + 1]), ("flat", [r * cols]),
                             ("transposed", [cols, r]), ("scalar", []), ("3d", [r, cols, 1]), ("neg", [-r, cols]),
                             ("str-dim", [r, str(cols)]), ("float-dim", [r, float(cols)]), ("bool-dim", [r, True]),
                             ("str", str([r, cols])), ("null", None), ("nested", [[r, cols]]), ("huge", [2**63, 1]),
                             ("5d", [1, 1, 1, r, cols])):
            if value != e["shape"]:
                c.header_case(f"{short}-shape-{label}", setter("entries", names.index(name), "shape", value=value))
        for label, value in (("plus1", e["nbytes"] + 1), ("minus1", e["nbytes"] - 1), ("0", 0), ("neg", -8),
                             ("2pow64", 2**64), ("str", str(e["nbytes"])), ("float", float(e["nbytes"])),
                             ("null", None), ("whole-data", len(data))):
            c.header_case(f"{short}-nbytes-{label}", setter("entries", names.index(name), "nbytes", value=value))

        def consistent(hh, name=name, r=r, cols=cols, item=item):  # shape and nbytes agree, the config does not
            entry(hh, name).update(shape=[r + 1, cols], nbytes=(r + 1) * cols * item)
        c.header_case(f"{short}-shape-and-nbytes-agree", consistent)
        for label, value in (("unaligned", e["offset"] + 1), ("neg", -64), ("at-end", len(data)),
                             ("ends-past-data", len(data) - 64), ("2pow63", 2**63), ("str", str(e["offset"])),
                             ("float", float(e["offset"])), ("null", None)):
            c.header_case(f"{short}-offset-{label}", setter("entries", names.index(name), "offset", value=value))
    for i in (1, 7, len(names) - 3):
        c.header_case(f"overlap-{names[i]}", lambda hh, i=i: hh["entries"][i].__setitem__(
            "offset", hh["entries"][i - 1]["offset"]))
    c.header_case("overlap-all-at-0", lambda hh: [e.__setitem__("offset", 0) for e in hh["entries"]])
    c.header_case("overlap-file-on-tensor", lambda hh: entry(hh, "vocab.txt").__setitem__("offset", 0))

    # padding bits of a sign-bit row (hidden 35: bits 35..63 of each row must be 0)
    bits = entry(h, "bert.embeddings.word_embeddings.bits")
    damaged = bytearray(data)
    damaged[bits["offset"] + 7] |= 0x80  # bit 63 of row 0
    c.add("padding-bit-set", assemble(h, bytes(damaged)))
    damaged = bytearray(data)
    pooler = entry(h, "bert.pooler.dense.bits")
    damaged[pooler["offset"] + pooler["nbytes"] - 1] |= 0x01  # bit 56 of the last row
    c.add("padding-bit-set-pooler", assemble(h, bytes(damaged)))

    # file entries: never a path, only the fixed tokenizer names
    escaped = sentinel / f"{TOKEN}.txt"
    for label, new in (("dotdot", f"../{TOKEN}.txt"), ("dotdot2", f"../../{TOKEN}.txt"),
                       ("absolute", str(escaped)), ("subdir", "sub/tokenizer_config.json"),
                       ("dot-slash", "./tokenizer_config.json"), ("trailing-slash", "vocab.txt/"), ("dotdot-only", ".."),
                       ("dot", "."), ("empty", ""), ("nul", "tokenizer_config.json\0.txt"),
                       ("windows", f"C:\\{TOKEN}.txt"), ("backslash-dotdot", f"..\\{TOKEN}.txt"),
                       ("config-json", "config.json"), ("safetensors", "model.safetensors"),
                       ("upper-case", "TOKENIZER_CONFIG.JSON"), ("leading-space", " tokenizer_config.json"),
                       ("home", f"~/{TOKEN}.txt"), ("url-encoded", f"%2e%2e/{TOKEN}.txt"),
                       ("null", None), ("int", 7)):
        c.header_case(f"file-name-{label}", renamed("tokenizer_config.json", new))
        c.header_case(f"file-extra-{label}", lambda hh, new=new: hh["entries"].append(
            {**entry(hh, "tokenizer_config.json"), "name": new}))
    for label, value in (("gzip", "gzip"), ("zlib", "zlib"), ("null", None), ("int", 1), ("empty", ""),
                         ("upper", "XZ")):
        c.header_case(f"file-compression-{label}", setter("entries", names.index("vocab.txt"), "compression",
                                                          value=value))
    c.header_case("file-compression-missing", lambda hh: entry(hh, "vocab.txt").pop("compression"))  # xz bytes as text
    for label, value in (("u8", "<u8"), ("u2", "|u2"), ("null", None)):
        c.header_case(f"file-dtype-{label}", setter("entries", names.index("vocab.txt"), "dtype", value=value))
    for label, value in (("plus1", [entry(h, "vocab.txt")["nbytes"] + 1]), ("scalar", []), ("2d", [1, 1])):
        c.header_case(f"file-shape-{label}", setter("entries", names.index("vocab.txt"), "shape", value=value))

    # file contents: compression bombs, broken xz, and contents that are not a tokenizer
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    vocab = ("\n".join(words) + "\n").encode()
    settings = json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True}).encode()
    bomb = lzma.compress(b"a" * (MAX_FILE_BYTES + 1), preset=0)
    assert len(bomb) < 20_000
    good_xz = lzma.compress(vocab)
    for label, files, kwargs in (
            ("bomb-vocab", {"vocab.txt": bomb, "tokenizer_config.json": lzma.compress(settings)}, {"raw": True}),
            ("bomb-tokenizer-json", {"vocab.txt": good_xz, "tokenizer.json": bomb}, {"raw": True}),
            ("xz-huge-dictionary", {"vocab.txt": xz_with_huge_dictionary()}, {"raw": True}),
            ("xz-truncated", {"vocab.txt": good_xz[:-20]}, {"raw": True}),
            ("xz-junk-after", {"vocab.txt": good_xz + b"junk"}, {"raw": True}),
            ("xz-two-streams", {"vocab.txt": good_xz + good_xz}, {"raw": True}),
            ("xz-damaged", {"vocab.txt": good_xz[:30] + bytes([good_xz[30] ^ 0xFF]) + good_xz[31:]}, {"raw": True}),
            ("xz-empty", {"vocab.txt": b""}, {"raw": True}),
            ("raw-too-large", {"vocab.txt": b"a\n" * (MAX_FILE_BYTES // 2 + 1)}, {"raw": True, "compression": None}),
            ("vocab-not-utf8", {"vocab.txt": b"\xff\xfe\n" + vocab}, {}),
            ("settings-not-json", {"vocab.txt": vocab, "tokenizer_config.json": b"{"}, {}),
            ("settings-list", {"vocab.txt": vocab, "tokenizer_config.json": b"[]"}, {}),
            ("settings-nan", {"vocab.txt": vocab, "tokenizer_config.json": b'{"model_max_length": NaN}'}, {}),
            ("settings-unknown-class", {"vocab.txt": vocab, "tokenizer_config.json": b'{"tokenizer_class": "Evil"}'},
             {}),
            ("settings-bad-token", {"vocab.txt": vocab, "tokenizer_config.json": b'{"pad_token": {"content": 1}}'},
             {}),
            ("tokenizer-json-split-regex", {"tokenizer.json": bert_tokenizer_json(words, pre_regex=r"(\w+\s?)*$"),
                                            "tokenizer_config.json": settings}, {}),
            ("tokenizer-json-replace-regex", {"tokenizer.json": bert_tokenizer_json(words, replace_regex=r"(a+)+$"),
                                              "tokenizer_config.json": settings}, {}),
            ("tokenizer-json-garbage", {"tokenizer.json": b'{"a": 1}'}, {}),
            ("tokenizer-json-list", {"tokenizer.json": b"[1]"}, {}),
            ("special-tokens-list", {"vocab.txt": vocab, "special_tokens_map.json": b"[1]"}, {}),
            ("vocab-past-model", {"vocab.txt": b"junk\n" * 100 + vocab}, {}),
            ("added-token-past-model", {"vocab.txt": vocab, "added_tokens.json": b'{"zzz": 99999}'}, {}),
            ("only-settings", {"tokenizer_config.json": settings}, {})):
        c.add(f"content-{label}", assemble(*file_entries(h, data, files, **kwargs)))
    # a BERT tokenizer.json (no regular expression) is fine
    c.add("content-tokenizer-json", assemble(*file_entries(h, data, {"tokenizer.json": bert_tokenizer_json(words),
                                                                     "tokenizer_config.json": settings})), "safe")
    # settings that name files or remote code are ignored: the file loads, nothing else is read or run
    for label, extra in (("auto-map", {"auto_map": {"AutoTokenizer": [f"{TOKEN}.EvilTokenizer", None]}}),
                         ("vocab-file", {"vocab_file": "/dev/zero"}),
                         ("tokenizer-file", {"tokenizer_file": f"../{TOKEN}.json"})):
        settings_x = json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True, **extra}).encode()
        c.add(f"content-settings-{label}",
              assemble(*file_entries(h, data, {"vocab.txt": vocab, "tokenizer_config.json": settings_x})), "safe")

    # rewrites that keep the file consistent: a different but valid model, which must load and run
    def fewer_positions(hh):
        hh["config"]["max_position_embeddings"] = 15
        entry(hh, "bert.embeddings.position_embeddings.weight").update(shape=[15, 35], nbytes=15 * 35 * 4)
    c.header_case("consistent-fewer-positions", fewer_positions, "safe")

    def one_token_type(hh):
        hh["config"]["type_vocab_size"] = 1
        entry(hh, "bert.embeddings.token_type_embeddings.weight").update(shape=[1, 35], nbytes=35 * 4)
    c.header_case("consistent-one-token-type", one_token_type, "safe")  # a pair has type 1: refused at predict

    def smaller_vocab(hh):
        hh["config"]["vocab_size"] = 8
        entry(hh, "bert.embeddings.word_embeddings.bits").update(shape=[8, 1], nbytes=64)
        entry(hh, "bert.embeddings.word_embeddings.alpha").update(shape=[8], nbytes=32)
    c.header_case("consistent-smaller-vocab", smaller_vocab, "safe")  # the tokenizer gives ids past it
    return c


def elastic_cases(raw: bytes) -> Cases:
    """Checksum-valid rewrites of an elastic student's file (format version 2) around the
    entries elastic binarization adds: per-channel thresholds and scalar scales."""
    c = Cases(raw)
    h, data = c.header, c.data
    assert c.version == 2 and assemble(h, data, 2) == raw
    c.add("elastic-in-version-1", assemble({**h, "format_version": 1}, data, version=1))
    c.add("elastic-version-next", assemble({**h, "format_version": PACKED_FORMAT_VERSION + 1}, data,
                                           version=PACKED_FORMAT_VERSION + 1), "newer")
    for label, value in (("sign", "sign"), ("missing", DELETE), ("ternary", "ternary"), ("null", None), ("int", 2),
                         ("upper", "ELASTIC")):
        c.header_case(f"elastic-activations-{label}", setter("quantization", "activations", value=value))
    names = [e["name"] for e in h["entries"]]
    quantizer_names = ("bert.encoder.layer.1.output.dense.input_quantizer.threshold",
                       "bert.encoder.layer.0.attention.self.input_quantizer.threshold",
                       "bert.encoder.layer.0.attention.output.dense.input_quantizer.threshold",
                       "bert.pooler.dense.input_quantizer.scale",
                       "bert.encoder.layer.1.intermediate.dense.input_quantizer.scale",
                       "bert.encoder.layer.0.attention.self.score_quantizer.threshold")
    for name in quantizer_names:
        e, i = entry(h, name), names.index(name)
        short = name.replace("bert.encoder.", "").replace("input_quantizer.", "")
        (C,) = e["shape"]
        for label, value in (("f8", "<f8"), ("f2", "<f2"), ("u8", "<u8"), ("big-endian", ">f4"), ("null", None)):
            c.header_case(f"{short}-dtype-{label}", setter("entries", i, "dtype", value=value))
        for label, value in (("minus1", [C - 1]), ("plus1", [C + 1]), ("scalar", []), ("column", [C, 1]),
                             ("row", [1, C]), ("hidden-for-ffn", [35 if C != 35 else 40]), ("null", None)):
            c.header_case(f"{short}-shape-{label}", setter("entries", i, "shape", value=value))

            def consistent(hh, i=i, value=value):  # shape and nbytes agree, the config does not
                hh["entries"][i].update(shape=value, nbytes=4 * math.prod(value))
            if isinstance(value, list) and value != [C]:
                c.header_case(f"{short}-shape-and-nbytes-{label}", consistent)
        for label, value in (("plus4", e["nbytes"] + 4), ("minus4", e["nbytes"] - 4), ("0", 0)):
            c.header_case(f"{short}-nbytes-{label}", setter("entries", i, "nbytes", value=value))
        c.header_case(f"drop-{short}", lambda hh, name=name: hh["entries"].remove(entry(hh, name)))
        c.header_case(f"twice-{short}", lambda hh, name=name: hh["entries"].append(dict(entry(hh, name))))
    for label, new in (("window", "bert.encoder.layer.0.output.dense.input_quantizer.window"),
                       ("qkv-window", "bert.encoder.layer.0.attention.self.qkv_quantizers.0.window"),
                       ("qkv-threshold", "bert.encoder.layer.0.attention.self.qkv_quantizers.1.threshold"),
                       ("query-quantizer", "bert.encoder.layer.0.attention.self.query.input_quantizer.threshold"),
                       ("layer-2", "bert.encoder.layer.2.output.dense.input_quantizer.threshold"),
                       ("classifier", "classifier.input_quantizer.threshold")):
        c.header_case(f"elastic-extra-{label}", lambda hh, new=new: hh["entries"].append(
            {**entry(hh, "bert.pooler.dense.input_quantizer.threshold"), "name": new}))
    # values a crafted file may hold: the model stays consistent, so it loads and runs (or is refused)
    for name in quantizer_names:
        e = entry(h, name)
        for label, value in (("nan", np.nan), ("inf", np.inf), ("minus-inf", -np.inf), ("huge", 3e38), ("0", 0.0),
                             ("negative", -1.5), ("subnormal", 1e-45)):
            damaged = bytearray(data)
            damaged[e["offset"]:e["offset"] + e["nbytes"]] = np.full(e["shape"], value, "<f4").tobytes()
            c.add(f"values-{label}-{name}", assemble(h, bytes(damaged), 2), "safe")
    return c


def kbit_cases(raw: bytes) -> Cases:
    """Checksum-valid rewrites of a 4-bit student's file (format version 3)."""
    c = Cases(raw)
    h, data = c.header, c.data
    assert c.version == 3 and assemble(h, data, 3) == raw
    c.add("kbit-in-version-2", assemble({**h, "format_version": 2}, data, version=2))
    c.add("kbit-in-version-1", assemble({**h, "format_version": 1}, data, version=1))
    c.add("kbit-version-next", assemble({**h, "format_version": PACKED_FORMAT_VERSION + 1}, data,
                                        version=PACKED_FORMAT_VERSION + 1), "newer")
    for label, value in (("1", 1), ("2", 2), ("3", 3), ("8", 8), ("0", 0), ("bool", True), ("float", 4.0), ("str", "4")):
        expect = "invalid" if label not in ("2",) else "safe"  # 2 bits: a consistent model of another width
        c.header_case(f"kbit-activation_bits-{label}", setter("quantization", "activation_bits", value=value), expect)
    c.header_case("kbit-elastic", setter("quantization", "activations", value="elastic"))
    c.header_case("kbit-weight-bits-4", setter("quantization", "weight_bits", value=4))
    names = [e["name"] for e in h["entries"]]
    i = names.index("activation_clip_std")
    for label, value in (("f8", "<f8"), ("f2", "<f2"), ("u4", "<u4"), ("null", None)):
        c.header_case(f"clip-std-dtype-{label}", setter("entries", i, "dtype", value=value))
    for label, value in (("scalar", []), ("two", [2]), ("column", [1, 1]), ("null", None)):
        c.header_case(f"clip-std-shape-{label}", setter("entries", i, "shape", value=value))
    c.header_case("clip-std-missing", lambda hh: hh["entries"].remove(entry(hh, "activation_clip_std")))
    c.header_case("clip-std-twice", lambda hh: hh["entries"].append(dict(entry(hh, "activation_clip_std"))))
    e = entry(h, "activation_clip_std")
    for label, value in (("nan", np.nan), ("inf", np.inf), ("minus-inf", -np.inf), ("0", 0.0), ("negative", -2.0),
                         ("huge", 3e38), ("subnormal", 1e-45)):
        damaged = bytearray(data)
        damaged[e["offset"]:e["offset"] + 4] = np.float32(value).tobytes()
        c.add(f"clip-std-value-{label}", assemble(h, bytes(damaged), 3), "safe")
    return c


def bimax_cases(raw: bytes) -> Cases:
    """Checksum-valid rewrites of a "bi-max" student's file (format version 4) around the table
    of smallest attended counts that replaces the score thresholds."""
    c = Cases(raw)
    h, data = c.header, c.data
    assert c.version == 4 and assemble(h, data, 4) == raw
    for version in (1, 2, 3):
        c.add(f"bimax-in-version-{version}", assemble({**h, "format_version": version}, data, version=version))
    c.add("bimax-version-next", assemble({**h, "format_version": PACKED_FORMAT_VERSION + 1}, data,
                                         version=PACKED_FORMAT_VERSION + 1), "newer")
    for label, value in (("sign", "sign"), ("missing", DELETE)):
        c.header_case(f"bimax-activations-{label}", setter("quantization", "activations", value=value))
    for label, value in (("bi", "bi"), ("softmax", "softmax"), ("upper", "BI-MAX"), ("int", 1)):
        c.header_case(f"bimax-attention-{label}", setter("quantization", "attention", value=value))
    c.header_case("bimax-4-bit", setter("quantization", "activation_bits", value=4))
    name = "bert.encoder.layer.1.attention.self.score_quantizer.count_min"
    names = [e["name"] for e in h["entries"]]
    e, i = entry(h, name), names.index(name)
    heads, cols = e["shape"]
    d = cols - 1
    assert e["dtype"] == "<i4" and (heads, d) == (5, 7)
    for label, value in (("i8", "<i8"), ("i2", "<i2"), ("u4", "<u4"), ("f4", "<f4"), ("big-endian", ">i4"),
                         ("null", None)):
        c.header_case(f"count-min-dtype-{label}", setter("entries", i, "dtype", value=value))
    for label, value in (("d", [heads, d]), ("d-plus-2", [heads, d + 2]), ("heads-plus-1", [heads + 1, cols]),
                         ("flat", [heads * cols]), ("transposed", [cols, heads]), ("3-d", [heads, cols, 1]),
                         ("null", None)):
        c.header_case(f"count-min-shape-{label}", setter("entries", i, "shape", value=value))

        def consistent(hh, value=value):  # shape and nbytes agree, the config does not
            hh["entries"][i].update(shape=value, nbytes=4 * math.prod(value))
        if isinstance(value, list) and value != [cols, heads] and math.prod(value) * 4 <= e["nbytes"] + 64:
            c.header_case(f"count-min-shape-and-nbytes-{label}", consistent)
    for label, value in (("plus4", e["nbytes"] + 4), ("minus4", e["nbytes"] - 4), ("0", 0)):
        c.header_case(f"count-min-nbytes-{label}", setter("entries", i, "nbytes", value=value))
    c.header_case("count-min-drop", lambda hh: hh["entries"].remove(entry(hh, name)))
    c.header_case("count-min-twice", lambda hh: hh["entries"].append(dict(entry(hh, name))))
    c.header_case("count-min-beside-margins", lambda hh: hh["entries"].append(
        {**entry(hh, "bert.pooler.dense.input_quantizer.threshold"),
         "name": "bert.encoder.layer.1.attention.self.score_quantizer.threshold"}))

    best = np.tile(np.arange(-d, d + 1, 2, dtype="<i4"), (heads, 1))

    def changed(row, col, value, base=best):
        t = base.copy()
        t[row, col] = value
        return t

    tables = {"best-only": (best, "safe"), "every-key": (np.full_like(best, -d), "safe"),
              "nothing": (np.full_like(best, d + 2), "safe"),
              "int32-max": (changed(0, 0, 2**31 - 1), "invalid"), "int32-min": (changed(2, 3, -2**31), "invalid"),
              "below-minus-d": (changed(1, 1, -d - 2), "invalid"), "past-d-plus-2": (changed(1, 1, d + 4), "invalid"),
              "parity": (changed(4, 7, d - 1), "invalid"), "above-its-maximum": (changed(0, 0, -d + 2), "invalid"),
              "falling": (changed(3, d, -d), "invalid"), "nothing-for-one-row": (changed(0, d, d + 2), "invalid")}
    for label, (table, expect) in tables.items():
        damaged = bytearray(data)
        damaged[e["offset"]:e["offset"] + e["nbytes"]] = table.astype("<i4").tobytes()
        c.add(f"count-min-values-{label}", assemble(h, bytes(damaged), 4), expect)
    return c


def random_mutation_cases(raw: bytes, seed: int = 13) -> Cases:
    """Random damage without recomputing the checksum (bit flips, truncations, appended or
    prepended junk: all must be refused), and random rewrites of the header or the data
    with the checksum recomputed (refused as invalid, or a valid model that runs)."""
    rng = random.Random(seed)
    c = Cases(raw)
    for i in range(60):
        b = bytearray(raw)
        pos = rng.randrange(len(b))
        b[pos] ^= 1 << rng.randrange(8)
        c.add(f"flip-{i:02d}-at-{pos}", bytes(b))
    for i in range(30):
        n = rng.randrange(len(raw))
        c.add(f"truncate-{i:02d}-to-{n}", raw[:n])
    for i in range(15):
        c.add(f"append-{i:02d}", raw + rng.randbytes(rng.randrange(1, 200)))
        c.add(f"prepend-{i:02d}", rng.randbytes(rng.randrange(1, 200)) + raw)
    head_len = PREAMBLE.unpack_from(raw)[3]
    body = raw[:-32]
    for i in range(60):
        b = bytearray(body)
        pos = rng.randrange(PREAMBLE.size, PREAMBLE.size + head_len)
        b[pos] = rng.choice(b'0123456789{}[]",:-.eE aZ\x00\xff')
        c.add(f"header-byte-{i:02d}-at-{pos}", bytes(b) + hashlib.sha256(bytes(b)).digest(), "safe")
    digits = [i for i in range(PREAMBLE.size, PREAMBLE.size + head_len) if chr(body[i]).isdigit()]
    for i in range(40):
        b = bytearray(body)
        pos = rng.choice(digits)
        b[pos] = ord(rng.choice("0123456789"))
        c.add(f"header-digit-{i:02d}-at-{pos}", bytes(b) + hashlib.sha256(bytes(b)).digest(), "safe")
    for i in range(30):
        b = bytearray(body)
        for _ in range(rng.randrange(1, 8)):
            b[rng.randrange(PREAMBLE.size + head_len, len(b))] = rng.randrange(256)
        c.add(f"data-bytes-{i:02d}", bytes(b) + hashlib.sha256(bytes(b)).digest(), "safe")
    return c


# ---- running cases in a child process ----------------------------------------------------


def _child(function: str, *args: str, cwd: Path, tmpdir: Path) -> subprocess.CompletedProcess:
    """Runs `function(*args)` of this module in a fresh Python process (the environment's
    kernel and sanitizer settings carry over) with its own working and temporary folders."""
    tmpdir.mkdir(parents=True, exist_ok=True)
    cwd.mkdir(parents=True, exist_ok=True)
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"import {Path(__file__).stem} as t; t.{function}(*sys.argv[1:])")
    env = {**os.environ, "TMPDIR": str(tmpdir), "BIBERT_THREADS": "2"}
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=CHILD_TIMEOUT)


def attack_worker(case_dir: str, results: str) -> None:
    """In the child: load every case file of case_dir, then predict and forward with it; one
    JSON line before and one after each case, so that a crash or a hang names its case."""
    from bibert.packed import load_packed

    with open(results, "a") as out:
        for path in sorted(Path(case_dir).glob("*.bibert")):
            out.write(json.dumps({"case": path.stem}) + "\n")
            out.flush()
            try:
                model = load_packed(path)
                model.predict(TEXTS)
                model.predict(TEXTS, pairs=PAIRS, batch_size=1, max_length=8)
                model.forward(np.array([[2, 5, 6, 3]]))
                outcome = "loaded"
            except BibertError as exc:
                outcome = "refused: " + str(exc)
            except BaseException as exc:  # what these tests look for
                outcome = f"raised {type(exc).__name__}: {exc}"
            out.write(json.dumps({"case": path.stem, "outcome": outcome}) + "\n")
            out.flush()


def run_cases(cases: Cases, tmp_path: Path) -> dict[str, str]:
    """Writes the cases, runs them in one child process and returns case -> outcome; a
    crash, a sanitizer report or a hang fails here, naming the case."""
    case_dir = tmp_path / "cases"
    case_dir.mkdir()
    stems = {}
    for i, (name, (raw, _)) in enumerate(cases.files.items()):
        stem = f"{i:04d}"
        (case_dir / f"{stem}.bibert").write_bytes(raw)
        stems[stem] = name
    results = tmp_path / "results.jsonl"
    try:
        proc = _child("attack_worker", str(case_dir), str(results), cwd=tmp_path / "cwd", tmpdir=tmp_path / "tmp")
        failure = None if proc.returncode == 0 else f"exit status {proc.returncode}\n{proc.stderr[-3000:]}"
    except subprocess.TimeoutExpired:
        failure = f"no answer within {CHILD_TIMEOUT} s"
    outcomes, last = {}, None
    for line in results.read_text().splitlines() if results.exists() else []:
        row = json.loads(line)
        last = stems[row["case"]]
        if "outcome" in row:
            outcomes[last] = row["outcome"]
    if failure:
        pytest.fail(f"the child died on case {last!r}: {failure}")
    assert "AddressSanitizer" not in proc.stderr, proc.stderr[-3000:]
    assert len(outcomes) == len(cases.files)
    return outcomes


def check_outcomes(cases: Cases, outcomes: dict[str, str]) -> dict[str, int]:
    """Each case's outcome is what it must be; returns how many ended how."""
    wrong, tally = [], {}
    for name, (_, expect) in cases.files.items():
        got = outcomes[name]
        if got.startswith("refused: ") and INVALID in got:
            kind = "invalid"
        elif got.startswith("refused: ") and "upgrade bibert" in got:
            kind = "newer"
        elif got == "loaded":
            kind = "loaded"
        else:
            kind = "wrong"
        ok = kind == expect or (expect == "safe" and kind in ("invalid", "loaded"))
        tally[kind] = tally.get(kind, 0) + 1
        if not ok:
            wrong.append(f"{name} (must be {expect}): {got[:300]}")
    assert not wrong, f"{len(wrong)} of {len(outcomes)} cases ended wrongly:\n" + "\n".join(wrong)
    return tally


def files_named(root: Path, token: str) -> list[Path]:
    """Files under root whose name holds `token`."""
    return [p for p in root.rglob(f"*{token}*")] if root.exists() else []


# ---- the tests ---------------------------------------------------------------------------


def test_crafted_checksum_valid_files_are_refused(packed_path, tmp_path):
    sentinel = tmp_path / "sentinel"
    sentinel.mkdir()
    cases = crafted_cases(packed_path.read_bytes(), sentinel)
    assert len(cases.files) > 400
    tally = check_outcomes(cases, run_cases(cases, tmp_path))
    assert tally.get("invalid", 0) > 400
    # the file-name attacks wrote nothing: not beside the absolute target, not relative to
    # the temporary or working folders (both inside tmp_path), not in the system's /tmp
    assert not files_named(tmp_path, TOKEN)
    assert not list(Path("/tmp").glob(f"*{TOKEN}*"))
    assert not list((tmp_path / "tmp").iterdir())  # the tokenizer's private folders are gone


def test_crafted_elastic_files_are_refused(elastic_path, tmp_path):
    cases = elastic_cases(elastic_path.read_bytes())
    assert len(cases.files) > 150
    tally = check_outcomes(cases, run_cases(cases, tmp_path))
    assert tally.get("invalid", 0) > 120 and tally.get("loaded", 0) >= 30, tally


def test_crafted_bimax_files_are_refused(bimax_path, tmp_path):
    cases = bimax_cases(bimax_path.read_bytes())
    tally = check_outcomes(cases, run_cases(cases, tmp_path))
    assert tally.get("invalid", 0) >= 40 and tally.get("loaded", 0) >= 3, tally


def test_random_mutations_of_a_bimax_file(bimax_path, tmp_path):
    cases = random_mutation_cases(bimax_path.read_bytes(), seed=23)
    tally = check_outcomes(cases, run_cases(cases, tmp_path))
    assert tally["invalid"] >= 150 and "wrong" not in tally


def test_crafted_kbit_files_are_refused(kbit_path, tmp_path):
    cases = kbit_cases(kbit_path.read_bytes())
    tally = check_outcomes(cases, run_cases(cases, tmp_path))
    assert tally.get("invalid", 0) >= 20 and tally.get("loaded", 0) >= 7, tally


def test_random_mutations_of_a_kbit_file(kbit_path, tmp_path):
    cases = random_mutation_cases(kbit_path.read_bytes(), seed=19)
    tally = check_outcomes(cases, run_cases(cases, tmp_path))
    assert tally["invalid"] >= 150 and "wrong" not in tally


def test_random_mutations_of_an_elastic_file(elastic_path, tmp_path):
    cases = random_mutation_cases(elastic_path.read_bytes(), seed=17)
    tally = check_outcomes(cases, run_cases(cases, tmp_path))
    assert tally["invalid"] >= 150 and "wrong" not in tally


def test_random_mutations_are_refused_or_valid(packed_path, tmp_path):
    cases = random_mutation_cases(packed_path.read_bytes())
    tally = check_outcomes(cases, run_cases(cases, tmp_path))
    assert tally["invalid"] >= 150 and "wrong" not in tally


def native_worker(packed: str) -> None:
    """In the child: the C entry points called directly with bad sizes and missing buffers
    must return an error code; then empty and malformed inputs through the engine. Prints
    one line per check."""
    import ctypes

    lib = kernels.lib()
    buf = np.zeros(4096, np.uint64)
    p = buf.ctypes.data
    past = np.array([9], np.int64)  # a {0, 1}-input offset past K = 8
    past_d = np.array([10], np.int64)  # a score limit past d + 1 = 9
    rel_ok = np.arange(9, dtype=np.int64)  # relative limits [1 head, d + 1 = 9]
    rel_past, rel_negative = rel_ok.copy(), rel_ok.copy()
    rel_past[8], rel_negative[3] = 10, -1
    one, empty, late = (np.array(v, np.int64) for v in ([0, 4], [0, 0], [1, 4]))  # sequence row starts
    positions = np.array([1, 4], np.int64)  # two rows, the second at a position past P = 4
    # the tables of bb_forward: 4 words, 4 positions, 2 token types of H = 32, all in buf; one without its word bits
    tables = kernels.ModelParams(p, p, 4, p, 4, p, 2, p, p, None, p, p, p, None)
    no_table = kernels.ModelParams(None, p, 4, p, 4, p, 2, p, p, None, p, p, p, None)
    # a layer whose every parameter lies in buf (its values do not matter: the ids are refused first)
    real_layers = ctypes.byref(kernels.LayerParams(*([p] * 16), None, None, None, None, None))
    past_vocab, zeros4 = np.array([0, 1, 4, 2], np.int64), np.zeros(4, np.int64)  # id 4 past the 4 words
    big, neg = 2**40, -1
    calls = {
        "sign_pack K=0": lambda: lib.bb_sign_pack(p, 1, 0, 1, p, 1, None),
        "sign_pack M<0": lambda: lib.bb_sign_pack(p, neg, 8, 8, p, 1, None),
        "sign_pack ldx<K": lambda: lib.bb_sign_pack(p, 2, 64, 8, p, 1, None),
        "sign_pack ldo<words": lambda: lib.bb_sign_pack(p, 2, 130, 130, p, 2, None),
        "sign_pack null": lambda: lib.bb_sign_pack(None, 2, 8, 8, p, 1, None),
        "sign_pack huge": lambda: lib.bb_sign_pack(p, big, big, big, p, big, None),
        "linear K=0": lambda: lib.bb_linear(p, 1, 1, 0, p, 32, p, p, None, p, None, 0, None, None),
        "linear N=0": lambda: lib.bb_linear(p, 1, 1, 64, p, 0, p, p, None, p, None, 0, None, None),
        "linear lda<words": lambda: lib.bb_linear(p, 1, 1, 65, p, 32, p, p, None, p, None, 0, None, None),
        "linear no output": lambda: lib.bb_linear(p, 1, 1, 64, p, 32, p, p, None, None, None, 0, None, None),
        "linear two outputs": lambda: lib.bb_linear(p, 1, 1, 64, p, 32, p, p, None, p, p, 1, p, p),
        "linear bits no thr": lambda: lib.bb_linear(p, 1, 1, 64, p, 32, None, None, None, None, p, 1, None, p),
        "linear bits ldo<words": lambda: lib.bb_linear(p, 1, 1, 64, p, 65, None, None, None, None, p, 1, p, p),
        "linear float no c0": lambda: lib.bb_linear(p, 1, 1, 64, p, 32, None, p, None, p, None, 0, None, None),
        "linear null a": lambda: lib.bb_linear(None, 1, 1, 64, p, 32, p, p, None, p, None, 0, None, None),
        "linear huge": lambda: lib.bb_linear(p, big, big, big, p, big, p, p, None, p, None, 0, None, None),
        "thresholds K=0": lambda: lib.bb_bit_thresholds(p, p, None, 0, 4, p, p),
        "thresholds null": lambda: lib.bb_bit_thresholds(None, p, None, 8, 4, p, p),
        "epilogue N<0": lambda: lib.bb_float_epilogue(p, p, 8, neg, None, p, p),
        "epilogue offset past K": lambda: lib.bb_float_epilogue(p, p, 8, 1, past.ctypes.data, p, p),
        "layernorm H=0": lambda: lib.bb_layernorm(p, 1, 0, p, p, 1e-12, p, None, 0, None),
        "layernorm null gamma": lambda: lib.bb_layernorm(p, 1, 8, None, p, 1e-12, p, None, 0, None),
        "layernorm ldo<words": lambda: lib.bb_layernorm(p, 1, 130, p, p, 1e-12, p, p, 2, None),
        "embed L=0": lambda: lib.bb_embed(p, p, 4, 0, p, p, 4, p, 4, p, 2, 8, p, None),
        "embed L>P": lambda: lib.bb_embed(p, p, 8, 8, p, p, 4, p, 4, p, 2, 8, p, None),
        "embed M%L": lambda: lib.bb_embed(p, p, 5, 2, p, p, 4, p, 4, p, 2, 8, p, None),
        "embed V=0": lambda: lib.bb_embed(p, p, 2, 2, p, p, 0, p, 4, p, 2, 8, p, None),
        "embed null": lambda: lib.bb_embed(None, p, 2, 2, p, p, 4, p, 4, p, 2, 8, p, None),
        "attention L=0": lambda: lib.bb_biattention(p, 2, 0, 8, 16, 1, 0, 1, 8, p, p, 1, None, None, None, None),
        "attention offset past row": lambda: lib.bb_biattention(p, 1, 0, 8, 60, 1, 4, 1, 8, p, p, 1, None, None, None,
                                                                None),
        "attention negative offset": lambda: lib.bb_biattention(p, 1, -8, 8, 16, 1, 4, 1, 8, p, p, 1, None, None, None,
                                                                None),
        "attention ldo<words": lambda: lib.bb_biattention(p, 4, 0, 80, 160, 1, 4, 1, 80, p, p, 1, None, None, None,
                                                          None),
        "attention huge": lambda: lib.bb_biattention(p, big, 0, 0, 0, big, big, big, big, p, p, big, None, None, None,
                                                     None),
        "attention null valid": lambda: lib.bb_biattention(p, 1, 0, 8, 16, 1, 4, 1, 8, None, p, 1, None, None, None,
                                                           None),
        "attention limit past d": lambda: lib.bb_biattention(p, 1, 0, 8, 16, 1, 4, 1, 8, p, p, 1, None, None,
                                                             past_d.ctypes.data, None),
        "attention relative limit past d": lambda: lib.bb_biattention(p, 1, 0, 8, 16, 1, 4, 1, 8, p, p, 1, None,
                                                                      None, None, rel_past.ctypes.data),
        "attention relative limit negative": lambda: lib.bb_biattention(p, 1, 0, 8, 16, 1, 4, 1, 8, p, p, 1, None,
                                                                        None, None, rel_negative.ctypes.data),
        "attention both limits": lambda: lib.bb_biattention(p, 1, 0, 8, 16, 1, 4, 1, 8, p, p, 1, None, None,
                                                            np.zeros(1, np.int64).ctypes.data, rel_ok.ctypes.data),
        "encoder heads do not divide": lambda: lib.bb_encoder(p, 1, 1, one.ctypes.data, 35, 4, 40, 1e-12, p, p, p, None),
        "encoder null layers": lambda: lib.bb_encoder(None, 1, 1, one.ctypes.data, 32, 4, 40, 1e-12, p, p, p, None),
        "encoder null parameter": lambda: lib.bb_encoder(ctypes.byref(kernels.LayerParams()), 1, 1, one.ctypes.data,
                                                         32, 4, 40, 1e-12, p, p, p, None),
        "encoder empty sequence": lambda: lib.bb_encoder(p, 1, 1, empty.ctypes.data, 32, 4, 40, 1e-12, p, p, p, None),
        "encoder start not 0": lambda: lib.bb_encoder(p, 1, 1, late.ctypes.data, 32, 4, 40, 1e-12, p, p, p, None),
        "encoder null start": lambda: lib.bb_encoder(p, 1, 1, None, 32, 4, 40, 1e-12, p, p, p, None),
        "encoder huge": lambda: lib.bb_encoder(p, 1, big, p, big, 1, big, 1e-12, p, p, p, None),
        "embed position past P": lambda: lib.bb_embed(p, p, 2, 1, p, p, 4, p, 4, p, 2, 8, p, positions.ctypes.data),
        "forward null model": lambda: lib.bb_forward(None, p, 1, 1, one.ctypes.data, 32, 4, 40, 1e-12, p, p, None, p, p,
                                                     p, None, p),
        "forward null table": lambda: lib.bb_forward(ctypes.byref(no_table), p, 1, 1, one.ctypes.data, 32, 4, 40,
                                                     1e-12, p, p, None, p, p, p, None, p),
        "forward null ids": lambda: lib.bb_forward(ctypes.byref(tables), p, 1, 1, one.ctypes.data, 32, 4, 40, 1e-12,
                                                   None, p, None, p, p, p, None, p),
        "forward null pooled": lambda: lib.bb_forward(ctypes.byref(tables), p, 1, 1, one.ctypes.data, 32, 4, 40,
                                                      1e-12, p, p, None, p, p, p, None, None),
        "forward null parameter": lambda: lib.bb_forward(ctypes.byref(tables), ctypes.byref(kernels.LayerParams()), 1,
                                                         1, one.ctypes.data, 32, 4, 40, 1e-12, p, p, None, p, p, p,
                                                         None, p),
        "forward heads do not divide": lambda: lib.bb_forward(ctypes.byref(tables), p, 1, 1, one.ctypes.data, 35, 4,
                                                              40, 1e-12, p, p, None, p, p, p, None, p),
        "forward empty sequence": lambda: lib.bb_forward(ctypes.byref(tables), p, 1, 1, empty.ctypes.data, 32, 4, 40,
                                                         1e-12, p, p, None, p, p, p, None, p),
        "forward huge": lambda: lib.bb_forward(ctypes.byref(tables), p, 1, big, p, big, 1, big, 1e-12, p, p, None, p,
                                               p, p, None, p),
        "forward id past vocabulary": lambda: lib.bb_forward(ctypes.byref(tables), real_layers, 1, 1,
                                                             one.ctypes.data, 32, 4, 40, 1e-12, past_vocab.ctypes.data,
                                                             zeros4.ctypes.data, None, p, p, p, None, p),
        "tuning mr 0": lambda: lib.bb_set_tuning(1, 0, 16384, 0),
        "tuning mr 7": lambda: lib.bb_set_tuning(1, 7, 16384, 0),
        "tuning tiny chunk": lambda: lib.bb_set_tuning(1, 6, 16, 0),
        "tuning order 2": lambda: lib.bb_set_tuning(1, 6, 16384, 2),
        "tuning unknown family": lambda: lib.bb_set_tuning(9, 6, 16384, 0),
        "tuning null out": lambda: lib.bb_get_tuning(1, None),
        "quantize bits 3": lambda: lib.bb_quantize_planes(p, 2, 8, 8, 3, 2.55, p, 1, p, None),
        "quantize ldx<C": lambda: lib.bb_quantize_planes(p, 2, 8, 4, 4, 2.55, p, 1, p, None),
        "quantize ldo<words": lambda: lib.bb_quantize_planes(p, 2, 130, 130, 4, 2.55, p, 2, p, None),
        "quantize null step": lambda: lib.bb_quantize_planes(p, 2, 8, 8, 4, 2.55, p, 1, None, None),
        "quantize huge": lambda: lib.bb_quantize_planes(p, big, big, big, 4, 2.55, p, big, p, None),
        "linear kbit bits 1": lambda: lib.bb_linear_kbit(p, 1, 1, 64, p, 32, 1, 1.0, p, p, p, None, p),
        "linear kbit K=0": lambda: lib.bb_linear_kbit(p, 1, 1, 0, p, 32, 4, 1.0, p, p, p, None, p),
        "linear kbit lda<words": lambda: lib.bb_linear_kbit(p, 1, 1, 65, p, 32, 4, 1.0, p, p, p, None, p),
        "linear kbit null offsets": lambda: lib.bb_linear_kbit(p, 1, 1, 64, p, 32, 4, 1.0, p, p, None, None, p),
        "linear kbit huge": lambda: lib.bb_linear_kbit(p, big, big, big, p, big, 4, 1.0, p, p, p, None, p),
        "attention kbit L=0": lambda: lib.bb_biattention_kbit(p, p, p, 0, 1, 8, 1.0, p, p, 8, None),
        "attention kbit ldo<H*d": lambda: lib.bb_biattention_kbit(p, p, p, 4, 2, 8, 1.0, p, p, 8, None),
        "attention kbit null valid": lambda: lib.bb_biattention_kbit(p, p, p, 4, 1, 8, 1.0, None, p, 8, None),
        "attention kbit huge": lambda: lib.bb_biattention_kbit(p, p, p, big, big, big, 1.0, p, p, big, None),
        "gelu C=0": lambda: lib.bb_gelu(p, 1, 0, p),
        "gelu null": lambda: lib.bb_gelu(None, 1, 8, p),
        "encoder tuning tail 0": lambda: lib.bb_set_encoder_tuning(0, 512),
        "encoder tuning group 0": lambda: lib.bb_set_encoder_tuning(16, 0),
    }
    for name, call in calls.items():
        print(f"native {name}: {call()}", flush=True)
    # zero rows is a no-op for every kernel
    for name, call in {"sign_pack M=0": lambda: lib.bb_sign_pack(None, 0, 8, 8, None, 1, None),
                       "linear M=0": lambda: lib.bb_linear(None, 0, 1, 64, None, 32, None, None, None, p, None, 0,
                                                           None, None),
                       "encoder no sequences": lambda: lib.bb_encoder(None, 1, 0, None, 32, 4, 40, 1e-12, None, None, None,
                                                                      None),
                       "attention B=0": lambda: lib.bb_biattention(None, 1, 0, 8, 16, 0, 4, 1, 8, None, None, 1,
                                                                   None, None, None, None)}.items():
        print(f"noop {name}: {call()}", flush=True)

    model = load_packed(packed)
    inputs = {"forward (1, 0)": lambda: model.forward(np.zeros((1, 0), np.int64)),
              "forward (0, 8)": lambda: model.forward(np.zeros((0, 8), np.int64)),
              "forward (0, 0)": lambda: model.forward(np.zeros((0, 0), np.int64)),
              "forward (0, 8) hidden": lambda: model.forward(np.zeros((0, 8), np.int64), output_hidden_states=True)[0],
              "forward 1-D": lambda: model.forward(np.array([2, 5])),
              "forward float ids": lambda: model.forward(np.array([[2.0, 5.0]])),
              "forward ragged": lambda: model.forward([[2, 5], [2]]),
              "forward NaN types": lambda: model.forward(np.array([[2, 5]]), token_type_ids=np.array([[np.nan, 0]])),
              "forward type 2": lambda: model.forward(np.array([[2, 5]]), token_type_ids=np.array([[0, 2]])),
              "forward string mask": lambda: model.forward(np.array([[2, 5]]), attention_mask=np.array([["a", "b"]])),
              "predict []": lambda: model.predict([]).scores,
              "predict surrogate": lambda: model.predict(["good \ud800 film"]),
              "predict surrogate pair": lambda: model.predict(["good"], pairs=["\udcff"]),
              "predict max_length=-5": lambda: model.predict(["good"], max_length=-5),
              "predict max_length=0": lambda: model.predict(["good"], max_length=0),
              "predict max_length=1": lambda: model.predict(["good"], max_length=1),
              "predict max_length=2.5": lambda: model.predict(["good"], max_length=2.5),
              "predict batch_size=0": lambda: model.predict(["good"], batch_size=0),
              "predict batch_size=-1": lambda: model.predict(["good"], batch_size=-1),
              "predict batch_size=None": lambda: model.predict(["good"], batch_size=None),
              "predict texts=None": lambda: model.predict(None),
              "predict texts=[1]": lambda: model.predict([1]),
              "predict bytes": lambda: model.predict([b"good"]),
              "threads=0": lambda: kernels.set_threads(0),
              "threads=10**9": lambda: kernels.set_threads(10**9),
              "kernels.forward id past vocabulary": lambda: kernels.forward(
                  model._native_model, model._native_layers, model.num_layers, np.array([0, 2]), model.hidden,
                  model.heads, model.intermediate, model._eps, np.array([2, 99]), np.zeros(2, np.int64), None,
                  np.ones(2, bool)),
              "embed id past vocabulary": lambda: kernels.embed(np.array([[2, 99]]), np.zeros((1, 2), np.int64),
                                                                model._word_bits, model._word_alpha, model._position,
                                                                model._token_type),
              "layernorm wrong gamma": lambda: kernels.layernorm(np.ones((2, 8), np.float32), np.ones(7), np.ones(8),
                                                                 1e-12),
              "biattention offsets past row": lambda: kernels.biattention(np.zeros((4, 1), np.uint64), (0, 8, 60), 1,
                                                                          4, 1, 8, np.ones((1, 4), bool)),
              "binary_linear short thresholds": lambda: kernels.binary_linear(
                  np.zeros((2, 1), np.uint64), 64, np.zeros((1, 1, 32), np.uint64), 32, np.ones(32), np.ones(32),
                  out_bits=True, thresholds=(np.zeros(3, np.int64), np.zeros(1, np.uint32)))}
    for name, call in inputs.items():
        try:
            result = call()
            print(f"input {name}: result {getattr(result, 'shape', result)}", flush=True)
        except BibertError as exc:
            print(f"input {name}: BibertError {exc}", flush=True)
        except BaseException as exc:
            print(f"input {name}: raised {type(exc).__name__}: {exc}", flush=True)


def test_native_kernels_and_inputs_refuse_bad_arguments(packed_path, tmp_path):
    proc = _child("native_worker", str(packed_path), cwd=tmp_path / "cwd", tmpdir=tmp_path / "tmp")
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0, f"the child died after {lines[-1:]!r}:\n{proc.stderr[-3000:]}"
    assert "AddressSanitizer" not in proc.stderr
    got = dict(line.split(": ", 1) for line in lines)
    for name, rc in got.items():
        if name.startswith("native "):
            assert rc == str(kernels.EINVAL), (name, rc)
        elif name.startswith("noop "):
            assert rc == str(kernels.OK), (name, rc)
    assert sum(n.startswith("native ") for n in got) == 79
    assert got["input forward (0, 8)"] == got["input forward (0, 0)"] == "result (0, 3)"
    assert got["input forward (0, 8) hidden"] == "result (0, 3)"
    assert got["input predict []"] == "result (0, 3)"
    assert "empty" in got["input forward (1, 0)"]
    expected_words = {"predict surrogate": "lone surrogate", "predict surrogate pair": "pairs[0]",
                      "predict max_length=-5": "positive number of tokens",
                      "predict max_length=0": "positive number of tokens",
                      "predict max_length=1": "at least 3", "predict batch_size=0": "positive number of texts",
                      "forward NaN types": "integers", "forward ragged": "rectangular",
                      "threads=0": "from 1 to", "embed id past vocabulary": "token ids must lie",
                      "kernels.forward id past vocabulary": "outside the model's tables"}
    for name, words in expected_words.items():
        assert got[f"input {name}"].startswith("BibertError") and words in got[f"input {name}"], (name, got[f"input {name}"])
    for name, outcome in got.items():
        if name.startswith("input ") and not outcome.startswith("result"):
            assert outcome.startswith("BibertError"), (name, outcome)


def test_hand_built_packed_file_is_checked_before_the_engine(packed_path):
    """PackedModel checks a PackedFile built in memory as strictly as a read one."""
    good = read_packed(packed_path)

    def variant(**changes) -> PackedFile:
        p = copy.copy(good)
        p.tensors, p.files, p.config = dict(good.tensors), dict(good.files), copy.deepcopy(good.config)
        for key, value in changes.items():
            if key in ("tensors", "files"):
                getattr(p, key).update(value)
            else:
                setattr(p, key, value)
        return p

    word = "bert.embeddings.word_embeddings.bits"
    bad = [variant(tensors={word: good.tensors[word].astype(np.int64)}),
           variant(tensors={word: good.tensors[word][:-1]}),
           variant(tensors={word: good.tensors[word].tolist()}),
           variant(tensors={"classifier.weight": good.tensors["classifier.weight"].astype(np.float64)}),
           variant(tensors={"extra": np.zeros(3)}),
           variant(files={f"../{TOKEN}.txt": b"x"}),
           variant(files={"vocab.txt": "text, not bytes"}),
           variant(config={**good.config, "hidden_size": 36}),
           variant(side_dtype="float64"),
           variant(quantization={**good.quantization, "weight_bits": 2})]
    dropped = variant()
    del dropped.tensors["classifier.bias"]
    bad.append(dropped)
    for packed in bad:
        with pytest.raises(BibertError, match=INVALID):
            PackedModel(packed)
    PackedModel(variant())  # the unchanged copy is fine


def test_writer_refuses_what_the_reader_refuses(packed_path, tmp_path):
    from bibert.packed.writer import write_packed

    packed = read_packed(packed_path)
    packed.files["../evil.txt"] = b"x"
    with pytest.raises(BibertError, match="refusing to write"):
        write_packed(packed, tmp_path / "x.bibert")
    assert not (tmp_path / "x.bibert").exists()


def test_tokenizer_is_built_in_memory_or_in_a_private_folder_from_fixed_names(packed_path, tmp_path, monkeypatch):
    """A BERT tokenizer is built in memory (`bibert.packed.tokenizer`): nothing is written and
    settings naming files or remote code are ignored. Through transformers (another class),
    the stored files are written under their fixed names only, into a fresh folder that only
    this user can enter, removed afterwards, with those settings dropped."""
    import tempfile

    from bibert.packed import engine

    seen = {}
    real = tempfile.TemporaryDirectory

    def spy(*args, **kwargs):
        tmp = real(*args, **kwargs)
        seen["path"], seen["mode"] = Path(tmp.name), os.stat(tmp.name).st_mode & 0o777
        return tmp

    monkeypatch.setattr(engine.tempfile, "TemporaryDirectory", spy)
    model = load_packed(packed_path)
    model._files["tokenizer_config.json"] = json.dumps(
        {"tokenizer_class": "BertTokenizer", "vocab_file": "/dev/zero", "auto_map": {"AutoTokenizer": ["x.Y", None]},
         "do_lower_case": True}).encode()
    assert model.predict(TEXTS).scores.shape == (2, 3)
    assert not seen  # no folder, no file
    hf = engine._load_hf_tokenizer(model._files, model._config, str(packed_path))
    assert hf(TEXTS)["input_ids"] == model.tokenizer(TEXTS)["input_ids"]
    assert seen["mode"] == 0o700 and not seen["path"].exists()


# ---- other untrusted inputs: a teacher's pickled weights -----------------------------------


class _Payload:
    """A pickle that would create a folder when unpickled (it must never be)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


@pytest.mark.parametrize("payload", ["code", "garbage"])
def test_teacher_with_a_pickle_payload_is_refused(tmp_path, payload):
    """A teacher folder whose pytorch_model.bin (no safetensors) is a pickle holding code, or
    not a pickle at all: a BibertError that says what to do, and the code never runs."""
    import pickle

    from bibert.modeling import load_hf_classifier

    folder, marker = tmp_path / "teacher", tmp_path / "payload-ran"
    BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=16).save_pretrained(folder)
    raw = pickle.dumps(_Payload(marker), protocol=2) if payload == "code" else b"not a pickle" * 8
    (folder / "pytorch_model.bin").write_bytes(raw)
    with pytest.raises(BibertError, match="pickle.*safetensors"):
        load_hf_classifier(str(folder), num_labels=2)
    assert not marker.exists()
