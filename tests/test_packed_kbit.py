"""2- and 4-bit activations (students 1-1-2 and 1-1-4) in the packed format and engine, run
bit-serially: the quantizer's levels exactly the student's, every Linear's integer counts and
the attention's exactly the integers the student's quantizers define, layer by layer and end
to end against the integer reference of the student (docs/packed_format.md, "Multi-bit
activations"), every kernel family and thread count alike, and what the reader refuses."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import BertConfig

from bibert import BibertError, QuantConfig
from bibert.modeling import BiBertForSequenceClassification
from bibert.packed import export_packed, kernels, load_packed, read_packed, reference
from bibert.packed.format import PREAMBLE, PackedQuant, expected_tensors
from bibert.quantizers import ACTIVATION_CLIP_STD, quantize_activation
from packed_util import (VOCAB, assert_one_call_is_step_by_step, assert_same_outputs, outputs_everywhere, randomize,
                         save_with_tokenizer)



def make_student(tmp_path, bits, hidden=48, heads=3, ffn=80, layers=2, labels=3, seed=0, std=0.5):
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=ffn, max_position_embeddings=64, num_labels=labels)
    torch.manual_seed(seed)
    student = BiBertForSequenceClassification(config, QuantConfig(1, 1, bits)).eval()
    randomize(student, std)
    return student, save_with_tokenizer(student, tmp_path / f"w1a{bits}_{hidden}_{layers}_{seed}", VOCAB)


def sequence(length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, len(VOCAB), (1, length), generator=g)
    ids[0, 0] = 2
    return ids


@pytest.fixture(scope="module", params=[2, 4], ids=["1-1-2", "1-1-4"])
def exported(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kbit")
    student, folder = make_student(tmp, request.param)
    out = tmp / "model.bibert"
    export_packed(folder, out)
    return request.param, student, folder, out



# ---- the kernels -------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("M,C,scale", [(1, 1, 1.0), (3, 7, 0.01), (13, 64, 1.0), (5, 200, 30.0), (17, 768, 3.0)])
def test_quantize_planes_gives_the_students_levels(path, bits, M, C, scale):
    rng = np.random.default_rng(M * C + bits)
    x = (rng.standard_normal((M, C)) * scale + 0.3 * scale).astype(np.float32)
    x.flat[::5] = 0.0
    planes, step, levels = kernels.quantize_planes(x, bits, ACTIVATION_CLIP_STD[bits], levels=True)
    xq = quantize_activation(torch.from_numpy(x), bits).numpy()
    if M * C == 1:  # the std of one value is NaN: the student gives NaN, the engine level 0
        assert np.isnan(xq).all() and (levels == 0).all()
        return
    n, s = reference.kbit_levels(torch.from_numpy(x), bits)
    assert np.float32(step) == s.numpy()
    np.testing.assert_array_equal(levels, n.numpy().astype(np.int8))
    np.testing.assert_array_equal(levels.astype(np.float32) * np.float32(step), xq)
    Q = (1 << (bits - 1)) - 1
    u = (levels.astype(np.int64) + Q)
    for b in range(bits):  # plane b of row m holds bit b of level + Q; padding bits 0
        np.testing.assert_array_equal(planes[b::bits], kernels.pack_bool((u >> b) & 1 == 1))


def engine_clip(x: np.ndarray, clip_std: float) -> np.float32:
    """The quantizer's clip as kbit.c defines it, in plain Python: the sums of x and of the squared
    deviations from the float32 mean in double, each row's in 32 partial sums (column c in sum c % 32)
    added as a fixed tree, the rows' sums in row order; the std rounded to float32."""
    M, C = x.shape

    def total(f):
        out = 0.0
        for row in x.astype(np.float64).tolist():
            s = [0.0] * 32
            for c, v in enumerate(row):
                s[c % 32] += f(v)
            t = [(s[i] + s[i + 8]) + (s[i + 16] + s[i + 24]) for i in range(8)]
            u = [t[i] + t[i + 4] for i in range(4)]
            out += (u[0] + u[2]) + (u[1] + u[3])
        return out

    n = float(M * C)
    mean = float(np.float32(total(lambda v: v) / n))
    ss = total(lambda v: (v - mean) * (v - mean))
    with np.errstate(divide="ignore", invalid="ignore"):  # one value: 0 / 0
        sd = np.float32(np.sqrt(np.float64(ss) / np.float64(n - 1.0)))
    scaled = np.float32(clip_std) * sd
    clip = np.float32(np.nan) if np.isnan(scaled) else min(np.float32(np.abs(x).max()), scaled)
    return np.float32(clip if np.isnan(clip) else max(clip, np.float32(1e-8)))


