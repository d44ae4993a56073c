"""What a (quantized) BERT costs: per-layer bits, parameters, memory and operations.

In the spirit of Larq's `models.summary()`, with the paper's accounting (SPEC 7):
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
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .config import QuantConfig
from .errors import BibertError

ELEMENTWISE_FLOPS = {"add": 1, "scale": 1, "layernorm": 5, "gelu": 8, "softmax": 5, "tanh": 5}
MIB = 2**20


@dataclass
class Row:
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
class Summary:
    bits: str
    attention: str
    seq_len: int
    embedding_bits: int
    rows: list[Row] = field(default_factory=list)

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
            f"size: {t['size_mib']:.2f} MiB stored; {t['size_paper_mib']:.2f} MiB in the paper's accounting",
        ]
        return "\n".join(lines)


def _bops(a: int, b: int) -> int:
    return a * b if a < 32 and b < 32 else 0


def _matmul(row: Row, macs: int, a_bits: int, b_bits: int) -> None:
    if _bops(a_bits, b_bits):
        row.binary_macs += macs
        row.bops_per_mac = _bops(a_bits, b_bits)
    else:
        row.fp_macs += macs


def _linear(name: str, n_in: int, n_out: int, tokens: int, q: QuantConfig) -> Row:
    w, a = q.weight_bits, q.activation_bits
    row = Row(name, "linear", a, w, quantized_params=n_in * n_out, qbits=w, fp_params=n_out)
    row.scales = n_out if w < 32 else 0
    _matmul(row, tokens * n_in * n_out, w, a)
    row.elementwise_flops = tokens * n_out * (1 + (w < 32))  # bias (+ scale)
    return row


def summarize(config, quant: QuantConfig | None = None, seq_len: int = 128) -> Summary:
    """Cost of one sequence of `seq_len` tokens through a BERT classifier of `config`."""
    q = quant or QuantConfig()
    h, i, T = config.hidden_size, config.intermediate_size, seq_len
    nh = config.num_attention_heads
    hs = h // nh
    ew = ELEMENTWISE_FLOPS
    s = Summary(q.bits, q.attention, T, q.embedding_bits)
    e = q.embedding_bits
    s.rows.append(Row("embeddings.word_embeddings", "embedding", "-", e, quantized_params=config.vocab_size * h, qbits=e,
                      scales=config.vocab_size if e < 32 else 0))
    s.rows.append(Row("embeddings.position+token_type+LN", "embedding", "-", 32,
                      aux_params=(config.max_position_embeddings + config.type_vocab_size) * h, fp_params=2 * h,
                      elementwise_flops=T * h * (2 * ew["add"] + ew["layernorm"])))
    for l in range(config.num_hidden_layers):
        p = f"encoder.layer.{l}."
        s.rows += [_linear(p + f"attention.self.{n}", h, h, T, q) for n in ("query", "key", "value")]
        a = q.activation_bits
        scores = Row(p + "attention.scores", "matmul", a, a, elementwise_flops=nh * T * T * 2)
        _matmul(scores, nh * T * T * hs, a, a)
        prob_bits = 1 if q.attention == "bi" else a
        ctx = Row(p + f"attention.context ({q.attention})", "matmul", prob_bits, a,
                  elementwise_flops=nh * T * T * (ew["softmax"] if q.attention == "softmax" else 0))
        _matmul(ctx, nh * T * T * hs, prob_bits, a)
        s.rows += [scores, ctx]
        s.rows.append(_linear(p + "attention.output.dense", h, h, T, q))
        s.rows.append(Row(p + "attention.output.LayerNorm", "norm", 32, 32, fp_params=2 * h, elementwise_flops=T * h * (ew["add"] + ew["layernorm"])))
        inter = _linear(p + "intermediate.dense", h, i, T, q)
        inter.elementwise_flops += T * i * ew["gelu"]
        s.rows.append(inter)
        s.rows.append(_linear(p + "output.dense", i, h, T, q))
        s.rows.append(Row(p + "output.LayerNorm", "norm", 32, 32, fp_params=2 * h, elementwise_flops=T * h * (ew["add"] + ew["layernorm"])))
    pooler = _linear("pooler.dense", h, h, 1, q)
    pooler.elementwise_flops += h * ew["tanh"]
    s.rows.append(pooler)
    s.rows.append(_linear("classifier", h, config.num_labels, 1, QuantConfig.full_precision()))
    return s


def model_summary(model_or_config, seq_len: int = 128, quant: QuantConfig | None = None) -> Summary:
    """`summarize` for a model, a BertConfig, a model folder or a config.json path.

    The quantization comes from `quant`, else from the model / checkpoint, else 1-1-1 "bi".
    """
    from transformers import BertConfig

    from .modeling import BiBertForSequenceClassification

    if isinstance(model_or_config, BiBertForSequenceClassification):
        return summarize(model_or_config.config, quant or model_or_config.quant, seq_len)
    if hasattr(model_or_config, "config") and hasattr(model_or_config.config, "hidden_size"):
        return summarize(model_or_config.config, quant or QuantConfig.full_precision(), seq_len)
    if isinstance(model_or_config, BertConfig):
        return summarize(model_or_config, quant, seq_len)
    path = Path(model_or_config)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise BibertError(f"{model_or_config}: no such model folder or config.json")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BibertError(f"{path} is not valid JSON ({exc})") from None
    if d.get("model_type") != "bert":
        raise BibertError(f"{path} describes a {d.get('model_type')!r} model; bibert supports BERT (model_type 'bert')")
    stored = d.pop("quantization", None)
    d.pop("bibert_format_version", None)
    if quant is None:
        quant = QuantConfig.from_dict(stored) if stored else QuantConfig.full_precision()
    return summarize(BertConfig.from_dict(d), quant, seq_len)
