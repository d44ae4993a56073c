"""bibert: fully binarized BERT (BiBERT, Qin et al., ICLR 2022).

    import bibert
    student = bibert.binarize("path/to/bert-classifier", bibert.QuantConfig())  # 1-1-1, Bi-Attention
    print(bibert.summary(student, seq_len=128))
"""
from .config import QuantConfig
from .errors import BibertError
from .modeling import BiBertForSequenceClassification, BiBertOutput, binarize, load_any_model

__version__ = "0.1.0"

__all__ = [
    "BiBertForSequenceClassification",
    "BiBertOutput",
    "BibertError",
    "QuantConfig",
    "binarize",
    "load_any_model",
    "summary",
]


def summary(model_or_config, seq_len: int = 128, quant: QuantConfig | None = None):
    """Per-layer cost table (bits, parameters, memory, binary and float MACs); see bibert.summary module."""
    from .cost import model_summary

    return model_summary(model_or_config, seq_len=seq_len, quant=quant)