def edge_cases(bits: int, rng) -> list[np.ndarray]:
    """Tensors where the quantizer's shortcuts could go wrong: values a few ulps around every
    rounding edge (j - 1/2) step of the levels (a clip of max |x|, the bulk of the values at
    +-max), a mean far from 0 against the std (the std from the sum of squares cannot be certified:
    the deviations are summed), a constant, zeros, a NaN and an infinity, plain random ones."""
    Q = (1 << (bits - 1)) - 1
    out = []
    for t in range(24):
        M, C = int(rng.integers(1, 5)), int(rng.choice([1, 5, 33, 64, 70, 130]))
        A = np.float32(10.0 ** rng.uniform(-4, 4))
        x = (np.where(rng.random((M, C)) < 0.5, -1, 1) * A).astype(np.float32)
        step = np.float32(A / np.float32(Q))
        edges = [np.float32((j - 0.5) * step) for j in range(1, Q + 1)] + [np.float32(0.0)]
        near = [np.nextafter(e, np.float32(np.inf if k > 0 else -np.inf), dtype=np.float32) if k else e
                for e in edges for k in (-1, 0, 1)]
        near += [np.float32(np.nextafter(np.nextafter(e, np.float32(np.inf)), np.float32(np.inf))) for e in edges]
        idx = rng.choice(x.size, size=min(len(near), x.size // 3), replace=False)
        x.flat[idx] = np.array(near[:len(idx)], np.float32) * np.where(rng.random(len(idx)) < 0.5, -1, 1)
        out.append(x)
        if t % 4 == 0:
            out.append((rng.standard_normal((M, C)) * 0.01 + np.float32(rng.choice([1e3, -5e4]))).astype(np.float32))
            out.append((rng.standard_normal((M, C)) * A).astype(np.float32))
    out += [np.full((2, 9), 1.5, np.float32), np.zeros((3, 4), np.float32)]
    for special in (np.nan, np.inf):
        x = rng.standard_normal((2, 33)).astype(np.float32)
        x[1, 5] = special
        out.append(x)
    return out


@pytest.mark.parametrize("bits", [2, 4])
def test_quantizer_exact_at_its_rounding_edges(path, bits):
    """The engine's step is the two-pass std's (the first pass's sum of squares stands in for the
    deviations only where that gives the same float) and its levels the float32 formula's, at the
    edges between levels too (the AVX-512 kernel compares with precomputed thresholds instead of
    dividing), in every kernel family."""
    rng = np.random.default_rng(bits)
    Q = (1 << (bits - 1)) - 1
    for x in edge_cases(bits, rng):
        planes, step, levels = kernels.quantize_planes(x, bits, ACTIVATION_CLIP_STD[bits], levels=True)
        clip = engine_clip(x, ACTIVATION_CLIP_STD[bits])
        if np.isnan(clip):
            assert np.isnan(step) and (levels == 0).all()
            continue
        want = clip / np.float32(Q)
        assert np.float32(step) == want, (x.shape, float(step), float(want))
        levels_want = np.clip(np.rint(np.clip(x, -clip, clip) / want), -Q, Q).astype(np.int8)
        np.testing.assert_array_equal(levels, levels_want)
        u = levels.astype(np.int64) + Q
        for b in range(bits):
            np.testing.assert_array_equal(planes[b::bits], kernels.pack_bool((u >> b) & 1 == 1))


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (5, 63, 31), (7, 65, 33), (12, 768, 96), (3, 200, 64), (9, 130, 70)])
def test_linear_kbit_counts_exactly(path, bits, M, K, N):
    rng = np.random.default_rng(M + K * N + bits)
    x = rng.standard_normal((M, K)).astype(np.float32)
    planes, step, levels = kernels.quantize_planes(x, bits, ACTIVATION_CLIP_STD[bits], levels=True)
    alpha, ws = reference.binarize_rows(rng.standard_normal((N, K)).astype(np.float32))
    bias = rng.standard_normal(N).astype(np.float32)
    residual = rng.standard_normal((M, N)).astype(np.float32)
    wbits = kernels.pack_bool(ws < 0)
    panels, off = kernels.pack_panels(wbits), kernels.kbit_offsets(wbits, K, bits)
    counts = levels.astype(np.int64) @ ws.T
    ones, zeros = np.ones(N, np.float32), np.zeros(N, np.float32)
    np.testing.assert_array_equal(kernels.linear_kbit(planes, M, K, panels, N, bits, 1.0, ones, zeros, off),
                                  counts.astype(np.float32))  # the integer counts themselves
    y = kernels.linear_kbit(planes, M, K, panels, N, bits, step, alpha, bias, off, residual)
    np.testing.assert_array_equal(y, (counts.astype(np.float32) * np.float32(step)) * alpha + bias + residual)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("L,heads,d", [(1, 1, 1), (7, 3, 5), (37, 3, 20), (70, 2, 64), (130, 4, 32)])
