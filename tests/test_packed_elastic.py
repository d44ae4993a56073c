"""Elastic students (docs/method.md §7) in the packed format and engine: export round trip,
every layer's bits and integer counts exactly the student's (thresholds that coincide with
input values and scales != 1 included), end-to-end agreement on a larger model, every
kernel family and thread count alike, and what the reader refuses."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import BertConfig

from bibert import BibertError, QuantConfig
from bibert.modeling import ActQuantizer, BiBertForSequenceClassification
from bibert.packed import PackedModel, export_packed, kernels, load_packed, read_packed
from bibert.packed.engine import BinaryLinear
from bibert.packed.format import PREAMBLE, PackedQuant, expected_tensors, pack_bool
from bibert.quantizers import weight_scale_and_signs
from packed_util import (VOCAB, assert_same_outputs, outputs_everywhere, randomize, save_with_tokenizer,
                         with_header_version)

SHAPES = [dict(hidden=24, heads=3, ffn=40), dict(hidden=130, heads=2, ffn=200), dict(hidden=128, heads=2, ffn=256)]


def batch(vocab: int, B: int = 4, T: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (B, T), generator=g)
    ids[:, 0] = 2
    mask = torch.ones_like(ids)
    for b in range(1, B):
        mask[b, int(torch.randint(1, T + 1, (1,), generator=g)):] = 0
    types = torch.zeros_like(ids)
    types[:, T // 2:] = 1
    return ids, mask, types


def quantizer_inputs(student, ids, mask, types) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Input and output (levels) of every input quantizer, by name, from one forward."""
    seen, hooks = {}, []
    for name, mod in student.named_modules():
        if isinstance(mod, ActQuantizer) and "score_quantizer" not in name:
            hooks.append(mod.register_forward_hook(
                lambda m, i, o, key=name: seen.__setitem__(key, (i[0].detach(), o.detach()))))
    with torch.no_grad():
        student(ids, mask, types)
    for h in hooks:
        h.remove()
    return seen


def make_elastic_student(tmp_path, hidden=24, heads=3, ffn=40, layers=2, labels=3, seed=0, std=0.5,
                         coincide=True, attention="bi", margins=None):
    """A random elastic 1-1-1 student folder (word-level tokenizer beside it): random weights,
    thresholds and scales != 1 (one negative); with `coincide`, some thresholds set to values
    their quantizer actually sees on `batch()` (so that x == t occurs), the context thresholds
    integers and half-integers (the counts' own values). attention "bi-max": Bi-Attention
    relative to each query's best key, with `margins(layer, heads, head_size, rng)` giving each
    layer's per-head margins (default: the student's initial 1)."""
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=ffn, max_position_embeddings=64,
                        num_labels=labels)
    torch.manual_seed(seed)
    student = BiBertForSequenceClassification(config, QuantConfig(activations="elastic", attention=attention)).eval()
    rng = np.random.default_rng(seed)
    quantizers = {n: m for n, m in student.named_modules() if isinstance(m, ActQuantizer) and m.scale is not None}
    randomize(student, std, keep=("LayerNorm.weight", "quantizer"))
    with torch.no_grad():
        for i, (name, q) in enumerate(quantizers.items()):
            C = q.threshold.numel()
            if name.endswith("attention.output.dense.input_quantizer"):  # on integer counts
                q.threshold.copy_(torch.from_numpy(rng.choice([-2.0, -1.0, 0.0, 1.0, 2.0, 0.5, -1.5], C)))
            else:
                q.threshold.copy_(torch.from_numpy(rng.normal(0, 0.3, C)))
            q.scale.fill_(-0.7 if i == 2 else float(rng.uniform(0.3, 2.5)))
        d = hidden // heads
        for n, layer in enumerate(student.bert.encoder.layer):  # "bi-max": the per-head margins
            if attention == "bi-max" and margins is not None:
                layer.attention.self.score_quantizer.threshold.copy_(
                    torch.as_tensor(margins(n, heads, d, rng), dtype=torch.float32))
        for name, m in student.named_modules():  # elastic Bi-Attention's per-head score thresholds, if any
            if name.endswith("score_quantizer") and not m.relative:  # some equal to a score value (A == t: BA = 0)
                pc = rng.integers(0, d + 1, heads)
                exact = (d - 2 * pc).astype(np.float32) / np.float32(np.sqrt(np.float64(d)))
                m.threshold.copy_(torch.from_numpy(np.where(rng.random(heads) < 0.7, exact,
                                                            rng.normal(0, 0.5, heads).astype(np.float32))))
        if coincide:  # in forward order: a quantizer's input depends only on the ones before it
            ids, mask, types = batch(len(VOCAB))
            valid = mask.bool()
            for name, q in quantizers.items():
                if name.endswith("attention.output.dense.input_quantizer"):
                    continue
                x = quantizer_inputs(student, ids, mask, types)[name][0]
                rows = x[valid] if x.dim() == 3 else x  # the pooler's input is [B, H]
                for c in range(0, q.threshold.numel(), 3):
                    q.threshold[c] = rows[int(rng.integers(len(rows))), c]
    return student, save_with_tokenizer(student, tmp_path / f"elastic_{attention}_{hidden}_{heads}_{layers}_{seed}",
                                        VOCAB)


