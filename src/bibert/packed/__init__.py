"""The packed 1-bit model: the file format (`format`: its schema and checks; `reader` and
`writer`: NumPy only; `exporter`: from a student, with PyTorch) and the native bitwise engine."""
from .engine import PackedModel, Predictions, load_packed
from .exporter import ExportReport, export_packed
from .format import PACKED_FORMAT_VERSION, PackedFile, PackedFormatError, PackedQuant
from .reader import read_packed
from .writer import write_packed

__all__ = ["PACKED_FORMAT_VERSION", "ExportReport", "PackedFile", "PackedFormatError", "PackedModel", "PackedQuant",
           "Predictions", "export_packed", "load_packed", "read_packed", "write_packed"]
