"""What a (quantized) BERT costs: per-layer bits, parameters, memory and operations.

In the spirit of Larq's `models.summary()`, with the paper's accounting (docs/method.md §6,
paper §4.1):
- a product of a w-bit and an a-bit operand (both below 32 bits) is w*a binary
  operations per multiply-accumulate; a full-precision MAC is 2 FLOPs; a binary operation
  counts as 1/64 FLOP: ops = 2 * MACs * w * a / 64;
- memory: each quantized entry at its bits, every other parameter and every per-row
  scale at 32 bits;
- elementwise work stays full precision and is counted with fixed costs per element
  (ELEMENTWISE_FLOPS below).

`size_mib` counts everything that is stored. `size_paper_mib` is the paper's accounting
as far as its figures let it be inferred: per-row scales left out, and the embedding bits E
applied to the position / token-type tables too (BERT-base: 418 MiB fp32, 13.5 MiB
1-1-1; the paper prints 418 and 13.4 "MB", which are MiB).

    config_cost(config, quant, seq_len)      a CostTable for a BertConfig
    model_cost(model_or_config, seq_len)     the same for a model, a folder or a config.json
                                             (`bibert.summary` and `bibert summary`)

The older names `summarize`, `model_summary`, `Summary` and `Row` stay as aliases.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .bert_names import ATTENTION_OUTPUT, CLASSIFIER, ENCODER_LAYER, FFN_IN, FFN_OUT, LAYER_NORMS, POOLER, QKV, WORD_EMBEDDINGS
from .checkpoint import CONFIG_NAME, is_student_config, read_config, read_json, split_student_config
from .config import QuantConfig
from .errors import BibertError

ELEMENTWISE_FLOPS = {"add": 1, "scale": 1, "layernorm": 5, "gelu": 8, "softmax": 5, "tanh": 5}
MIB = 2**20


@dataclass
class CostRow:
    """One row of a CostTable: a layer's (or an operation's) parameters, memory and work."""

    name: str
    kind: str
    input_bits: int | str
    weight_bits: int | str
    quantized_params: int = 0  # entries stored at weight_bits (< 32)
    fp_params: int = 0  # 32-bit parameters (biases, LayerNorm, fp weights)
    scales: int = 0  # 32-bit per-row scales of quantized tables
    binary_macs: int = 0  # MACs whose operands are both below 32 bits
    fp_macs: int = 0
    elementwise_flops: int = 0
    qbits: int = 32  # bits of the quantized entries
    bops_per_mac: int = 0
    aux_params: int = 0  # fp32 position / token-type tables (at E bits in size_paper_mib)

    @property
    def memory_bits(self) -> int:
        return self.quantized_params * self.qbits + 32 * (self.fp_params + self.scales + self.aux_params)

    @property
    def flops(self) -> float:
        return 2 * self.fp_macs + 2 * self.binary_macs * self.bops_per_mac / 64 + self.elementwise_flops


@dataclass
class CostTable:
    """The cost of one sequence through a BERT classifier: rows, `totals`, `table()`, `to_dict()`."""

    bits: str
    attention: str
    seq_len: int
    embedding_bits: int
    rows: list[CostRow] = field(default_factory=list)

    @property
    def totals(self) -> dict:
        one_bit = sum(r.quantized_params for r in self.rows if r.qbits == 1)
        bits = sum(r.memory_bits for r in self.rows)
        paper = bits - sum(32 * r.scales + (32 - self.embedding_bits) * r.aux_params for r in self.rows)
        return {
            "params_1bit": one_bit,
            "params_kbit": sum(r.quantized_params for r in self.rows if 1 < r.qbits < 32),
            "params_32bit": sum(r.fp_params + r.aux_params + r.scales for r in self.rows)
            + sum(r.quantized_params for r in self.rows if r.qbits >= 32),
            "binary_macs": sum(r.binary_macs for r in self.rows),
            "fp_macs": sum(r.fp_macs for r in self.rows),
            "gflops": sum(r.flops for r in self.rows) / 1e9,
            "size_mib": bits / 8 / MIB,
            "size_paper_mib": paper / 8 / MIB,
        }

    def to_dict(self) -> dict:
        rows = [{**asdict(r), "memory_bits": r.memory_bits, "flops": r.flops} for r in self.rows]
        return {"bits": self.bits, "attention": self.attention, "seq_len": self.seq_len, "rows": rows, "totals": self.totals}

    def table(self) -> str:
        head = f"{'layer':<34}{'in':>4}{'w':>4}{'1-bit':>12}{'32-bit':>11}{'mem KiB':>10}{'bin MACs':>13}{'fp MACs':>13}"
        lines = [head, "-" * len(head)]
        for r in self.rows:
            fp = r.fp_params + r.scales + r.aux_params + (r.quantized_params if r.qbits >= 32 else 0)
            one = r.quantized_params if r.qbits < 32 else 0
            lines.append(
                f"{r.name:<34}{r.input_bits!s:>4}{r.weight_bits!s:>4}{one:>12,}{fp:>11,}"
                f"{r.memory_bits / 8 / 1024:>10.1f}{r.binary_macs:>13,}{r.fp_macs:>13,}"
            )
        t = self.totals
        lines += [
            "-" * len(head),
            f"bits W-E-A {self.bits}, attention {self.attention}, sequence {self.seq_len}",
            f"quantized parameters: {t['params_1bit']:,} at 1 bit, {t['params_kbit']:,} at 2-8 bits;"
            f" 32-bit: {t['params_32bit']:,}",
            f"operations: {t['gflops']:.3f} GFLOPs (binary MACs {t['binary_macs'] / 1e9:.3f} G,"
            f" fp MACs {t['fp_macs'] / 1e9:.3f} G)",
            f"size: {t['size_mib']:.2f} MiB of parameters as stored ({t['size_mib'] * 2**20 / 1e6:.2f} MB; a packed "
            f"file adds its tokenizer and header); {t['size_paper_mib']:.2f} MiB in the paper's accounting",
        ]
        return "\n".join(lines)


def _bops(a: int, b: int) -> int:
    return a * b if a < 32 and b < 32 else 0


def _matmul(row: CostRow, macs: int, a_bits: int, b_bits: int) -> None:
    if _bops(a_bits, b_bits):
        row.binary_macs += macs
        row.bops_per_mac = _bops(a_bits, b_bits)
    else:
        row.fp_macs += macs


def _linear(name: str, n_in: int, n_out: int, tokens: int, q: QuantConfig) -> CostRow:
    w, a = q.weight_bits, q.activation_bits
    row = CostRow(name, "linear", a, w, quantized_params=n_in * n_out, qbits=w, fp_params=n_out)
    row.scales = n_out if w < 32 else 0
    _matmul(row, tokens * n_in * n_out, w, a)
    row.elementwise_flops = tokens * n_out * (1 + (w < 32))  # bias (+ scale)
    return row


def config_cost(config, quant: QuantConfig | None = None, seq_len: int = 128) -> CostTable:
    """Cost of one sequence of `seq_len` tokens through a BERT classifier of `config`."""
    q = quant or QuantConfig()
    h, i, T = config.hidden_size, config.intermediate_size, seq_len
    nh = config.num_attention_heads
    hs = h // nh
    ew = ELEMENTWISE_FLOPS
    s = CostTable(q.bits, q.attention, T, q.embedding_bits)
    e = q.embedding_bits
    s.rows.append(CostRow(WORD_EMBEDDINGS, "embedding", "-", e, quantized_params=config.vocab_size * h, qbits=e,
                          scales=config.vocab_size if e < 32 else 0))
    s.rows.append(CostRow("embeddings.position+token_type+LN", "embedding", "-", 32,
                      aux_params=(config.max_position_embeddings + config.type_vocab_size) * h, fp_params=2 * h,
                      elementwise_flops=T * h * (2 * ew["add"] + ew["layernorm"])))
    for l in range(config.num_hidden_layers):
        p = ENCODER_LAYER.format(l)
        s.rows += [_linear(p + name, h, h, T, q) for name in QKV]
        a = q.activation_bits
        scores = CostRow(p + "attention.scores", "matmul", a, a, elementwise_flops=nh * T * T * 2)
        _matmul(scores, nh * T * T * hs, a, a)
        prob_bits = 1 if q.attention == "bi" else a
        ctx = CostRow(p + f"attention.context ({q.attention})", "matmul", prob_bits, a,
                  elementwise_flops=nh * T * T * (ew["softmax"] if q.attention == "softmax" else 0))
        _matmul(ctx, nh * T * T * hs, prob_bits, a)
        s.rows += [scores, ctx]
        norm_flops = T * h * (ew["add"] + ew["layernorm"])
        s.rows.append(_linear(p + ATTENTION_OUTPUT, h, h, T, q))
        s.rows.append(CostRow(p + LAYER_NORMS[0], "norm", 32, 32, fp_params=2 * h, elementwise_flops=norm_flops))
        inter = _linear(p + FFN_IN, h, i, T, q)
        inter.elementwise_flops += T * i * ew["gelu"]
        s.rows.append(inter)
        s.rows.append(_linear(p + FFN_OUT, i, h, T, q))
        s.rows.append(CostRow(p + LAYER_NORMS[1], "norm", 32, 32, fp_params=2 * h, elementwise_flops=norm_flops))
    pooler = _linear(POOLER, h, h, 1, q)
    pooler.elementwise_flops += h * ew["tanh"]
    s.rows.append(pooler)
    s.rows.append(_linear(CLASSIFIER, h, config.num_labels, 1, QuantConfig.full_precision()))
    return s


def model_cost(model_or_config, seq_len: int = 128, quant: QuantConfig | None = None) -> CostTable:
    """`config_cost` for a model, a BertConfig, a model folder, a config.json path or a
    packed model file (read with NumPy only: no torch or transformers).

    The quantization comes from `quant`, else from the model / checkpoint / packed file, else
    1-1-1 "bi".
    """
    if isinstance(model_or_config, (str, os.PathLike)) and _is_packed_file(Path(model_or_config)):
        return _packed_cost(Path(model_or_config), seq_len, quant)
    from transformers import BertConfig

    from .modeling import BiBertForSequenceClassification

    if isinstance(model_or_config, BiBertForSequenceClassification):
        return config_cost(model_or_config.config, quant or model_or_config.quant, seq_len)
    if hasattr(model_or_config, "config") and hasattr(model_or_config.config, "hidden_size"):
        return config_cost(model_or_config.config, quant or QuantConfig.full_precision(), seq_len)
    if isinstance(model_or_config, BertConfig):
        return config_cost(model_or_config, quant, seq_len)
    path = Path(model_or_config)
    if path.is_dir():
        d = read_config(path)
    elif path.is_file():
        d = read_json(path)
    else:
        raise BibertError(f"{model_or_config}: no such model folder or {CONFIG_NAME}")
    if d.get("model_type") != "bert":
        raise BibertError(f"{path} describes a {d.get('model_type')!r} model; bibert supports BERT (model_type 'bert')")
    stored = None
    if is_student_config(d):
        d, stored = split_student_config(d, path)
    if quant is None:
        quant = QuantConfig.from_dict(stored) if stored else QuantConfig.full_precision()
    return config_cost(BertConfig.from_dict(d), quant, seq_len)


def _is_packed_file(path: Path) -> bool:
    """A file named *.bibert, or one that starts with the packed format's magic."""
    if not path.is_file():
        return False
    if path.suffix == ".bibert":
        return True
    with open(path, "rb") as f:
        return f.read(8) == b"BIBERTPK"


def _packed_cost(path: Path, seq_len: int, quant: QuantConfig | None) -> CostTable:
    """`config_cost` of a packed model file: its config and quantization, read and checked
    by the packed reader (a bad file is refused with the reader's message)."""
    from types import SimpleNamespace

    from .packed.reader import read_packed

    packed = read_packed(path)
    c = packed.config
    sizes = {k: c[k] for k in ("hidden_size", "intermediate_size", "max_position_embeddings", "num_attention_heads",
                               "num_hidden_layers", "type_vocab_size", "vocab_size")}
    labels = len(c.get("id2label") or {}) or int(c.get("num_labels", 2))
    return config_cost(SimpleNamespace(**sizes, num_labels=labels),
                       quant or QuantConfig.from_dict(packed.quantization), seq_len)


# the older names
summarize = config_cost
model_summary = model_cost
Summary = CostTable
Row = CostRow
