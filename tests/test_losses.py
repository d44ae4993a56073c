"""Each loss against a hand computation in numpy float64 on small tensors."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bibert.errors import BibertError
from bibert.losses import (
    LayerMap,
    attention_score_mse,
    dmd_distill_loss,
    dmd_loss,
    hidden_loss,
    hidden_mse,
    prediction_loss,
    r2b,
    similarity_pattern,
    soft_cross_entropy,
    standard_distill_loss,
)


def rand(*shape, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).normal(size=shape)).double()


def np_r2b(s, t):
    s, t = np.asarray(s, np.float64).ravel(), np.asarray(t, np.float64).ravel()
    return math.sqrt(sum((a / math.sqrt((s**2).sum()) - b / math.sqrt((t**2).sum())) ** 2 for a, b in zip(s, t)))


def np_pattern(f):
    f = np.asarray(f, np.float64)  # (B, nh, T, d)
    B, H, T, d = f.shape
    out = np.zeros((B, H, T, T))
    for b in range(B):
        for h in range(H):
            for i in range(T):
                for j in range(T):
                    out[b, h, i, j] = sum(f[b, h, i, c] * f[b, h, j, c] for c in range(d)) / math.sqrt(d)
    return out


def test_r2b_normalises_the_whole_tensor_not_rows():
    s, t = rand(2, 3, 4, seed=1), rand(2, 3, 4, seed=2)
    assert r2b(s, t).item() == pytest.approx(np_r2b(s, t), rel=1e-12)
    # a per-row normalisation would ignore scaling one row; the whole-tensor norm does not
    s2 = s.clone()
    s2[0, 0] *= 10
    assert r2b(s2, t).item() == pytest.approx(np_r2b(s2, t), rel=1e-12)
    assert r2b(s2, t).item() != pytest.approx(r2b(s, t).item())
    # and scaling the whole tensor does not
    assert r2b(7.5 * s, 0.1 * t).item() == pytest.approx(r2b(s, t).item(), rel=1e-12)
    assert r2b(s, s).item() == pytest.approx(0.0, abs=1e-7)
    assert r2b(s, -s).item() == pytest.approx(2.0, rel=1e-12)


def test_r2b_is_not_squared_and_rejects_shape_mismatch():
    s = torch.tensor([1.0, 0.0], dtype=torch.float64)
    t = torch.tensor([0.0, 3.0], dtype=torch.float64)
    assert r2b(s, t).item() == pytest.approx(math.sqrt(2))
    with pytest.raises(BibertError, match="one shape"):
        r2b(s, torch.zeros(3))


def test_r2b_of_an_all_zero_tensor_is_one_with_finite_gradients():
    """An all-zero tensor has direction 0 (as with a norm guarded by EPS): r2b = ||t_dir|| = 1;
    and identical directions give 0 without an infinite gradient."""
    t = rand(3, 4, seed=8)
    zero = torch.zeros(3, 4, dtype=torch.float64, requires_grad=True)
    out = r2b(zero, t)
    assert out.item() == pytest.approx(1.0, rel=1e-12)
    out.backward()
    assert torch.isfinite(zero.grad).all()
    s = t.clone().requires_grad_()
    same = r2b(s, 3 * t)
    assert same.item() == pytest.approx(0.0, abs=1e-7)
    same.backward()
    assert torch.isfinite(s.grad).all()


def test_r2b_keeps_bf16_inputs_in_float32():
    s, t = rand(3, 5, seed=3), rand(3, 5, seed=4)
    out = r2b(s.bfloat16(), t.bfloat16())
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(np_r2b(s.bfloat16().double(), t.bfloat16().double()), rel=1e-5)


def test_similarity_pattern_matches_loops():
    f = rand(2, 2, 3, 4, seed=5)
    np.testing.assert_allclose(similarity_pattern(f).numpy(), np_pattern(f), rtol=1e-12)


def qkv_stack(layers, seed, shape=(2, 2, 3, 4)):
    return tuple(tuple(rand(*shape, seed=seed + 10 * l + j) for j in range(3)) for l in range(layers))


def test_dmd_loss_sums_r2b_of_patterns_per_layer_and_projection():
    s, t = qkv_stack(2, 0), qkv_stack(2, 100)
    parts = dmd_loss(s, t)
    for j, name in enumerate("qkv"):
        expected = sum(np_r2b(np_pattern(s[l][j]), np_pattern(t[l][j])) for l in range(2))
        assert parts[name].item() == pytest.approx(expected, rel=1e-10)


def test_layer_map_for_a_shallower_student():
    m = LayerMap(2, 6)
    assert m.layers == [2, 5]
    assert m.hidden == [0, 3, 6]
    s, t = qkv_stack(2, 0), qkv_stack(6, 100)
    parts = dmd_loss(s, t, m)
    expected = sum(np_r2b(np_pattern(s[i][0]), np_pattern(t[l][0])) for i, l in enumerate([2, 5]))
    assert parts["q"].item() == pytest.approx(expected, rel=1e-10)
    with pytest.raises(BibertError, match="multiple"):
        LayerMap(4, 6)
    with pytest.raises(BibertError, match="layer map"):
        dmd_loss(qkv_stack(3, 0), t, m)


def test_hidden_loss_covers_the_l_plus_one_states():
    s = tuple(rand(2, 3, 4, seed=i) for i in range(3))
    t = tuple(rand(2, 3, 4, seed=50 + i) for i in range(3))
    expected = sum(np_r2b(a, b) for a, b in zip(s, t))
    assert hidden_loss(s, t).item() == pytest.approx(expected, rel=1e-10)
    t4 = tuple(rand(2, 3, 4, seed=70 + i) for i in range(5))
    expected = np_r2b(s[0], t4[0]) + np_r2b(s[1], t4[2]) + np_r2b(s[2], t4[4])
    assert hidden_loss(s, t4, LayerMap(2, 4)).item() == pytest.approx(expected, rel=1e-10)


def np_log_softmax(z):
    z = np.asarray(z, np.float64)
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def test_prediction_loss_soft_ce_plus_half_ground_truth():
    zs, zt = rand(4, 3, seed=8), rand(4, 3, seed=9)
    y = torch.tensor([0, 2, 1, 2])
    p_t = np.exp(np_log_softmax(zt))
    soft = np.mean([-(p_t[b] * np_log_softmax(zs)[b]).sum() for b in range(4)])
    hard = np.mean([-np_log_softmax(zs)[b, y[b]] for b in range(4)])
    assert soft_cross_entropy(zs, zt).item() == pytest.approx(soft, rel=1e-12)
    assert prediction_loss(zs, zt, y).item() == pytest.approx(soft + 0.5 * hard, rel=1e-12)
    assert prediction_loss(zs, zt, None).item() == pytest.approx(soft, rel=1e-12)


def test_prediction_loss_regression_is_mse_to_the_teacher():
    zs, zt = rand(5, 1, seed=10), rand(5, 1, seed=11)
    expected = np.mean((zs.numpy() - zt.numpy()) ** 2)
    got = prediction_loss(zs, zt, torch.zeros(5), is_regression=True)
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_attention_score_mse_zeroes_padded_keys():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    s = [rand(2, 2, 3, 3, seed=12 + l) for l in range(2)]
    t = [rand(2, 2, 3, 3, seed=20 + l) for l in range(2)]
    for x in s + t:  # what the model emits: -10000 added on padded keys
        x[0, :, :, 2] -= 10000.0
    expected = 0.0
    for l in range(2):
        a, b = s[l].numpy().copy(), t[l].numpy().copy()
        a[0, :, :, 2] = 0
        b[0, :, :, 2] = 0
        expected += ((a - b) ** 2).mean()
    assert attention_score_mse(s, t, mask).item() == pytest.approx(expected, rel=1e-12)


def test_hidden_mse_and_standard_objective():
    hs = tuple(rand(2, 3, 4, seed=30 + i) for i in range(3))
    ht = tuple(rand(2, 3, 4, seed=40 + i) for i in range(3))
    expected_hid = sum(((a.numpy() - b.numpy()) ** 2).mean() for a, b in zip(hs, ht))
    assert hidden_mse(hs, ht).item() == pytest.approx(expected_hid, rel=1e-12)
    mask = torch.ones(2, 3, dtype=torch.long)
    att_s = tuple(rand(2, 2, 3, 3, seed=50 + l) for l in range(2))
    att_t = tuple(rand(2, 2, 3, 3, seed=60 + l) for l in range(2))
    zs, zt = rand(2, 2, seed=70), rand(2, 2, seed=71)
    student = SimpleNamespace(logits=zs, hidden_states=hs, attention_scores=att_s)
    teacher = SimpleNamespace(logits=zt, hidden_states=ht, attention_scores=att_t)
    parts = standard_distill_loss(student, teacher, mask)
    expected_att = sum(((a.numpy() - b.numpy()) ** 2).mean() for a, b in zip(att_s, att_t))
    soft = np.mean(-(np.exp(np_log_softmax(zt)) * np_log_softmax(zs)).sum(-1))
    assert parts["att"].item() == pytest.approx(expected_att, rel=1e-12)
    assert parts["pred"].item() == pytest.approx(soft, rel=1e-12)
    assert parts["loss"].item() == pytest.approx(expected_att + expected_hid + soft, rel=1e-12)
    weighted = standard_distill_loss(student, teacher, mask, pred_weight=2.5)
    assert weighted["pred"].item() == pytest.approx(soft, rel=1e-12)  # the part is logged unweighted
    assert weighted["loss"].item() == pytest.approx(expected_att + expected_hid + 2.5 * soft, rel=1e-12)


def test_dmd_objective_adds_all_parts_with_weight_one():
    hs = tuple(rand(2, 3, 8, seed=80 + i) for i in range(3))
    ht = tuple(rand(2, 3, 8, seed=90 + i) for i in range(3))
    qs, qt = qkv_stack(2, 200), qkv_stack(2, 300)
    zs, zt = rand(2, 2, seed=72), rand(2, 2, seed=73)
    y = torch.tensor([1, 0])
    parts = dmd_distill_loss(SimpleNamespace(logits=zs, hidden_states=hs, qkv=qs),
                             SimpleNamespace(logits=zt, hidden_states=ht, qkv=qt), y)
    total = sum(parts[k].item() for k in ("pred", "q", "k", "v", "hid"))
    assert parts["loss"].item() == pytest.approx(total, rel=1e-12)
    assert parts["hid"].item() == pytest.approx(sum(np_r2b(a, b) for a, b in zip(hs, ht)), rel=1e-10)
    weighted = dmd_distill_loss(SimpleNamespace(logits=zs, hidden_states=hs, qkv=qs),
                                SimpleNamespace(logits=zt, hidden_states=ht, qkv=qt), y, pred_weight=3.0)
    soft = np.mean(-(np.exp(np_log_softmax(zt)) * np_log_softmax(zs)).sum(-1))
    ce = np.mean(-np_log_softmax(zs)[np.arange(2), y.numpy()])
    assert weighted["pred"].item() == pytest.approx(soft + 0.5 * ce, rel=1e-10)
    assert weighted["loss"].item() == pytest.approx(total + 2.0 * (soft + 0.5 * ce), rel=1e-10)


def test_dmd_gradient_is_the_derivative_of_the_loss():
    """The student's gradient of sum(q, k, v) against central differences in float64."""
    s = tuple(tuple(x.clone().requires_grad_(True) for x in layer) for layer in qkv_stack(1, 0, (1, 2, 3, 2)))
    t = qkv_stack(1, 100, (1, 2, 3, 2))
    assert torch.autograd.gradcheck(lambda *f: sum(dmd_loss(((f[0], f[1], f[2]),), t).values()), s[0],
                                    eps=1e-6, atol=1e-8, rtol=1e-6)


