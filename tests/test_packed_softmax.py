"""Softmax attention on 2- and 4-bit activations in the packed format and engine (format
version 5): the students 1-1-2 and 1-1-4 with the straightforward attention (probabilities on
a k-bit grid, docs/method.md §3) computed as the student computes them, layer by layer and end
to end, each sequence of a padded batch as if alone; and what the format refuses."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import BertConfig

from bibert import BibertError, QuantConfig
from bibert.modeling import BiBertForSequenceClassification
from bibert.packed import PackedFormatError, PackedQuant, export_packed, kernels, load_packed, read_packed
from bibert.packed.engine import softmax_attention_kbit
from packed_util import (VOCAB, assert_one_call_is_step_by_step, assert_same_outputs, outputs_everywhere, randomize,
                         save_with_tokenizer)


def make_student(tmp_path, bits, attention="softmax", layers=2, seed=0):
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=48, num_hidden_layers=layers, num_attention_heads=3,
                        intermediate_size=80, max_position_embeddings=64, num_labels=3)
    torch.manual_seed(seed)
    student = BiBertForSequenceClassification(config, QuantConfig(1, 1, bits, attention)).eval()
    randomize(student, 0.5)
    return student, save_with_tokenizer(student, tmp_path / f"w1a{bits}_{attention}", VOCAB)


@pytest.fixture(scope="module", params=[2, 4], ids=["1-1-2", "1-1-4"])
def exported(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("softmax")
    student, folder = make_student(tmp, request.param)
    out = tmp / "model.bibert"
    export_packed(folder, out)
    return request.param, student, out


def ids_of(length: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, len(VOCAB), size=(1, length))
    ids[0, 0] = 2
    return ids


def test_the_file_says_softmax_in_format_version_5(exported):
    bits, _, out = exported
    packed = read_packed(out)
    assert packed.format_version == 5
    quant = PackedQuant.from_dict(packed.quantization)
    assert quant == PackedQuant(bits, "sign", "softmax") and quant.softmax and quant.name == f"{bits}-bit-softmax"


def test_layers_and_predictions_are_the_students(exported):
    """The engine against the student's own forward (float32, a batch of one). The Linears'
    and the attention's integer sums are exact, but the softmax and the grid's products are
    float32 in another order than torch's: where a probability falls within rounding of a grid
    midpoint (or a context value of a level's), the two round apart, and the per-tensor step
    of the next quantizer carries that to the whole layer. So: each layer, given the
    student's input, equals the student's to float32 rounding in at least 85% of the cases
    (5 and 3 of 80 differ here, at lengths up to 64), and the predicted class agrees on at
    least 95% of the sequences end to end (the logits to rounding in 70%)."""
    bits, student, out = exported
    engine = load_packed(out)
    same_layers = same_class = same_logits = layers = 0
    sequences = 40
    for i in range(sequences):
        length = 1 + (7 * i) % 64
        ids = ids_of(length, seed=1000 + i)
        with torch.no_grad():
            ref = student(torch.from_numpy(ids), attention_mask=torch.ones(1, length, dtype=torch.long),
                          output_hidden_states=True)
        hidden = [h[0].numpy() for h in ref.hidden_states]
        for n in range(engine.num_layers):
            got = engine._kbit_layer(n, hidden[n], np.ones(length, bool))
            layers += 1
            same_layers += bool(np.abs(got - hidden[n + 1]).max() <= 1e-5)
        logits = engine.forward(ids, np.ones_like(ids))
        same_class += int(logits.argmax() == ref.logits.argmax().item())
        same_logits += bool(np.abs(logits - ref.logits.numpy()).max() <= 1e-5)
    assert same_layers >= 0.85 * layers and same_class >= 0.95 * sequences and same_logits >= 0.7 * sequences


def test_a_padded_batch_computes_each_sequence_alone(exported):
    _, _, out = exported
    engine = load_packed(out)
    lengths = (23, 5, 17, 1)
    ids = np.zeros((len(lengths), 23), np.int64)
    mask = np.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, :n] = ids_of(n, seed=100 + b)[0]
        mask[b, :n] = 1
    logits, hidden = engine.forward(ids, mask, output_hidden_states=True)
    for b, n in enumerate(lengths):
        alone, alone_hidden = engine.forward(ids[b:b + 1, :n], mask[b:b + 1, :n], output_hidden_states=True)
        np.testing.assert_array_equal(logits[b], alone[0])
        for got, want in zip(hidden, alone_hidden):
            np.testing.assert_array_equal(got[b, :n], want[0])
            assert not got[b, n:].any()  # padded positions are not computed


def test_attention_is_the_grid_formula_in_float64():
    """softmax_attention_kbit against the formula written out in float64 on random levels:
    equal where no probability sits within float32 rounding of a grid step's midpoint."""
    rng = np.random.default_rng(0)
    L, heads, d, bits = 11, 2, 8, 4
    q, k, v = (rng.integers(-7, 8, size=(L, heads * d)).astype(np.int8) for _ in range(3))
    valid = np.ones(L, bool)
    valid[[3, 7]] = False
    steps = (0.31, 0.17, 0.05)
    got = softmax_attention_kbit(q, k, v, steps, heads, d, valid, bits)
    S = 2**bits - 1
    want = np.zeros((L, heads * d))
    for h in range(heads):
        cols = slice(h * d, (h + 1) * d)
        scores = (q[:, cols].astype(np.float64) @ k[valid, cols].T.astype(np.float64)) * steps[0] * steps[1] / np.sqrt(d)
        p = np.exp(scores - scores.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        assert np.abs(p * S - np.floor(p * S) - 0.5).min() > 1e-4  # no grid midpoint within rounding
        want[:, cols] = np.round(p * S) @ v[valid, cols].astype(np.float64) * steps[2] / S
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bits", [2, 4])
def test_native_attention_is_the_numpy_reference(bits):
    """The engine's softmax attention (bb_softmax_attention_kbit) on random levels, lengths 1 to
    300 (past a 128-key block), head sizes with a tail of 64 channels, invalid keys: bit-identical
    on every kernel family and thread count, and equal to the NumPy reference (whose float32 exp
    and sum order differ in the last bits) to float32 rounding on at least 99% of the rows, the
    rest within two grid steps of one value level."""
    rng = np.random.default_rng(bits)
    Q = 2 ** (bits - 1) - 1
    rows = same = 0
    try:
        for trial in range(12):
            L, heads, d = int(rng.integers(1, 300)), int(rng.integers(1, 4)), int(rng.choice([8, 64, 70]))
            q, k, v = (rng.integers(-Q, Q + 1, size=(L, heads * d)).astype(np.int8) for _ in range(3))
            valid = rng.random(L) < 0.8
            valid[0] = True
            steps = tuple(float(np.float32(s)) for s in rng.uniform(0.05, 0.8, 3))
            results = []
            for name in kernels.available_kernels():
                for threads in (1, 3):
                    kernels.set_kernel(name)
                    kernels.set_threads(threads)
                    results.append(kernels.softmax_attention_kbit(q, k, v, steps, heads, d, valid, bits, counts=True))
            for out, counts in results[1:]:
                np.testing.assert_array_equal(out, results[0][0])
                np.testing.assert_array_equal(counts, results[0][1])
            out, counts = results[0]
            np.testing.assert_array_equal(out, counts.astype(np.float32) * np.float32(steps[2] / (2**bits - 1)))
            want = softmax_attention_kbit(q, k, v, steps, heads, d, valid, bits)
            diff = np.abs(out - want).max(axis=1)
            rows += L
            same += int((diff <= 1e-6).sum())
            assert diff.max() <= 2 * Q * steps[2] / (2**bits - 1) + 1e-6
    finally:
        kernels.set_kernel("auto")
        kernels.set_threads(kernels.default_threads())
    assert same >= 0.99 * rows, same / rows


def test_no_valid_key_gives_a_zero_context():
    q = np.ones((3, 8), np.int8)
    out = kernels.softmax_attention_kbit(q, q, q, (0.5, 0.5, 0.5), 1, 8, np.zeros(3, bool), 4)
    assert not out.any()


def test_native_forward_is_the_step_by_step_one(exported):
    """The one-call forward (bb_forward_kbit with softmax attention) gives, bit for bit, what
    `kbit_layer` and `kbit_head` give step by step, kernel call by kernel call, for each sequence
    of a padded batch, on every kernel family and with 1 to 3 threads."""
    _, _, out = exported
    assert_one_call_is_step_by_step(out, [ids_of(n, seed=40 + b)[0] for b, n in enumerate((23, 5, 17, 1))])


def test_kernel_families_and_threads_identical(exported):
    _, _, out = exported
    assert_same_outputs(outputs_everywhere(out, ids_of(60, seed=7)))


def test_softmax_needs_k_bit_activations(tmp_path):
    with pytest.raises(PackedFormatError, match="'softmax' with 1-bit activations"):
        PackedQuant(1, "sign", "softmax")
    _, folder = make_student(tmp_path, 1)
    with pytest.raises(BibertError, match="or softmax attention with 2- or 4-bit activations, can be packed"):
        export_packed(folder, tmp_path / "x.bibert")
