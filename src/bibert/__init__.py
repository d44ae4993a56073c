"""bibert: fully binarized BERT (BiBERT, Qin et al., ICLR 2022).

    import bibert
    student = bibert.binarize("path/to/bert-classifier", bibert.QuantConfig())  # 1-1-1, Bi-Attention
    print(bibert.summary(student, seq_len=128))
"""
from . import _omp

# How PyTorch's OpenMP threads wait: a short spin on an idle machine, passive waiting on a busy
# one, unless the user chose (bibert._omp); it only takes effect when bibert is imported before torch.
_omp.apply()

from .config import QuantConfig  # noqa: E402
from .errors import BibertError  # noqa: E402

_MODELING = ("BiBertForSequenceClassification", "BiBertOutput", "binarize", "load_any_model")
_PACKED = ("PackedModel", "load_packed")  # NumPy, tokenizers and the native engine only

__version__ = "0.1.0"

__all__ = [
    "BatchPredictor",
    "BiBertForSequenceClassification",
    "BiBertOutput",
    "BibertError",
    "PackedModel",
    "QuantConfig",
    "binarize",
    "load_any_model",
    "load_packed",
    "summary",
]


def summary(model_or_config, seq_len: int = 128, quant: QuantConfig | None = None):
    """The per-layer cost table (bits, parameters, memory, binary and float MACs) of a model,
    a BertConfig, a model folder or a config.json: `bibert.cost.model_cost`."""
    from .cost import model_cost

    return model_cost(model_or_config, seq_len=seq_len, quant=quant)


def __getattr__(name: str):
    """The model's names, imported from bibert.modeling (PyTorch) when first used; the packed
    model's from bibert.packed.engine, which needs NumPy, tokenizers and the native engine
    only (no torch or transformers)."""
    if name in _MODELING:
        from . import modeling

        return getattr(modeling, name)
    if name in _PACKED:
        from .packed import engine

        return getattr(engine, name)
    if name == "BatchPredictor":  # scores pandas DataFrames (pandas is optional)
        from .serving.predictor import BatchPredictor

        return BatchPredictor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
