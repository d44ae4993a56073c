"""The packed 1-bit model: the file format (`reader`: NumPy only; `exporter`: from a student,
with PyTorch) and the native bitwise engine."""
from .engine import PackedModel, Predictions, load_packed
from .exporter import ExportReport, export_packed, write_packed
from .reader import PACKED_FORMAT_VERSION, PackedFile, read_packed

__all__ = ["PACKED_FORMAT_VERSION", "ExportReport", "PackedFile", "PackedModel", "Predictions", "export_packed",
           "load_packed", "read_packed", "write_packed"]
