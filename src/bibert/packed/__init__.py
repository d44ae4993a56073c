"""The packed 1-bit model: file format (export / read) and the native bitwise engine."""
from .engine import PackedModel, Predictions, load_packed
from .format import FORMAT_VERSION, ExportReport, export_packed, read_packed

__all__ = ["FORMAT_VERSION", "ExportReport", "PackedModel", "Predictions", "export_packed", "load_packed",
           "read_packed"]
