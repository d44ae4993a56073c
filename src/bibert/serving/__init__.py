"""Serving a packed model: batch prediction over files (`predict_file`) and an HTTP server
(`bibert.serving.server`, which needs the `serve` extra: pip install "bibert[serve]")."""
from .batch_predict import FileSummary, predict_file

__all__ = ["FileSummary", "predict_file"]
