"""Run a sequence classifier over a labeled split and score it with the task's metrics.

Works with any model whose forward(input_ids=..., attention_mask=...,
token_type_ids=...) returns an object with `.logits` (B, num_labels): the prediction is
the argmax for classification and the squeezed single output for regression. Left
out: writing GLUE test-server submission files.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader

from .batches import TokenizedDataset, make_dataloader
from .errors import BibertError
from .tasks import Task, compute_metrics


@torch.no_grad()
def predict(model, loader: DataLoader, task: Task) -> tuple[np.ndarray, np.ndarray]:
    """Predictions and gold labels over a loader (model in eval mode, no gradients)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    preds, labels = [], []
    for batch in loader:
        if "labels" not in batch:
            raise BibertError(f"{task.name}: this split has no labels, so it cannot be scored")
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device),
                       token_type_ids=batch["token_type_ids"].to(device)).logits  # (B, C)
        if logits.shape[-1] != task.num_labels:
            raise BibertError(f"the model has {logits.shape[-1]} outputs, {task.name} needs {task.num_labels}")
        out = logits.squeeze(-1) if task.is_regression else logits.argmax(-1)  # (B,)
        preds.append(out.float().cpu().numpy())
        labels.append(batch["labels"].cpu().numpy())
    model.train(was_training)
    return np.concatenate(preds), np.concatenate(labels)


def evaluate_model(model, task: Task, data, batch_size: int = 64):
    """Metrics of `model` on `data`.

    data: a DataLoader or TokenizedDataset -> {metric: value}; or a mapping of split
    name to either (e.g. MNLI's dev_matched and dev_mismatched) -> {split: {metric: value}}.
    """
    if isinstance(data, Mapping):
        return {split: evaluate_model(model, task, d, batch_size) for split, d in data.items()}
    if isinstance(data, TokenizedDataset):
        data = make_dataloader(data, batch_size, shuffle=False)
    preds, labels = predict(model, data, task)
    if not task.is_regression:
        preds, labels = preds.astype(np.int64), labels.astype(np.int64)
    return compute_metrics(task, preds, labels)
