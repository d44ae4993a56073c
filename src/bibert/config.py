"""`QuantConfig`: which parts of the BERT are quantized, and to how many bits.

A versioned dataclass that round-trips through `to_dict` / `from_dict` (it is stored
inside every checkpoint's config.json). The default is the BiBERT student: 1-bit
weights, 1-bit word embedding, 1-bit activations and Bi-Attention.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

from .errors import BibertError

SUPPORTED_BITS = (1, 2, 4, 8, 32)
ATTENTIONS = ("bi", "softmax")
ACTIVATIONS = ("sign", "elastic")


@dataclass(frozen=True)
class QuantConfig:
    """Bit widths W-E-A and the attention kind.

    weight_bits:     bits of every encoder Linear and the pooler (1 = BiBERT's binarizer).
    embedding_bits:  bits of the word-embedding table (position/token-type stay fp32).
    activation_bits: bits of every input of a quantized Linear (1 = sign, no scale).
    attention:       "bi" = Bi-Attention (bool of the scores, SPEC 2);
                     "softmax" = standard attention with quantized probabilities (SPEC 3).
    activations:     how 1-bit activations are binarized: "sign" = the paper's sign(x)
                     with no scale; "elastic" = learned per-channel thresholds and scales,
                     {0, 1} levels for the FFN-out input (beyond the paper, after BiT;
                     docs/method.md). Needs activation_bits = 1.
    32 bits means full precision; 32-32-32 with "softmax" is exactly BERT.
    """

    weight_bits: int = 1
    embedding_bits: int = 1
    activation_bits: int = 1
    attention: str = "bi"
    activations: str = "sign"

    VERSION: ClassVar[int] = 2  # 2: `activations`

    def __post_init__(self) -> None:
        for name in ("weight_bits", "embedding_bits", "activation_bits"):
            value = getattr(self, name)
            if isinstance(value, bool) or value not in SUPPORTED_BITS:
                raise BibertError(
                    f"unsupported {name}={value!r}: choose one of {', '.join(map(str, SUPPORTED_BITS))}"
                    " (32 = full precision)"
                )
        if self.attention not in ATTENTIONS:
            raise BibertError(f"unknown attention {self.attention!r}: choose 'bi' or 'softmax'")
        if self.activations not in ACTIVATIONS:
            raise BibertError(f"unknown activations {self.activations!r}: choose 'sign' or 'elastic'")
        if self.activations == "elastic" and self.activation_bits != 1:
            raise BibertError(f"elastic binarization applies to 1-bit activations, not {self.activation_bits}-bit ones;"
                              " use activations='sign' or --bits W-E-1")

    @classmethod
    def full_precision(cls) -> "QuantConfig":
        """32-32-32 with softmax attention: computes exactly what BERT computes."""
        return cls(32, 32, 32, "softmax")

    @classmethod
    def from_bits(cls, bits: str, attention: str = "bi", activations: str = "sign") -> "QuantConfig":
        """Parse a W-E-A string such as "1-1-1" or "1-1-4"."""
        parts = str(bits).split("-")
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            raise BibertError(f"bits must look like W-E-A, for example 1-1-1 or 1-1-4; got {bits!r}")
        w, e, a = (int(p) for p in parts)
        return cls(w, e, a, attention, activations)

    @property
    def bits(self) -> str:
        return f"{self.weight_bits}-{self.embedding_bits}-{self.activation_bits}"

    @property
    def elastic(self) -> bool:
        return self.activations == "elastic"

    @property
    def is_full_precision(self) -> bool:
        return self == QuantConfig.full_precision()

    def to_dict(self) -> dict:
        return {**asdict(self), "version": self.VERSION}

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        d = dict(d)
        version = d.pop("version", 1)
        if not isinstance(version, int) or version > cls.VERSION:
            raise BibertError(
                f"quantization config version {version} is newer than this bibert understands"
                f" ({cls.VERSION}); upgrade bibert"
            )
        unknown = set(d) - {"weight_bits", "embedding_bits", "activation_bits", "attention", "activations"}
        if unknown:
            raise BibertError(f"unknown quantization config keys: {sorted(unknown)}")
        return cls(**d)