def test_biattention_kbit_integers(path, bits, L, heads, d):
    rng = np.random.default_rng(L * heads + d + bits)
    H = heads * d
    lv = [kernels.quantize_planes(rng.standard_normal((L, H)).astype(np.float32), bits, ACTIVATION_CLIP_STD[bits],
                                  levels=True) for _ in range(3)]
    valid = np.arange(L) < max(1, L - 5)
    out, counts = kernels.biattention_kbit(lv[0][2], lv[1][2], lv[2][2], lv[2][1], heads, d, valid, counts=True)
    split = lambda a: a.astype(np.int64).reshape(L, heads, d).transpose(1, 0, 2)
    S = split(lv[0][2]) @ split(lv[1][2]).transpose(0, 2, 1)
    ba = (S > 0) & valid[None, None, :]  # a score of exactly 0 gives 0
    want = (ba.astype(np.int64) @ split(lv[2][2])).transpose(1, 0, 2).reshape(L, H)
    np.testing.assert_array_equal(counts, want)
    np.testing.assert_array_equal(out, want.astype(np.float32) * np.float32(lv[2][1]))


def test_gelu_is_close_to_torchs(path):
    x = (np.random.default_rng(0).standard_normal((64, 3072)) * 3).astype(np.float32)
    np.testing.assert_allclose(kernels.gelu(x), torch.nn.functional.gelu(torch.from_numpy(x)).numpy(), rtol=0,
                               atol=2e-6)


def test_kernel_families_and_threads_identical(exported):
    bits, student, _, out = exported
    ids = sequence(40, seed=2)
    assert_same_outputs(outputs_everywhere(out, ids.numpy()))


# ---- the model ---------------------------------------------------------------------------


def test_export_round_trip(exported):
    bits, student, _, out = exported
    assert PREAMBLE.unpack_from(out.read_bytes())[1] == 3  # multi-bit activations need format version 3
    packed = read_packed(out)
    assert packed.quantization["activation_bits"] == bits
    assert set(packed.tensors) == set(expected_tensors(packed.config, "float32", PackedQuant(bits)))
    np.testing.assert_array_equal(packed.tensors["activation_clip_std"], np.float32([ACTIVATION_CLIP_STD[bits]]))


def test_layer_by_layer_exact_against_the_integer_student(exported, path):
    """Each engine step fed the reference's own inputs: levels and integer counts identical,
    floats equal to rounding (the engine's LayerNorm and GELU are its own)."""
    bits, student, _, out = exported
    engine = load_packed(out)
    ids = sequence(30, seed=1)
    ref = reference.kbit_student_forward(student, ids)
    c = engine._clip_std
    H = engine.hidden
    for n in range(engine.num_layers):
        x = ref["hidden"][n].numpy()
        lv, ct = ref["levels"][n], ref["counts"][n]
        trace = {}
        got = engine._kbit_layer(n, x, np.ones(30, bool), trace)
        xp, _, xl = kernels.quantize_planes(x, bits, c, levels=True)
        np.testing.assert_array_equal(xl, lv["x"].numpy().astype(np.int8))
        layer = engine._layers[n]
        unit = np.ones(3 * H, np.float32), np.zeros(3 * H, np.float32)
        counts = kernels.linear_kbit(xp, 30, H, layer.qkv.panels, 3 * H, bits, 1.0, *unit, layer.qkv.koff)
        np.testing.assert_array_equal(counts, torch.cat([ct["q"], ct["k"], ct["v"]], 1).numpy())
        for i, key in enumerate("qkv"):  # levels of Q, K, V from the reference's own floats
            _, _, ql = kernels.quantize_planes(trace["qkv"][:, i * H:(i + 1) * H], bits, c, levels=True)
            assert (ql != lv[key].numpy()).mean() <= 1e-3  # a float rounding may move a value across a boundary
        _, ctx_counts = kernels.biattention_kbit(lv["q"].numpy(), lv["k"].numpy(), lv["v"].numpy(),
                                                    1.0, engine.heads, engine.head_size, np.ones(30, bool), counts=True)
        np.testing.assert_array_equal(ctx_counts, ct["context"].numpy())
        np.testing.assert_allclose(got, ref["hidden"][n + 1].numpy(), rtol=1e-4, atol=1e-4)
    logits = engine._kbit_head(ref["hidden"][-1][:1].numpy())
    np.testing.assert_allclose(logits, ref["logits"].numpy(), rtol=1e-4, atol=1e-4)


