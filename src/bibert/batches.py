"""Tokenized features, padded batches and DataLoaders of a task's examples (torch).

`build_dataset` tokenizes `bibert.data.Example`s with a model's tokenizer (truncation, no
padding) and caches the features on disk keyed by the tokenizer, task, max length and a
hash of the examples; `collate_batch` pads per batch; `make_dataloader` batches a
`TokenizedDataset` with that padding, shuffled reproducibly. Training and evaluating a
torch model need this module; reading data (`bibert.data`) and scoring a packed model do
not. Left out: sequence packing.
"""
from __future__ import annotations

import hashlib
import json
from functools import partial

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .checkpoint import atomic_write
from .data import Example
from .errors import BibertError
from .fetch import cache_dir
from .tasks import Task

__all__ = ["TokenizedDataset", "build_dataset", "collate_batch", "make_dataloader"]


class TokenizedDataset(Dataset):
    """Token ids of every example, stored flat (ids + offsets) to stay small in memory.

    Item i is a dict: input_ids and token_type_ids (int64 numpy arrays, no padding)
    and, when labeled, "labels" (int, or float for regression).
    """

    def __init__(self, input_ids: np.ndarray, token_type_ids: np.ndarray, offsets: np.ndarray,
                 labels: np.ndarray | None, is_regression: bool, pad_token_id: int = 0):
        self.input_ids, self.token_type_ids, self.offsets = input_ids, token_type_ids, offsets
        self.labels, self.is_regression, self.pad_token_id = labels, is_regression, pad_token_id

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> dict:
        lo, hi = self.offsets[i], self.offsets[i + 1]
        item = {"input_ids": self.input_ids[lo:hi].astype(np.int64),
                "token_type_ids": self.token_type_ids[lo:hi].astype(np.int64)}
        if self.labels is not None:
            item["labels"] = float(self.labels[i]) if self.is_regression else int(self.labels[i])
        return item

    @property
    def has_labels(self) -> bool:
        return self.labels is not None


def _tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the tokenizer's full spec, without the truncation/padding state a call leaves behind."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
        spec = json.dumps(spec, sort_keys=True)
    else:
        spec = json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{type(tokenizer).__name__}\n{spec}".encode()).hexdigest()


def _examples_fingerprint(examples: list[Example]) -> str:
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(json.dumps([ex.text_a, ex.text_b, ex.label]).encode())
    return digest.hexdigest()


def build_dataset(examples: list[Example], tokenizer, max_length: int, task: Task,
                  cache_key: str | None = None, chunk: int = 2000) -> TokenizedDataset:
    """Tokenize examples (truncating pairs longest-first to max_length), with a disk cache.

    The cache file under `cache_dir()/features` is keyed by the tokenizer (class and
    full tokenizer spec), task name, max length and `cache_key`, which defaults to a
    hash of the examples' content (texts and labels: any change to the source file or
    split changes it). A second call with the same inputs loads in well under a second.
    """
    if not examples:
        raise BibertError(f"{task.name}: no examples to tokenize")
    labeled = all(ex.label is not None for ex in examples)
    key = hashlib.sha256("\n".join([_tokenizer_fingerprint(tokenizer), task.name, str(max_length),
                                    str(labeled), cache_key or _examples_fingerprint(examples)])
                         .encode()).hexdigest()[:24]
    path = cache_dir() / "features" / f"{task.name}-{max_length}-{key}.npz"
    pad = tokenizer.pad_token_id or 0
    if path.exists():
        z = np.load(path)
        return TokenizedDataset(z["input_ids"], z["token_type_ids"], z["offsets"],
                                z["labels"] if labeled else None, task.is_regression, pad)
    from tqdm.auto import tqdm

    ids, types, lengths = [], [], []
    for start in tqdm(range(0, len(examples), chunk), desc=f"tokenizing {task.name}",
                      unit="chunk", disable=len(examples) <= chunk):
        batch = examples[start:start + chunk]
        pairs = [ex.text_b for ex in batch] if task.is_pair else None
        enc = tokenizer([ex.text_a for ex in batch], pairs, truncation=True, max_length=max_length,
                        return_token_type_ids=True)
        for row_ids, row_types in zip(enc["input_ids"], enc["token_type_ids"]):
            ids.extend(row_ids)
            types.extend(row_types)
            lengths.append(len(row_ids))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    input_ids, token_type_ids = np.asarray(ids, dtype=np.int32), np.asarray(types, dtype=np.int8)
    labels = np.asarray([ex.label for ex in examples] if labeled else [],
                        dtype=np.float32 if task.is_regression else np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: np.savez(tmp, input_ids=input_ids, token_type_ids=token_type_ids, offsets=offsets,
                                            labels=labels))
    return TokenizedDataset(input_ids, token_type_ids, offsets, labels if labeled else None,
                            task.is_regression, pad)


def collate_batch(features: list[dict], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Pad a list of dataset items to the longest one.

    Returns LongTensors input_ids, attention_mask (1 = real token), token_type_ids,
    each (B, T), and labels (B,) - long, or float for regression - when items have them.
    """
    longest = max(len(f["input_ids"]) for f in features)
    input_ids = torch.full((len(features), longest), pad_token_id, dtype=torch.long)  # (B, T)
    token_type_ids = torch.zeros((len(features), longest), dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(features), longest), dtype=torch.long)  # (B, T)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        input_ids[i, :n] = torch.as_tensor(f["input_ids"])
        token_type_ids[i, :n] = torch.as_tensor(f["token_type_ids"])
        attention_mask[i, :n] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
    if "labels" in features[0]:
        batch["labels"] = torch.tensor([f["labels"] for f in features])  # (B,)
    return batch


def make_dataloader(dataset: TokenizedDataset, batch_size: int, shuffle: bool = False, seed: int = 0,
                    sampler=None, num_workers: int = 0) -> DataLoader:
    """A DataLoader with dynamic padding; shuffling is reproducible from `seed`.

    sampler: e.g. a DistributedSampler; when given, it decides the order and `shuffle`
    and `seed` are not used.
    """
    generator = torch.Generator().manual_seed(seed) if shuffle and sampler is None else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None,
                      sampler=sampler, generator=generator, num_workers=num_workers,
                      collate_fn=partial(collate_batch, pad_token_id=dataset.pad_token_id))
