"""Elastic binarization: each new quantizer's forward and backward against float64 formulas
(zeros and values at the threshold included), the student built with it, its calibration
from data, and multi-step distillation."""
import math

import pytest
import torch

from bibert import QuantConfig
from bibert.errors import BibertError
from bibert.modeling import (ActQuantizer, BiBertForSequenceClassification, ScoreBinarizer, binarize, calibrate_quantizers,
                             set_activation_hardness)
from bibert.quantizers import binary_linear, binarize_weight, bool_ste, scale_grad, sign_ste, threshold_ste

X = torch.tensor([[-2.5, -1.0, -0.5, -0.0], [0.0, 0.3, 1.0, 1.7], [0.25, 0.7, -0.1, 2.0]], dtype=torch.float64)
T = torch.tensor([0.0, 0.3, -0.5, 0.25], dtype=torch.float64)  # thresholds, some equal to inputs


def reference_levels(x, t, unsigned):
    d = x - t
    return torch.where(d >= 0, 1.0, 0.0 if unsigned else -1.0).to(x.dtype)


@pytest.mark.parametrize("unsigned", [False, True])
@pytest.mark.parametrize("window", [1.0, 0.4, 3.0])
def test_threshold_ste_forward_and_backward(unsigned, window):
    x, t = X.clone().requires_grad_(), T.clone().requires_grad_()
    w = torch.tensor(window, dtype=torch.float64)
    y = threshold_ste(x, t, w, unsigned)
    assert torch.equal(y.detach(), reference_levels(X, T, unsigned))
    g = torch.arange(1.0, 13.0, dtype=torch.float64).reshape(3, 4)
    y.backward(g)
    half = window / 2 if unsigned else window
    expected = [[g[i, j].item() / window if abs(X[i, j].item() - T[j].item()) <= half else 0.0 for j in range(4)]
                for i in range(3)]
    assert torch.allclose(x.grad, torch.tensor(expected, dtype=torch.float64))
    assert torch.allclose(t.grad, -torch.tensor(expected, dtype=torch.float64).sum(0))