@pytest.fixture(scope="module", params=range(len(SHAPES)), ids=["h24x3", "h130x2", "h128x2"])
def exported(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("elastic")
    student, folder = make_elastic_student(tmp, **SHAPES[request.param], seed=request.param)
    out = tmp / "model.bibert"
    export_packed(folder, out)
    return student, folder, out



def test_export_round_trip(exported):
    student, _, out = exported
    raw = out.read_bytes()
    assert PREAMBLE.unpack_from(raw)[1] == 2  # elastic needs format version 2
    packed = read_packed(out)
    assert packed.format_version == 2 and packed.quantization["activations"] == "elastic"
    assert set(packed.tensors) == set(expected_tensors(packed.config, "float32", PackedQuant(1, "elastic")))
    state = student.state_dict()
    for name in ("bert.encoder.layer.1.output.dense.input_quantizer", "bert.pooler.dense.input_quantizer",
                 "bert.encoder.layer.0.attention.self.input_quantizer"):
        np.testing.assert_array_equal(packed.tensors[name + ".threshold"], state[name + ".threshold"].numpy())
        np.testing.assert_array_equal(packed.tensors[name + ".scale"], state[name + ".scale"].numpy().reshape(1))
    assert not any("window" in name or "qkv_quantizers" in name for name in packed.tensors)  # training only
    alpha, signs = weight_scale_and_signs(state["bert.encoder.layer.0.output.dense.weight"])
    np.testing.assert_array_equal(packed.tensors["bert.encoder.layer.0.output.dense.bits"],
                                  pack_bool(signs.numpy() < 0))
    np.testing.assert_array_equal(packed.tensors["bert.encoder.layer.0.output.dense.alpha"], alpha.numpy())


def test_scales_fold_into_alpha_as_the_student_rounds_them(exported):
    """alpha * s: one float32 product per row, the very value torch computes."""
    student, _, out = exported
    engine = load_packed(out)
    d = student.bert.encoder.layer[0].intermediate.dense
    with torch.no_grad():
        want = d.weight.abs().mean(-1) * d.input_quantizer.scale
    np.testing.assert_array_equal(engine._layers[0].ffn_in.alpha, want.numpy())
    q = student.bert.encoder.layer[1].attention.self
    with torch.no_grad():
        want = torch.cat([lin.weight.abs().mean(-1) for lin in (q.query, q.key, q.value)]) * q.input_quantizer.scale
    np.testing.assert_array_equal(engine._layers[1].qkv.alpha, want.numpy())


def levels_bits(levels: torch.Tensor) -> np.ndarray:
    """Bits of quantizer levels: bit 1 <=> level -1 (signed) or 0 (unsigned)."""
    v = levels.numpy().reshape(-1, levels.shape[-1])
    return kernels.pack_bool(v < 0.5)


def check_layer_by_layer(student, engine, ids, mask, types):
    """Each engine step fed the student's own inputs: every set of bits and every integer
    count identical to the student's, floats equal to rounding."""
    H, I = engine.hidden, engine.intermediate
    B, L = ids.shape
    valid = mask.numpy().astype(bool)
    seen = quantizer_inputs(student, ids, mask, types)
    with torch.no_grad():
        res = student(ids, mask, types, output_hidden_states=True, output_qkv=True)
    for n, (layer, mod) in enumerate(zip(engine._layers, student.bert.encoder.layer)):
        p = f"bert.encoder.layer.{n}."
        x = res.hidden_states[n].reshape(B * L, H).numpy()
        # Q/K/V input bits: a per-channel compare with the shared quantizer's thresholds
        x_in, x_levels = seen[p + "attention.self.input_quantizer"]
        np.testing.assert_array_equal(x_in.reshape(B * L, H).numpy(), x)
        np.testing.assert_array_equal(kernels.sign_pack(x, layer.qkv_t), levels_bits(x_levels))
        # Q, K, V bits (signs of the scaled Linear outputs)
        qkv = layer.qkv(levels_bits(x_levels), out_bits=True)
        q, k, v = (t.transpose(1, 2).reshape(B * L, H) for t in res.qkv[n])
        want = pack_bool(torch.cat([q, k, v], dim=1).numpy() < 0)
        np.testing.assert_array_equal(qkv, want)
        # Bi-Attention: integer counts, and context bits against the context thresholds
        ctx_in, ctx_levels = seen[p + "attention.output.dense.input_quantizer"]
        ctx_bits, counts = kernels.biattention(want, (0, H, 2 * H), B, L, engine.heads, engine.head_size, valid,
                                               counts=True, thresholds=layer.ctx_t, score_limits=layer.score_lim,
                                               relative=layer.score_rel)
        np.testing.assert_array_equal(counts, ctx_in.reshape(B * L, H).numpy().astype(np.int32))
        np.testing.assert_array_equal(ctx_bits, levels_bits(ctx_levels))
        # attention output: float, to rounding
        a_student = seen[p + "intermediate.dense.input_quantizer"][0].reshape(B * L, H)
        a = kernels.layernorm(layer.attn_out(ctx_bits, residual=x), *layer.ln1, engine._eps)
        np.testing.assert_allclose(a, a_student.numpy(), rtol=1e-4, atol=1e-4)
        # FFN-in input bits from the student's LayerNorm output (the first LayerNorm packs them)
        a_levels = seen[p + "intermediate.dense.input_quantizer"][1]
        np.testing.assert_array_equal(kernels.sign_pack(a_student.numpy(), layer.ln1_t), levels_bits(a_levels))
        # FFN-in's integer counts, then its output bits: {0, 1} levels of FFN-out, a compare of
        # the pre-activation with FFN-out's thresholds inside the integer bit epilogue
        din = mod.intermediate.dense
        signs_in = torch.where(din.weight - din.weight.mean(-1, keepdim=True) >= 0, 1.0, -1.0)
        counts_in = BinaryLinear.from_rows(kernels.pack_bool(signs_in.numpy() < 0), H, np.ones(I, np.float32),
                                           np.zeros(I, np.float32))
        got = counts_in(levels_bits(a_levels))
        np.testing.assert_array_equal(got, (a_levels.reshape(B * L, H) @ signs_in.T).numpy())
        pre, z = seen[p + "output.dense.input_quantizer"]
        f = layer.ffn_in(levels_bits(a_levels), out_bits=True)
        np.testing.assert_array_equal(f, levels_bits(z))
        assert set(np.unique(z.numpy())) <= {0.0, 1.0}
        # FFN-out on {0, 1} levels: its integer counts z . sign(Wc), then the float output
        dout = mod.output.dense
        signs_out = torch.where(dout.weight - dout.weight.mean(-1, keepdim=True) >= 0, 1.0, -1.0)
        unit = BinaryLinear.from_rows(kernels.pack_bool(signs_out.numpy() < 0), I, np.ones(H, np.float32),
                                      np.zeros(H, np.float32), zero_one=True)
        np.testing.assert_array_equal(unit(levels_bits(z)), (z.reshape(B * L, I) @ signs_out.T).numpy())
        out_n = kernels.layernorm(layer.ffn_out(levels_bits(z), residual=a_student.numpy()), *layer.ln2, engine._eps)
        np.testing.assert_allclose(out_n, res.hidden_states[n + 1].reshape(B * L, H).numpy(), rtol=1e-4, atol=1e-4)
        # the second LayerNorm packs the next layer's Q/K/V bits with its thresholds
        if n + 1 < engine.num_layers:
            nxt_in, nxt_levels = seen[f"bert.encoder.layer.{n + 1}.attention.self.input_quantizer"]
            np.testing.assert_array_equal(kernels.sign_pack(nxt_in.reshape(B * L, H).numpy(), layer.ln2_t),
                                          levels_bits(nxt_levels))
    # pooler: [CLS] bits against its thresholds, then the head
    cls_in, cls_levels = seen["bert.pooler.dense.input_quantizer"]
    np.testing.assert_array_equal(kernels.sign_pack(cls_in.numpy(), engine._pooler_t), levels_bits(cls_levels))
    logits = engine._head(res.hidden_states[-1][:, 0].numpy())
    np.testing.assert_allclose(logits, res.logits.numpy(), rtol=1e-4, atol=1e-4)


def test_layer_by_layer_exact_against_student(exported, path):
    student, _, out = exported
    check_layer_by_layer(student, load_packed(out), *batch(student.config.vocab_size))


def test_thresholds_do_coincide_with_inputs(exported):
    """The fixture's purpose: some inputs equal their threshold exactly (level +1 / 1)."""
    student, _, _ = exported
    ids, mask, types = batch(student.config.vocab_size)
    seen = quantizer_inputs(student, ids, mask, types)
    equal = {}
    for name, (x, levels) in seen.items():
        mod = student.get_submodule(name)
        if mod.threshold is None:
            continue
        hits = x == mod.threshold
        equal[name] = int(hits.sum())
        assert torch.all(levels[hits] == 1.0)  # x == t gives +1 (or 1), as sign(0) = +1
    assert sum(v > 0 for v in equal.values()) >= len(equal) - 1, equal


def test_end_to_end_agrees_with_student(tmp_path):
    """A larger random model, many sequences of mixed lengths: >= 99.5% identical predictions."""
    student, folder = make_elastic_student(tmp_path, hidden=128, heads=4, ffn=256, layers=4, labels=5, seed=7,
                                           coincide=False)
    check_end_to_end(student, folder, tmp_path)


def check_end_to_end(student, folder, tmp_path) -> None:
    """The packed file of `student` on 400 sequences of mixed lengths: >= 99.5% of its
    predictions identical, and logits within float rounding of the student's."""
    export_packed(folder, tmp_path / "big.bibert")
    engine = load_packed(tmp_path / "big.bibert")
    ids, mask, types = batch(student.config.vocab_size, B=400, T=48, seed=11)
    with torch.no_grad():
        expected = student(ids, mask, types).logits.numpy()
    got = engine.forward(ids.numpy(), mask.numpy(), types.numpy())
    agree = (got.argmax(1) == expected.argmax(1)).mean()
    assert agree >= 0.995, agree
    assert np.median(np.abs(got - expected)) < 1e-3


def test_native_encoder_matches_layer_by_layer_calls(exported):
    student, _, out = exported
    engine = load_packed(out)
    ids, mask, types = batch(student.config.vocab_size)
    _, hidden = engine.forward(ids.numpy(), mask.numpy(), types.numpy(), output_hidden_states=True)
    x, xb = engine._embeddings(ids.numpy(), types.numpy())
    valid = mask.numpy().astype(bool)
    computed = valid.copy()
    computed[:, 0] = True  # forward computes the tokens and each [CLS]; padded rows are zeros
    for n in range(engine.num_layers):
        x, xb = engine._encoder_layer(n, x, xb, valid)
        got = hidden[n + 1].reshape(x.shape)
        np.testing.assert_array_equal(x[computed.reshape(-1)], got[computed.reshape(-1)])
        assert not got[~computed.reshape(-1)].any()


def test_kernel_families_and_threads_identical(exported):
    student, _, out = exported
    ids, mask, types = batch(student.config.vocab_size, B=5, T=20, seed=2)
    assert_same_outputs(outputs_everywhere(out, ids.numpy(), mask.numpy(), types.numpy()))


def test_score_thresholds_are_stored_and_run(exported):
    """Per-head score thresholds (elastic Bi-Attention), when the student has them; zeros (the
    paper's bool of the scores) when it does not."""
    student, _, out = exported
    packed = read_packed(out)
    engine = load_packed(out)
    d = engine.head_size
    for n, layer in enumerate(student.bert.encoder.layer):
        stored = packed.tensors[f"bert.encoder.layer.{n}.attention.self.score_quantizer.threshold"]
        sq = getattr(layer.attention.self, "score_quantizer", None)
        np.testing.assert_array_equal(stored, np.zeros(engine.heads) if sq is None else sq.threshold.detach().numpy())
        # the integer limits decide what the student's float compare decides, for every score
        dots = torch.arange(d, -d - 1, -2, dtype=torch.float32)  # q . k for popcount 0..d
        scores = (dots / math.sqrt(d))[None, :] - torch.from_numpy(stored.copy())[:, None]
        np.testing.assert_array_equal(np.arange(d + 1)[None, :] < engine._layers[n].score_lim[:, None],
                                      (scores > 0).numpy())


def test_export_refuses_parameters_the_format_cannot_hold(exported, tmp_path):
    """A student parameter with no place in the file would be dropped silently: refused."""
    from safetensors.torch import load_file, save_file

    _, folder, _ = exported
    other = tmp_path / "extra"
    other.mkdir()
    for f in folder.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    state = load_file(str(other / "model.safetensors"))
    state["bert.encoder.layer.0.attention.self.other_quantizer.threshold"] = torch.zeros(3)
    save_file(state, str(other / "model.safetensors"))
    with pytest.raises(BibertError, match="other_quantizer.threshold.*no place"):
        export_packed(other, tmp_path / "x.bibert")


def test_fp16_side_parameters_and_predict(exported, tmp_path):
    student, folder, out = exported
    half = export_packed(folder, tmp_path / "half.bibert", side_dtype="float16")
    packed = read_packed(half.path)
    assert packed.tensors["bert.pooler.dense.input_quantizer.threshold"].dtype == np.float16
    engine = load_packed(half.path)
    pred = engine.predict(["w1 w2 w3", "w4"], pairs=["w5", "w6 w7"])
    assert pred.scores.shape == (2, 3) and np.isfinite(pred.logits).all()


def test_zero_thresholds_unit_scales_match_sign_student_except_ffn_out(tmp_path):
    """An elastic student at t = 0, s = 1 computes BiBERT except FFN-out's {0, 1} input: the
    engine's Q/K/V and context bits equal the sign student's engine."""
    student, folder = make_elastic_student(tmp_path, coincide=False)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if name.endswith("quantizer.threshold"):
                p.zero_()
            elif name.endswith("quantizer.scale"):
                p.fill_(1.0)
    student.save_pretrained(folder)
    export_packed(folder, tmp_path / "e.bibert")
    sign = BiBertForSequenceClassification(student.config, QuantConfig())
    sign.load_state_dict({k: v for k, v in student.state_dict().items() if "quantizer" not in k})
    sign.save_pretrained(tmp_path / "sign")
    (tmp_path / "sign" / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    export_packed(tmp_path / "sign", tmp_path / "s.bibert")
    e, s = load_packed(tmp_path / "e.bibert"), load_packed(tmp_path / "s.bibert")
    ids, mask, types = batch(student.config.vocab_size)
    te, ts = {}, {}
    xe, xbe = e._embeddings(ids.numpy(), types.numpy())
    xs, xbs = s._embeddings(ids.numpy(), types.numpy())
    np.testing.assert_array_equal(xbe, xbs)
    e._encoder_layer(0, xe, xbe, mask.numpy().astype(bool), te)
    s._encoder_layer(0, xs, xbs, mask.numpy().astype(bool), ts)
    for key in ("qkv_bits", "context_bits", "context_counts", "attn_out"):
        np.testing.assert_array_equal(te[key], ts[key])
    assert not np.array_equal(te["output"], ts["output"])  # {0, 1} vs +-1 into FFN-out


# ---- the reader ------------------------------------------------------------------------


def test_elastic_header_in_a_version_1_file_is_refused(exported, tmp_path):
    _, _, out = exported
    bad = with_header_version(out, 1, tmp_path / "v1.bibert")
    with pytest.raises(BibertError, match="needs format version 2"):
        read_packed(bad)


def test_elastic_tensors_are_checked_in_memory(exported):
    _, _, out = exported
    good = read_packed(out)
    name = "bert.encoder.layer.0.output.dense.input_quantizer.threshold"
    for change in ({name: good.tensors[name][:-1]}, {name: good.tensors[name].astype(np.float64)},
                   {"bert.pooler.dense.input_quantizer.scale": np.ones((), np.float32)}):
        tensors = {**good.tensors, **change}
        with pytest.raises(BibertError, match="is not a valid bibert file"):
            PackedModel(type(good)(good.config, good.quantization, good.side_dtype, tensors, good.files))
    dropped = {k: v for k, v in good.tensors.items() if k != name}
    with pytest.raises(BibertError, match="missing"):
        PackedModel(type(good)(good.config, good.quantization, good.side_dtype, dropped, good.files))
    as_sign = {**good.quantization, "activations": "sign"}
    with pytest.raises(BibertError, match="not a tensor of a model with this config"):
        PackedModel(type(good)(good.config, as_sign, good.side_dtype, good.tensors, good.files))
