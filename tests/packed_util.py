"""Helpers shared by the packed-engine tests."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from bibert.packed.format import PREAMBLE

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
VOCAB = SPECIAL_TOKENS + [f"w{i}" for i in range(40)]  # word-level vocabulary of the random students


def randomize(student, std: float, keep: tuple[str, ...] = ("LayerNorm.weight",)) -> None:
    """Every parameter whose name holds none of `keep` drawn from N(0, std), in parameter order:
    larger than the 0.02 init, so that activations are not all near zero."""
    with torch.no_grad():
        for name, p in student.named_parameters():
            if not any(k in name for k in keep):
                p.normal_(0, std)


def save_with_tokenizer(student, folder: Path, vocab: list[str]) -> Path:
    """`student` saved in `folder` with a word-level BERT tokenizer of `vocab` beside it."""
    student.save_pretrained(folder)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer",
                                                              "do_lower_case": True}))
    return folder


def assert_same_outputs(results: list) -> None:
    """Every engine output (logits, hidden states) equal to the first, bit for bit."""
    for other in results[1:]:
        np.testing.assert_array_equal(results[0][0], other[0])
        for a, b in zip(results[0][1], other[1]):
            np.testing.assert_array_equal(a, b)


def with_header_version(src: Path, version: int, dest: Path) -> Path:
    """A copy of the packed file `src` whose preamble and header claim `version`, with a
    valid checksum: only the version check can refuse it."""
    raw = src.read_bytes()
    head_len = PREAMBLE.unpack_from(raw)[3]
    header = json.loads(raw[PREAMBLE.size:PREAMBLE.size + head_len])
    header["format_version"] = version
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (head_len - len(text))
    body = PREAMBLE.pack(b"BIBERTPK", version, 0, head_len) + text + raw[PREAMBLE.size + head_len:-32]
    dest.write_bytes(body + hashlib.sha256(body).digest())
    return dest


def outputs_everywhere(path: Path, *inputs) -> list:
    """The engine's (logits, hidden states) for `inputs`, with every kernel family this CPU
    runs and 1, 2 and 3 threads (each time the logits without hidden states, whose last layer
    computes the first rows only, checked equal to them); the process-wide kernel and thread
    settings are restored."""
    from bibert.packed import kernels, load_packed

    results = []
    try:
        for name in kernels.available_kernels():
            for threads in (1, 2, 3):
                engine = load_packed(path, kernel=name, threads=threads)
                results.append(engine.forward(*inputs, output_hidden_states=True))
                np.testing.assert_array_equal(engine.forward(*inputs), results[-1][0])
    finally:
        kernels.set_kernel("auto")
        kernels.set_threads(kernels.default_threads())
    return results


def assert_one_call_is_step_by_step(path: Path, sequences: list[np.ndarray]) -> None:
    """A k-bit model's one-call forward (bb_forward_kbit) on a padded batch of `sequences`
    (token ids, each starting with [CLS]) gives, bit for bit, what `kbit_layer` and
    `kbit_head` give step by step for each sequence alone, on every kernel family and with 1
    to 3 threads (sequences in parallel, or each step split across the threads); the
    process-wide kernel and thread settings are restored."""
    from bibert.packed import kernels, load_packed

    longest = max(len(s) for s in sequences)
    ids = np.zeros((len(sequences), longest), np.int64)
    mask = np.zeros_like(ids)
    for b, seq in enumerate(sequences):
        ids[b, :len(seq)] = seq
        mask[b, :len(seq)] = 1
    try:
        for name in kernels.available_kernels():
            for threads in (1, 2, 3):
                engine = load_packed(path, kernel=name, threads=threads)
                logits, hidden = engine.forward(ids, mask, output_hidden_states=True)
                for b, seq in enumerate(sequences):
                    n = len(seq)
                    x, _ = engine._embeddings(ids[b, :n][None], np.zeros((1, n), np.int64))
                    np.testing.assert_array_equal(hidden[0][b, :n], x)
                    for layer in range(engine.num_layers):
                        x = engine._kbit_layer(layer, x, np.ones(n, bool))
                        np.testing.assert_array_equal(hidden[layer + 1][b, :n], x, err_msg=f"{name} {threads}")
                    np.testing.assert_array_equal(logits[b], engine._kbit_head(x[:1])[0])
    finally:
        kernels.set_kernel("auto")
        kernels.set_threads(kernels.default_threads())