def test_end_to_end_agrees_with_the_integer_student(tmp_path):
    """A larger random model, many sequences of mixed lengths (each on its own, as the student
    computes a batch of one): >= 99.5% identical predictions with the integer reference."""
    for bits in (2, 4):
        student, folder = make_student(tmp_path, bits, hidden=128, heads=4, ffn=256, layers=4, labels=5, seed=7)
        export_packed(folder, tmp_path / f"big{bits}.bibert")
        engine = load_packed(tmp_path / f"big{bits}.bibert")
        agree, n = 0, 100
        for i in range(n):
            ids = sequence(2 + (i * 7) % 47, seed=100 + i)
            want = reference.kbit_student_forward(student, ids)["logits"].numpy()
            agree += int(engine.forward(ids.numpy()).argmax() == want.argmax())
        assert agree / n >= 0.995, (bits, agree / n)


def test_native_forward_is_the_step_by_step_one(exported):
    """The one-call forward (bb_forward_kbit) gives, bit for bit, what `kbit_layer` and
    `kbit_head` give step by step, kernel call by kernel call, for each sequence of a padded
    batch, on every kernel family and with 1 to 3 threads (sequences in parallel, or each step
    split across the threads)."""
    _, _, _, out = exported
    assert_one_call_is_step_by_step(out, [sequence(n, seed=40 + b).numpy()[0] for b, n in enumerate((23, 5, 17, 1))])


def test_a_batch_computes_each_sequence_alone(exported):
    """forward on a padded batch = each sequence alone (its tokens only): the student's k-bit
    clip is a statistic of its whole input tensor, so the engine defines it per sequence."""
    bits, student, _, out = exported
    engine = load_packed(out)
    seqs = [sequence(n, seed=n) for n in (5, 17, 9)]
    ids = np.zeros((3, 17), np.int64)
    mask = np.zeros((3, 17), np.int64)
    for b, s in enumerate(seqs):
        ids[b, :s.shape[1]] = s.numpy()[0]
        mask[b, :s.shape[1]] = 1
    batched, hidden = engine.forward(ids, mask, output_hidden_states=True)
    for b, s in enumerate(seqs):
        alone, alone_hidden = engine.forward(s.numpy(), output_hidden_states=True)
        for h, g in zip(hidden, alone_hidden):
            np.testing.assert_array_equal(h[b, :s.shape[1]], g[0])
        np.testing.assert_array_equal(batched[b], alone[0])
    assert not hidden[-1][mask == 0].any()


def test_predict_texts(exported):
    _, _, _, out = exported
    engine = load_packed(out)
    pred = engine.predict(["w1 w2 w3", "w4 w5"], pairs=["w6", "w7 w8 w9"])
    assert pred.scores.shape == (2, 3) and np.isfinite(pred.logits).all()


def test_export_refuses_other_widths(exported, tmp_path):
    _, _, folder, _ = exported
    config = json.loads((folder / "config.json").read_text())
    for bits in ((1, 1, 8), (2, 1, 4), (1, 4, 4)):
        config["quantization"].update(weight_bits=bits[0], embedding_bits=bits[1], activation_bits=bits[2])
        other = tmp_path / "-".join(map(str, bits))
        other.mkdir()
        for f in folder.iterdir():
            (other / f.name).write_bytes(f.read_bytes())
        (other / "config.json").write_text(json.dumps(config))
        with pytest.raises(BibertError, match="1-1-1, 1-1-2, 1-1-4"):
            export_packed(other, tmp_path / "x.bibert")
