"""Elastic students with Bi-Attention relative to each query's best key (attention "bi-max",
docs/method.md §7) in the packed format and engine: the table of smallest attended counts
against a float32 reference of the student's expression, every layer's bits and integer
counts exactly the student's (margins that put scores exactly on the boundary included),
identical predictions with padded and holed masks, every kernel family and thread count
alike, format version 4, and what the exporter and the reader refuse."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from bibert import BibertError
from bibert.modeling import ScoreBinarizer
from bibert.packed import PackedModel, export_packed, load_packed, read_packed
from bibert.packed.exporter import score_count_minima
from bibert.packed.format import PREAMBLE, SCORE_COUNT_MIN, SCORE_THRESHOLD, PackedQuant, expected_tensors
from bibert.packed.writer import write_packed
from packed_util import assert_same_outputs, outputs_everywhere, with_header_version
from test_packed_elastic import batch, check_end_to_end, check_layer_by_layer, make_elastic_student

SHAPES = [dict(hidden=24, heads=3, ffn=40), dict(hidden=130, heads=2, ffn=200), dict(hidden=128, heads=2, ffn=256)]


def score(c: int, d: int) -> np.float32:
    """A score as the student computes it for the integer count c = q . k: c / sqrt(d) in float32."""
    return np.float32(c) / np.float32(np.sqrt(np.float64(d)))


def varied_margins(layer: int, heads: int, d: int, rng) -> np.ndarray:
    """Per-head margins: differences of two scores (a key exactly on the boundary: shifted score
    0, attended), 0 (the best keys only), a few score steps, negative (nothing attended) and
    larger than any spread of scores (every key)."""
    ties = [score(d, d) - score(d - 2, d), score(d - 2, d) - score(d - 6, d), score(4 - d % 2, d) - score(-d + 2, d)]
    choices = ties + [np.float32(0.0), np.float32(2.5 * 2 / np.sqrt(d)), np.float32(1.0), np.float32(-0.25),
                      np.float32(4 * np.sqrt(d))]
    first = [ties[layer % len(ties)], choices[3 + layer % 5]]  # every layer has a tie and another kind
    return np.array(first + list(rng.choice(np.array(choices, np.float32), max(0, heads - 2))), np.float32)[:heads]


def reference_count_minima(margins: np.ndarray, d: int) -> np.ndarray:
    """The smallest attended count per head and row maximum, from the student's expression
    evaluated in NumPy float32: BA = fl(fl(c / sqrt(d)) - fl(c_max / sqrt(d))) + m >= 0."""
    counts = np.arange(-d, d + 1, 2)
    table = np.full((len(margins), d + 1), d + 2, np.int64)
    with np.errstate(invalid="ignore"):
        for h, m in enumerate(np.asarray(margins, np.float32)):
            for j, c_max in enumerate(counts):
                attended = [c for c in counts[: j + 1] if (score(c, d) - score(c_max, d)) + m >= 0]
                if attended:
                    table[h, j] = min(attended)
    return table


@pytest.mark.parametrize("d", [1, 2, 5, 8, 32, 64, 65])
def test_count_minima_match_float_reference(d):
    """score_count_minima (the student's own modules) against NumPy float32, for margins on
    and around every boundary, 0 and -0.0, negative, NaN and large."""
    c = np.arange(-d, d + 1, 2)
    ties = [score(a, d) - score(b, d) for a, b in zip(c[1:], c[:-1])] + [score(d, d) - score(-d, d)]
    near = [np.nextafter(t, np.float32(np.inf)) for t in ties] + [np.nextafter(t, np.float32(-np.inf)) for t in ties]
    margins = np.array(ties + near + [0.0, -0.0, -1e-30, -0.5, np.nan, 1e-30, 3.0, 100.0, 9000.0], np.float32)
    got = score_count_minima(torch.from_numpy(margins), d)
    assert got.dtype == np.int32 and got.shape == (len(margins), d + 1)
    np.testing.assert_array_equal(got, reference_count_minima(margins, d))
    tied = got[: len(ties)]  # a margin equal to a score difference attends the key on the boundary
    for h, (a, b) in enumerate(zip(c[1:], c[:-1])):
        assert tied[h, (a + d) // 2] <= b


def test_count_minima_refuse_margins_that_attend_padded_keys():
    """The student adds -10000 to a padded key's score: a margin that large attends it, which
    the engine never does."""
    assert score_count_minima(torch.tensor([9000.0]), 64).min() == -64
    for margin in (10000.0, 1e6, float("inf")):
        with pytest.raises(BibertError, match="padded keys"):
            score_count_minima(torch.tensor([0.5, margin]), 64)


def test_count_minima_agree_with_the_student_module_on_random_scores():
    """The table decides what ScoreBinarizer decides on a batch of real rows: random integer
    counts, random key masks (at least one real key per row)."""
    rng = np.random.default_rng(3)
    d, heads, T = 16, 6, 40
    margins = varied_margins(0, heads, d, rng)
    table = score_count_minima(torch.from_numpy(margins), d)
    counts = torch.from_numpy(2 * rng.integers(0, d + 1, (3, heads, T, T)) - d).float()
    valid = torch.from_numpy(rng.random((3, T)) < 0.7)
    valid[:, 0] = True
    mask = (1.0 - valid[:, None, None, :].float()) * -10000.0
    sq = ScoreBinarizer(heads, relative=True).eval()
    with torch.no_grad():
        sq.threshold.copy_(torch.from_numpy(margins))
        ba = sq(counts / np.sqrt(d) + mask).numpy() > 0.5
    c = counts.numpy().astype(np.int64)
    c_max = np.where(valid.numpy()[:, None, None, :], c, -d - 1).max(-1)
    lowest = table[np.arange(heads)[None, :, None], (c_max + d) // 2]
    np.testing.assert_array_equal(ba, (c >= lowest[..., None]) & valid.numpy()[:, None, None, :])


# ---- a bi-max student, exported and run -----------------------------------------------


def score_inputs(student, ids, mask, types) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's scores (B, heads, T, T) at its score quantizer, and what it attends."""
    seen = {}
    hooks = [layer.attention.self.score_quantizer.register_forward_hook(
        lambda m, i, o, n=n: seen.__setitem__(n, (i[0].detach(), o.detach())))
        for n, layer in enumerate(student.bert.encoder.layer)]
    with torch.no_grad():
        student(ids, mask, types)
    for h in hooks:
        h.remove()
    return seen


def put_keys_on_the_boundary(student, folder, seed: int) -> None:
    """Sets the first head's margin of every layer (in forward order) to the gap between the
    best key and another real key of some row on `batch()`, as the student's float32 computes
    the gap, so that the other key's shifted score is exactly 0; saves the student again."""
    rng = np.random.default_rng(seed)
    ids, mask, types = batch(student.config.vocab_size)
    pairs = mask.bool()[:, None, :] & mask.bool()[:, :, None]  # (B, T, T) real query and key
    for n, layer in enumerate(student.bert.encoder.layer):
        scores = score_inputs(student, ids, mask, types)[n][0][:, 0]  # head 0
        gap = scores - scores.amax(-1, keepdim=True)  # (B, T, T), the student's subtraction
        candidates = ((gap < 0) & pairs).nonzero()
        b, i, j = candidates[int(rng.integers(len(candidates)))]
        with torch.no_grad():
            layer.attention.self.score_quantizer.threshold[0] = -gap[b, i, j]
    student.save_pretrained(folder)


@pytest.fixture(scope="module", params=range(len(SHAPES)), ids=["h24x3", "h130x2", "h128x2"])
def exported(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bimax")
    student, folder = make_elastic_student(tmp, **SHAPES[request.param], seed=request.param, attention="bi-max",
                                           margins=varied_margins)
    put_keys_on_the_boundary(student, folder, request.param)
    out = tmp / "model.bibert"
    export_packed(folder, out)
    return student, folder, out



def test_export_round_trip(exported):
    student, _, out = exported
    assert PREAMBLE.unpack_from(out.read_bytes())[1] == 4  # bi-max needs format version 4
    packed = read_packed(out)
    assert packed.format_version == 4 and packed.quantization["attention"] == "bi-max"
    assert set(packed.tensors) == set(expected_tensors(packed.config, "float32", PackedQuant(1, "elastic", "bi-max")))
    assert not any(name.endswith(SCORE_THRESHOLD) for name in packed.tensors)  # the table replaces the margins
    d = student.config.hidden_size // student.config.num_attention_heads
    for n, layer in enumerate(student.bert.encoder.layer):
        margins = layer.attention.self.score_quantizer.threshold.detach().numpy()
        table = packed.tensors[f"bert.encoder.layer.{n}.{SCORE_COUNT_MIN}"]
        assert table.dtype == np.dtype("<i4") and table.shape == (len(margins), d + 1)
        np.testing.assert_array_equal(table, reference_count_minima(margins, d))


def test_margins_put_scores_on_the_boundary(exported):
    """The fixture's purpose: in every layer some real (query, key) pair has a shifted score of
    exactly 0 (attended), and some keys are left out."""
    student, _, _ = exported
    ids, mask, types = batch(student.config.vocab_size)
    pairs = mask.bool()[:, None, :, None] & mask.bool()[:, None, None, :]
    for n, (scores, ba) in score_inputs(student, ids, mask, types).items():
        margins = student.bert.encoder.layer[n].attention.self.score_quantizer.threshold.detach()
        shifted = (scores - scores.amax(-1, keepdim=True)) + margins[None, :, None, None]
        on_boundary = (shifted == 0) & (scores < scores.amax(-1, keepdim=True)) & pairs
        assert on_boundary.any(), f"layer {n}: no key exactly on the boundary"
        assert torch.all(ba[on_boundary] == 1)
        real = ba[pairs.expand_as(ba)]
        assert (real == 0).any() and (real == 1).any()


def test_layer_by_layer_exact_against_student(exported, path):
    student, _, out = exported
    check_layer_by_layer(student, load_packed(out), *batch(student.config.vocab_size))


def test_relative_limits_from_the_file(exported):
    """The engine's limits per head and row minimum popcount are the file's table."""
    student, _, out = exported
    engine, packed = load_packed(out), read_packed(out)
    d = engine.head_size
    for n, layer in enumerate(engine._layers):
        assert layer.score_lim is None
        table = packed.tensors[f"bert.encoder.layer.{n}.{SCORE_COUNT_MIN}"]
        for p_min in range(d + 1):
            c_min = table[:, (d - 2 * p_min + d) // 2]
            attend = (d - 2 * np.arange(d + 1))[None, :] >= c_min[:, None]  # by popcount
            np.testing.assert_array_equal(np.arange(d + 1)[None, :] < layer.score_rel[:, p_min][:, None], attend)


def padded_masks(B: int, T: int) -> np.ndarray:
    mask = np.ones((B, T), np.int64)
    mask[1, 9:] = 0  # right padding
    mask[2, 3:] = 0
    mask[3, [2, 5, 6, 11]] = 0  # holes
    mask[4, 0] = 0  # the first position not a token: a query, never a key
    mask[5, 1:] = 0  # [CLS] alone
    return mask


def test_predictions_identical_with_padding(tmp_path):
    """Thresholds away from the inputs (so that float rounding in the LayerNorms cannot flip a
    bit): every sequence's logits are the student's to rounding, its prediction identical."""
    student, folder = make_elastic_student(tmp_path, hidden=48, heads=4, ffn=96, layers=3, labels=4, seed=5,
                                           coincide=False, attention="bi-max", margins=varied_margins)
    export_packed(folder, tmp_path / "m.bibert")
    engine = load_packed(tmp_path / "m.bibert")
    ids, _, types = batch(student.config.vocab_size, B=6, T=14, seed=5)
    mask = padded_masks(6, 14)
    with torch.no_grad():
        expected = student(ids, torch.from_numpy(mask), types).logits.numpy()
    got = engine.forward(ids.numpy(), mask, types.numpy())
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(got.argmax(1), expected.argmax(1))
    # the native encoder and the step-by-step path agree
    x, xb = engine._embeddings(ids.numpy(), types.numpy())
    for n in range(engine.num_layers):
        x, xb = engine._encoder_layer(n, x, xb, mask.astype(bool))
    np.testing.assert_array_equal(got, engine._head(x.reshape(6, 14, -1)[:, 0]))


def test_sequence_without_tokens_attends_to_nothing(exported):
    """A mask of no token at all: no real key, so nothing is attended (the context counts are
    0) and [CLS] is still computed; the student's torch code would instead take the maximum
    over the padded keys."""
    student, _, out = exported
    engine = load_packed(out)
    ids, _, types = batch(student.config.vocab_size, B=2, T=6)
    mask = np.array([[1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0]])
    trace = {}
    x, xb = engine._embeddings(ids.numpy(), types.numpy())
    engine._encoder_layer(0, x, xb, mask.astype(bool), trace)
    counts = trace["context_counts"].reshape(2, 6, -1)
    assert not counts[1].any()
    logits = engine.forward(ids.numpy(), mask, types.numpy())
    assert np.isfinite(logits).all()
    with torch.no_grad():
        expected = student(ids[:1], torch.from_numpy(mask[:1]), types[:1]).logits.numpy()
    np.testing.assert_allclose(logits[:1], expected, rtol=1e-4, atol=1e-4)


def test_end_to_end_agrees_with_student(tmp_path):
    """A larger random model, many sequences of mixed lengths: >= 99.5% identical predictions."""
    student, folder = make_elastic_student(tmp_path, hidden=128, heads=4, ffn=256, layers=4, labels=5, seed=7,
                                           coincide=False, attention="bi-max", margins=varied_margins)
    check_end_to_end(student, folder, tmp_path)


def test_kernel_families_and_threads_identical(exported):
    student, _, out = exported
    ids, mask, types = batch(student.config.vocab_size, B=5, T=20, seed=2)
    assert_same_outputs(outputs_everywhere(out, ids.numpy(), mask.numpy(), types.numpy()))


# ---- what the exporter and the reader refuse --------------------------------------------


def copy_folder(folder, target):
    shutil.copytree(folder, target)
    return target


def test_export_refuses_margins_that_attend_padded_keys(exported, tmp_path):
    from safetensors.torch import load_file, save_file

    _, folder, _ = exported
    other = copy_folder(folder, tmp_path / "wide")
    state = load_file(str(other / "model.safetensors"))
    name = f"bert.encoder.layer.1.{SCORE_THRESHOLD}"
    state[name] = torch.full_like(state[name], 20000.0)
    save_file(state, str(other / "model.safetensors"))
    with pytest.raises(BibertError, match="layer.1.*attend to padded keys"):
        export_packed(other, tmp_path / "x.bibert")


@pytest.mark.parametrize("change,match", [
    ({"activations": "sign"}, "'bi-max' with activations 'sign'"),
    ({"activation_bits": 4}, "1-1-4 with attention 'bi-max'|'bi-max' with 4-bit|must be 'sign'"),
    ({"attention": "softmax"}, "attention 'softmax'"),
])
def test_export_refuses_what_the_format_cannot_hold(exported, tmp_path, change, match):
    _, folder, _ = exported
    other = copy_folder(folder, tmp_path / "changed")
    config = json.loads((other / "config.json").read_text())
    config["quantization"].update(change)
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(BibertError, match=match):
        export_packed(other, tmp_path / "x.bibert")


def test_bimax_header_in_a_version_3_file_is_refused(exported, tmp_path):
    _, _, out = exported
    bad = with_header_version(out, 3, tmp_path / "v3.bibert")
    with pytest.raises(BibertError, match="needs format version 4"):
        read_packed(bad)


def test_tables_are_checked_in_memory(exported):
    """Tables the student cannot produce are refused before the engine sees them, as is the
    writer asked to write them."""
    _, _, out = exported
    good = read_packed(out)
    name = f"bert.encoder.layer.0.{SCORE_COUNT_MIN}"
    table = good.tensors[name]
    heads, cols = table.shape
    d = cols - 1

    def with_value(row, col, value):
        t = table.copy()
        t[row, col] = value
        return t

    best = np.tile(np.arange(-d, d + 1, 2, dtype=np.int32), (heads, 1))  # the best keys only: c_min = c_max
    above, falling, partly = best.copy(), best.copy(), best.copy()
    above[0, 0] = -d + 2  # more than its row maximum -d
    falling[0, -1] = -d  # d - 2 at c_max = d - 2, then -d at c_max = d
    partly[0, -1] = d + 2  # nothing attended for one row maximum only
    bad = {"shape": table[:, :-1], "dtype": table.astype(np.int64), "float": table.astype(np.float32),
           "below -d": with_value(0, 0, -d - 2), "past d + 2": with_value(0, 0, d + 4),
           "parity": with_value(0, 0, -d + 1), "above its maximum": above, "falling": falling,
           "nothing for one row only": partly}
    for label, t in bad.items():
        tensors = {**good.tensors, name: t}
        packed = type(good)(good.config, good.quantization, good.side_dtype, tensors, good.files)
        with pytest.raises(BibertError, match="is not a valid bibert file"):
            PackedModel(packed)
        with pytest.raises(BibertError, match="refusing to write"):
            write_packed(packed, out.parent / f"bad-{label}.bibert")
    for label, t in {"best keys only": best, "every key": np.full_like(best, -d),
                     "nothing": np.full_like(best, d + 2)}.items():
        PackedModel(type(good)(good.config, good.quantization, good.side_dtype, {**good.tensors, name: t},
                               good.files))
    with pytest.raises(BibertError, match="not a tensor of a model with this config"):
        as_bi = {**good.quantization, "attention": "bi"}
        PackedModel(type(good)(good.config, as_bi, good.side_dtype, good.tensors, good.files))