def test_distillation_gradient_flows_to_the_student_only(tiny_config):
    """DistillObjective runs the teacher without gradients: after backward every teacher
    parameter has none (even with requires_grad on), every student weight has some."""
    from transformers import BertForSequenceClassification

    from bibert import QuantConfig, binarize
    from bibert.losses import DistillObjective

    torch.manual_seed(0)
    hf = BertForSequenceClassification(tiny_config)
    teacher = binarize(hf, QuantConfig.full_precision()).eval()
    student = binarize(hf).train()
    ids = torch.randint(5, tiny_config.vocab_size, (3, 7))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids),
             "labels": torch.tensor([0, 1, 2])}
    for kind in ("dmd", "standard"):
        student.zero_grad(set_to_none=True)
        objective = DistillObjective(teacher, kind, LayerMap(2, 2), is_regression=False)
        parts = objective(student, batch)
        assert set(parts) == set(objective.parts)
        parts["loss"].backward()
        assert all(p.grad is None for p in teacher.parameters())
        assert all(p.requires_grad for p in teacher.parameters())
        linears = [p for n, p in student.named_parameters() if n.endswith("dense.weight")]
        assert linears and all(p.grad is not None and p.grad.abs().sum() > 0 for p in linears)


def test_masked_dmd_and_hidden_loss_use_only_real_positions():
    """--dmd-mask-padding: the r2b of the patterns restricted to real (query, key) pairs and
    of the hidden states at real positions (reference: select the entries, in float64)."""
    lengths = [4, 2]
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    s, t = qkv_stack(2, 0, (2, 2, 4, 3)), qkv_stack(2, 100, (2, 2, 4, 3))  # (B, nh, T=4, d) per projection

    def real_pairs(p):
        return np.concatenate([p[b, :, :n, :n].ravel() for b, n in enumerate(lengths)])

    parts = dmd_loss(s, t, mask=mask)
    for j, name in enumerate("qkv"):
        expected = sum(np_r2b(real_pairs(np_pattern(s[l][j])), real_pairs(np_pattern(t[l][j]))) for l in range(2))
        assert parts[name].item() == pytest.approx(expected, rel=1e-10)
        assert parts[name].item() != pytest.approx(dmd_loss(s, t)[name].item(), rel=1e-6)  # padding counted by default

    hs = tuple(rand(2, 4, 3, seed=i) for i in range(3))
    ht = tuple(rand(2, 4, 3, seed=30 + i) for i in range(3))

    def real_rows(h):
        h = np.asarray(h)
        return np.concatenate([h[b, :n].ravel() for b, n in enumerate(lengths)])

    expected = sum(np_r2b(real_rows(a), real_rows(b)) for a, b in zip(hs, ht))
    assert hidden_loss(hs, ht, mask=mask).item() == pytest.approx(expected, rel=1e-10)
    # values at padded positions do not matter any more
    noisy = tuple(h.clone().index_put_((torch.tensor([1]), torch.tensor([3])), torch.full((3,), 9.0, dtype=h.dtype))
                  for h in hs)
    assert hidden_loss(noisy, ht, mask=mask).item() == pytest.approx(expected, rel=1e-10)
    # an all-ones mask is the unmasked loss
    ones = torch.ones(2, 4, dtype=torch.long)
    assert dmd_loss(s, t, mask=ones)["k"].item() == pytest.approx(dmd_loss(s, t)["k"].item(), rel=1e-12)