def test_threshold_ste_at_zero_threshold_and_unit_window_is_sign_ste():
    x1, x2 = X.clone().requires_grad_(), X.clone().requires_grad_()
    y1 = threshold_ste(x1, torch.zeros(4, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    y2 = sign_ste(x2)
    assert torch.equal(y1, y2)
    g = torch.randn(3, 4, dtype=torch.float64)
    y1.backward(g)
    y2.backward(g)
    assert torch.equal(x1.grad, x2.grad)


def test_strict_threshold_ste_at_zero_and_unit_window_is_bool_ste():
    x1, x2 = X.clone().requires_grad_(), X.clone().requires_grad_()
    y1 = threshold_ste(x1, torch.zeros(4, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64),
                       unsigned=True, strict=True)
    y2 = bool_ste(x2)
    assert torch.equal(y1, y2)
    g = torch.randn(3, 4, dtype=torch.float64)
    y1.backward(g)
    y2.backward(g)
    assert torch.equal(x1.grad, x2.grad)


@pytest.mark.parametrize("window", [1.0, 0.3])
def test_score_quantizer_per_head_threshold_against_formula(window):
    torch.manual_seed(3)
    sb = ScoreBinarizer(3).double()
    with torch.no_grad():
        sb.threshold.copy_(torch.tensor([0.0, 0.5, -0.25], dtype=torch.float64))
        sb.window.fill_(window)
    a = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    a[0, 1, 0, 0] = 0.5  # exactly at the threshold: 0, as the paper's bool at 0
    a[1, 0, 2, 3] = 0.0
    a.requires_grad_()
    y = sb(a)
    t = sb.threshold.detach()[None, :, None, None]
    assert torch.equal(y.detach(), (a.detach() - t > 0).double())
    g = torch.randn_like(a)
    y.backward(g)
    inside = ((a.detach() - t).abs() <= window).double() / window
    assert torch.allclose(a.grad, g * inside)
    assert torch.allclose(sb.threshold.grad, -(g * inside).sum((0, 2, 3)))


@pytest.mark.parametrize("window", [1.0, 0.6])
def test_relative_score_binarizer_keeps_keys_within_the_margin_of_the_row_maximum(window):
    torch.manual_seed(4)
    sb = ScoreBinarizer(2, relative=True).double()
    assert sb.threshold.tolist() == [1.0, 1.0]  # the margin starts at 1
    with torch.no_grad():
        sb.threshold.copy_(torch.tensor([0.5, 0.0], dtype=torch.float64))
        sb.window.fill_(window)
    a = torch.randn(2, 2, 3, 5, dtype=torch.float64)
    a[..., 4] = -10000.0  # a padded key
    a[0, 0, 0, 1] = a[0, 0, 0].max() - 0.5  # exactly at the margin: kept (>=)
    a.requires_grad_()
    y = sb(a)
    m = sb.threshold.detach()[None, :, None, None]
    d = a.detach() - a.detach().amax(-1, keepdim=True) + m
    assert torch.equal(y.detach(), (d >= 0).double())
    assert y.detach()[0, 0, 0, 1] == 1 and (y.detach()[..., 4] == 0).all()
    assert (y.detach().amax(-1) == 1).all()  # each query keeps its best key
    g = torch.randn_like(a)
    y.backward(g)
    inside = (d.abs() <= window / 2).double() / window
    assert torch.allclose(a.grad, g * inside)
    assert torch.allclose(sb.threshold.grad, (g * inside).sum((0, 2, 3)))


def test_bi_max_attention_needs_elastic_activations():
    with pytest.raises(BibertError, match="bi-max"):
        QuantConfig(attention="bi-max")
    assert QuantConfig(attention="bi-max", activations="elastic").binary_attention


def test_scale_grad_is_identity_forward_and_scales_backward():
    s = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    y = scale_grad(s, 0.25)
    assert y.item() == 0.7
    (3.0 * y).backward()
    assert s.grad.item() == pytest.approx(0.75)


@pytest.mark.parametrize("levels", ["signed", "unsigned"])
def test_binary_linear_with_scale_matches_float64_formula_and_gradients(levels):
    torch.manual_seed(0)
    lo = 0.0 if levels == "unsigned" else -1.0
    x = torch.where(torch.rand(5, 7) < 0.5, lo, 1.0).double().requires_grad_()
    w = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(0.37, dtype=torch.float64, requires_grad=True)
    y = binary_linear(x, w, b, s)
    # reference: F.linear on the scaled levels and BiBERT's binarized weight
    x2, w2, b2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    s2 = s.detach().clone().requires_grad_()
    ref = torch.nn.functional.linear(x2 * s2, binarize_weight(w2), b2)
    assert torch.allclose(y, ref, atol=1e-12)
    g = torch.randn(5, 3, dtype=torch.float64)
    y.backward(g)
    ref.backward(g)
    for got, want in ((x.grad, x2.grad), (w.grad, w2.grad), (b.grad, b2.grad), (s.grad, s2.grad)):
        assert torch.allclose(got, want, atol=1e-12)
    # the forward is evaluated as counts * (alpha * s) + b, the engine's rounding order
    alpha = w.detach().abs().mean(-1)
    counts = x.detach() @ torch.where(w.detach() - w.detach().mean(-1, keepdim=True) >= 0, 1.0, -1.0).T.double()
    assert torch.equal(y.detach(), counts * (alpha * s.detach()) + b.detach())


def test_binary_linear_without_scale_is_unchanged():
    torch.manual_seed(1)
    x = torch.where(torch.rand(4, 6) < 0.5, -1.0, 1.0)
    w, b = torch.randn(5, 6), torch.randn(5)
    alpha = w.abs().mean(-1)
    counts = x @ torch.where(w - w.mean(-1, keepdim=True) >= 0, 1.0, -1.0).T
    assert torch.equal(binary_linear(x, w, b), counts * alpha + b)


def test_quant_config_elastic_round_trip_and_errors():
    q = QuantConfig(activations="elastic")
    assert QuantConfig.from_dict(q.to_dict()) == q
    assert QuantConfig.from_dict({"weight_bits": 1, "embedding_bits": 1, "activation_bits": 1,
                                  "attention": "bi", "version": 1}).activations == "sign"
    with pytest.raises(BibertError, match="1-bit activations"):
        QuantConfig(activation_bits=4, activations="elastic")
    with pytest.raises(BibertError, match="unknown activations"):
        QuantConfig(activations="lsq")


def tiny_pair(tiny_config):
    torch.manual_seed(0)
    teacher = BiBertForSequenceClassification(tiny_config, QuantConfig.full_precision()).eval()
    return teacher, binarize(teacher, QuantConfig(activations="elastic"))


def test_elastic_student_has_the_quantizers_and_saves_them(tiny_config, tmp_path):
    teacher, student = tiny_pair(tiny_config)
    names = {n for n, m in student.named_modules() if isinstance(m, ActQuantizer)}
    per_layer = {"attention.self.input_quantizer", "attention.output.dense.input_quantizer",
                 "intermediate.dense.input_quantizer", "output.dense.input_quantizer",
                 "attention.self.qkv_quantizers.0", "attention.self.qkv_quantizers.1", "attention.self.qkv_quantizers.2",
                 "attention.self.score_quantizer"}
    expected = {f"bert.encoder.layer.{i}.{n}" for i in range(2) for n in per_layer} | {"bert.pooler.dense.input_quantizer"}
    assert names == expected
    assert student.bert.encoder.layer[0].output.dense.input_quantizer.unsigned
    student.save_pretrained(tmp_path)
    again = BiBertForSequenceClassification.from_pretrained(tmp_path)
    for k, v in student.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


def test_elastic_student_at_zero_thresholds_unit_scale_computes_bibert_except_ffn_out(tiny_config):
    """With every threshold 0 and every scale 1, the only difference from BiBERT is the {0,1}
    FFN-out input: check it by computing that layer both ways."""
    teacher, student = tiny_pair(tiny_config)
    bibert = binarize(teacher, QuantConfig()).eval()
    student.eval()
    ids = torch.randint(0, tiny_config.vocab_size, (2, 9))
    layer_e, layer_b = student.bert.encoder.layer[0], bibert.bert.encoder.layer[0]
    x = torch.randn(2, 9, tiny_config.hidden_size)
    mask = torch.zeros(2, 1, 1, 9)
    ce, _, _ = layer_e.attention.self(x, mask)
    cb, _, _ = layer_b.attention.self(x, mask)
    assert torch.equal(ce, cb)
    pre = layer_e.intermediate.dense(x)
    assert torch.equal(pre, layer_b.intermediate.dense(x))
    z = (pre >= 0).float()
    d = layer_e.output.dense
    alpha = d.weight.abs().mean(-1)
    ws = torch.where(d.weight - d.weight.mean(-1, keepdim=True) >= 0, 1.0, -1.0)
    assert torch.equal(d(pre), (z @ ws.T) * (alpha * 1.0) + d.bias)
    assert student(ids).logits.shape == (2, 3)


def test_calibration_sets_windows_from_the_student_and_scales_from_the_teacher(tiny_config):
    teacher, student = tiny_pair(tiny_config)
    ids = torch.randint(0, tiny_config.vocab_size, (3, 8))
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[0, 5:] = 0
    seen_s, seen_t = {}, {}
    q = student.bert.encoder.layer[1].attention.output.dense.input_quantizer
    h1 = q.register_forward_hook(lambda m, a, o: seen_s.setdefault("x", a[0].detach()))
    h2 = teacher.bert.encoder.layer[1].attention.output.dense.register_forward_hook(
        lambda m, a, o: seen_t.setdefault("x", a[0].detach()))
    report = calibrate_quantizers(student, {"input_ids": ids, "attention_mask": mask}, teacher)
    h1.remove()
    h2.remove()
    valid = mask.bool()
    assert q.window.item() == pytest.approx(seen_s["x"][valid].abs().mean().item(), rel=1e-6)
    assert q.scale.item() == pytest.approx(seen_t["x"][valid].abs().mean().item(), rel=1e-6)
    ffn = student.bert.encoder.layer[0].output.dense.input_quantizer
    assert report["bert.encoder.layer.0.output.dense.input_quantizer"]["scale"] == pytest.approx(ffn.scale.item())
    # without a teacher the scales stay 1 (the paper's unscaled sign), windows still from data
    _, fresh = tiny_pair(tiny_config)
    calibrate_quantizers(fresh, {"input_ids": ids, "attention_mask": mask})
    assert fresh.bert.pooler.dense.input_quantizer.scale.item() == 1.0
    assert fresh.bert.pooler.dense.input_quantizer.window.item() != 1.0


def test_elastic_student_learns_its_thresholds_and_scales(tiny_config):
    teacher, student = tiny_pair(tiny_config)
    ids = torch.randint(0, tiny_config.vocab_size, (4, 8))
    calibrate_quantizers(student, {"input_ids": ids}, teacher)
    out = student(ids, labels=torch.tensor([0, 1, 2, 0]))
    out.loss.backward()
    grads = {n: p.grad for n, p in student.named_parameters() if "quantizer" in n}
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert any(g.abs().sum() > 0 for n, g in grads.items() if n.endswith("scale"))
    assert any(g.abs().sum() > 0 for n, g in grads.items() if n.endswith("threshold"))


@pytest.mark.parametrize("unsigned", [False, True])
@pytest.mark.parametrize("hardness", [0.0, 0.3, 1.0])
def test_phase_in_blends_levels_with_the_surrogate_and_keeps_the_ste_gradient(unsigned, hardness):
    q = ActQuantizer(4, unsigned=unsigned).double()
    with torch.no_grad():
        q.threshold.copy_(T)
        q.window.fill_(0.8)
    q.hardness = hardness
    x = X.clone().requires_grad_()
    y = q(x)
    u = (X - T) / 0.8
    surrogate = (u + 0.5).clamp(0, 1) if unsigned else u.clamp(-1, 1)  # the hard-tanh the STE stands for
    expected = hardness * reference_levels(X, T, unsigned) + (1 - hardness) * surrogate
    assert torch.allclose(y.detach(), expected, atol=1e-12)
    assert q.binary == (hardness == 1.0)
    g = torch.arange(1.0, 13.0, dtype=torch.float64).reshape(3, 4)
    y.backward(g)
    half = 0.4 if unsigned else 0.8
    ste = torch.where((X - T).abs() <= half, g / 0.8, torch.zeros_like(g))  # threshold_ste's gradient, any hardness
    assert torch.allclose(x.grad, ste)


def test_phase_in_hardness_reaches_the_quantizers_feeding_linears_only(tiny_config):
    student = BiBertForSequenceClassification(tiny_config, QuantConfig(activations="elastic", attention="bi-max"))
    set_activation_hardness(student, 0.25)
    hard = {type(m).__name__: m.hardness for m in student.modules() if isinstance(m, ActQuantizer)}
    assert hard == {"ActQuantizer": 0.25, "ScoreBinarizer": 1.0}  # Bi-Attention's weights stay {0, 1}
    ids = torch.randint(0, tiny_config.vocab_size, (2, 7))
    out = student(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=torch.zeros_like(ids))
    assert torch.isfinite(out.logits).all()  # soft levels take the float path of the binary Linears
    with pytest.raises(ValueError, match="hardness must lie in"):
        set_activation_hardness(student, 1.5)
