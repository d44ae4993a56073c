"""Each quantizer's forward and gradient against its formula, on inputs with zeros and values beyond +-1."""
import numpy as np
import pytest
import torch

from bibert.quantizers import (
    ACTIVATION_CLIP_STD,
    binarize_weight,
    binary_linear,
    bool_ste,
    quantize_activation,
    quantize_probs,
    quantize_symmetric,
    sign,
    sign_ste,
    weight_scale_and_signs,
)

X = torch.tensor([-2.5, -1.0, -0.5, -0.0, 0.0, 0.3, 1.0, 1.7], dtype=torch.float64)


def test_sign_is_plus_one_at_zero_and_negative_zero():
    assert sign(X).tolist() == [-1, -1, -1, 1, 1, 1, 1, 1]
    assert sign(torch.tensor([-1e-30, -0.0])).tolist() == [-1, 1]


def test_sign_ste_forward_and_clipped_gradient():
    x = X.clone().requires_grad_()
    y = sign_ste(x)
    g = torch.arange(1.0, 9.0, dtype=torch.float64)
    y.backward(g)
    assert y.tolist() == [-1, -1, -1, 1, 1, 1, 1, 1]
    expected = [0.0 if abs(v) > 1 else gi for v, gi in zip(X.tolist(), g.tolist())]
    assert x.grad.tolist() == expected


def test_sign_source_sets_forward_but_not_gradient():
    pre = torch.tensor([-7.0, -0.2, 0.0, 2.0], dtype=torch.float64)
    post = torch.nn.functional.gelu(pre.float()).double().requires_grad_()  # -7 -> about -0.0
    y = sign_ste(post, pre)
    assert y.tolist() == [-1, -1, 1, 1]
    y.sum().backward()
    assert post.grad.tolist() == [1.0, 1.0, 1.0, 0.0]  # the gradient clips on |gelu(x)| > 1: gelu(2) = 1.95


def test_bool_ste():
    x = X.clone().requires_grad_()
    y = bool_ste(x)
    assert y.tolist() == [0, 0, 0, 0, 0, 1, 1, 1]  # 0 (and -0.0) give 0
    y.backward(torch.ones_like(x))
    assert x.grad.tolist() == [0, 1, 1, 1, 1, 1, 1, 0]


def test_binarize_weight_formula_and_gradient():
    w = torch.tensor([[3.0, -1.0, 0.5, -0.5], [0.0, 0.0, 2.0, -2.0], [1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    wq = w.clone().requires_grad_()
    out = binarize_weight(wq)
    for o in range(3):
        row = w[o]
        alpha = row.abs().mean()
        centred = row - row.mean()
        expected = [alpha.item() * (1.0 if c >= 0 else -1.0) for c in centred.tolist()]
        assert torch.allclose(out[o].detach(), torch.tensor(expected, dtype=torch.float64))
    # row 3 is constant: centred row is all zeros -> all +alpha
    assert out[2].tolist() == [1.0, 1.0, 1.0, 1.0]
    g = torch.randn(3, 4, dtype=torch.float64)
    out.backward(g)
    centred = w - w.mean(dim=1, keepdim=True)
    assert torch.equal(wq.grad, g * (centred.abs() <= 1))
    alpha, signs = weight_scale_and_signs(w)
    assert torch.allclose(alpha[:, None] * signs, out.detach())


def test_k_bit_symmetric_quantizer():
    x = torch.tensor([-3.0, -1.0, -0.26, 0.0, 0.24, 0.9, 2.0], requires_grad=True)
    y = quantize_symmetric(x, 2, torch.tensor(1.0))  # ternary {-1, 0, 1}
    assert y.tolist() == [-1, -1, 0, 0, 0, 1, 1]
    y.sum().backward()
    assert x.grad.tolist() == [0, 1, 1, 1, 1, 1, 0]
    y4 = quantize_symmetric(x.detach(), 4, torch.tensor(1.4))  # 7 levels per side, step 0.2
    assert torch.allclose(y4, torch.tensor([-1.4, -1.0, -0.2, 0.0, 0.2, 0.8, 1.4]))
    z = torch.randn(1000)
    assert quantize_activation(z, 32) is z
    assert len(torch.unique(quantize_activation(z, 2))) <= 3
    assert len(torch.unique(quantize_activation(z, 4))) <= 15


def test_probability_quantizer():
    p = torch.softmax(torch.randn(4, 8), dim=-1)
    assert torch.all(quantize_probs(p, 1) == 1)  # the collapse Bi-Attention avoids
    # 2 bits: the grid {0, 1/3, 2/3, 1}, each probability to its nearest level (a tie to the even step)
    x = torch.tensor([0.0, 0.1, 0.17, 0.3, 0.5, 0.6, 0.84, 1.0], dtype=torch.float64, requires_grad=True)
    q2 = quantize_probs(x, 2)
    assert torch.equal(q2, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3], dtype=torch.float64) / 3)
    g = torch.arange(1.0, 9.0, dtype=torch.float64)
    q2.backward(g)
    assert torch.equal(x.grad, g)  # straight through
    q4 = quantize_probs(torch.tensor([0.02, 0.04, 0.5, 0.97]), 4)  # 15 steps of 1/15
    assert torch.allclose(q4, torch.tensor([0.0, 1.0, 8.0, 15.0]) / 15, atol=0, rtol=1e-7)
    assert quantize_probs(x, 32) is x


def test_k_bit_activation_clip_is_acias_gaussian_optimum():
    """k-bit activations: clip c = min(max|x|, c_k * std(x)) with c_k = 1.71, 2.55, 3.92 for
    2, 4, 8 bits, then the symmetric grid of step c / (2^(k-1) - 1); gradient 1[|x| <= c]."""
    x = torch.tensor([-3.0, -1.0, -0.4, 0.0, 0.2, 0.5, 1.5, 2.5], dtype=torch.float64, requires_grad=True)
    std = float(np.std(x.detach().numpy(), ddof=1))  # torch's std: the unbiased one
    assert std == pytest.approx(1.6448512742146975, rel=1e-12)
    clip = 1.71 * std  # 2.8127, below max|x| = 3
    assert ACTIVATION_CLIP_STD == {2: 1.71, 4: 2.55, 8: 3.92}
    y = quantize_activation(x, 2)  # ternary {-c, 0, c}: x / c rounds to -1 (clamped), 0 (|x / c| < 0.5) or 1
    expected = [-clip, 0.0, 0.0, 0.0, 0.0, 0.0, clip, clip]
    assert np.allclose(y.detach().numpy(), expected, rtol=1e-6, atol=0)  # the std is taken in float32
    y.backward(torch.ones_like(y))
    assert x.grad.tolist() == [0.0 if abs(v) > clip else 1.0 for v in x.detach().tolist()]
    # 4 bits: 2.55 std = 4.19 lies beyond max|x| = 3, so the clip is 3: 7 levels per side of step 3/7
    assert 2.55 * std > 3
    y4 = quantize_activation(x.detach(), 4)
    assert torch.allclose(y4, torch.tensor([-7.0, -2, -1, 0, 0, 1, 4, 6], dtype=torch.float64) * 3 / 7, rtol=1e-12)
    # a sample whose max|x| lies below c_k * std: the clip is max|x|, so the ends are exact
    z = torch.tensor([-1.0, -0.5, 0.25, 1.0], dtype=torch.float64)
    assert 3.92 * float(z.std()) > 1.0
    z8 = quantize_activation(z, 8)
    assert z8[0].item() == -1.0 and z8[-1].item() == 1.0
    assert np.allclose(z8.numpy(), np.round(z.numpy() * 127) / 127, rtol=0, atol=1e-12)


def test_binary_linear_equals_linear_with_binarized_weight_and_its_gradients():
    g = torch.Generator().manual_seed(0)
    x = torch.where(torch.randn(5, 7, 33, generator=g) >= 0, 1.0, -1.0).double()
    w = (torch.randn(9, 33, generator=g) * 0.8).double()
    w[0, :5] = 0.0  # zeros in the row, and entries beyond +-1 from the 0.8 scale
    b = torch.randn(9, generator=g).double()
    upstream = torch.randn(5, 7, 9, generator=g).double()
    args = [t.clone().requires_grad_() for t in (x, w, b)]
    ref_args = [t.clone().requires_grad_() for t in (x, w, b)]
    y = binary_linear(*args)
    ref = torch.nn.functional.linear(ref_args[0], binarize_weight(ref_args[1]), ref_args[2])
    assert torch.allclose(y, ref, atol=1e-12)
    y.backward(upstream)
    ref.backward(upstream)
    for got, expected in zip(args, ref_args):
        assert torch.allclose(got.grad, expected.grad, atol=1e-12)
    centred = w - w.mean(1, keepdim=True)
    formula = (upstream.reshape(-1, 9).T @ x.reshape(-1, 33)) * (centred.abs() <= 1)
    assert torch.allclose(args[1].grad, formula, atol=1e-12)
    # the counts are integers, so y is exactly counts * alpha + b in float32 too
    x32, w32, b32 = x.float(), w.float(), b.float()
    counts = x32 @ torch.where(w32 - w32.mean(1, keepdim=True) >= 0, 1.0, -1.0).T
    assert torch.equal(counts, counts.round())
    assert torch.equal(binary_linear(x32, w32, b32), counts * w32.abs().mean(1) + b32)


def test_binary_linear_under_bf16_autocast_keeps_exact_outputs_and_close_gradients():
    """Mixed precision (--precision bf16): the forward's counts stay exact integers, so y equals
    the float32 result bit for bit; the backward's two matrix products run in bf16 (8 bits of
    mantissa) and land within bf16 rounding of the float64 gradients."""
    g = torch.Generator().manual_seed(1)
    x = torch.where(torch.randn(4, 6, 64, generator=g) >= 0, 1.0, -1.0)
    w = torch.randn(16, 64, generator=g) * 0.8
    b = torch.randn(16, generator=g)
    upstream = torch.randn(4, 6, 16, generator=g)
    args = [t.clone().requires_grad_() for t in (x, w, b)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = binary_linear(*args, integer_input=True)
    assert y.dtype == torch.float32
    assert torch.equal(y, binary_linear(x, w, b, integer_input=True))
    y.backward(upstream)
    ref_args = [t.double().requires_grad_() for t in (x, w, b)]
    binary_linear(*ref_args).backward(upstream.double())
    for got, expected in zip(args, ref_args):
        scale = expected.grad.abs().max()
        assert got.grad.dtype == torch.float32
        assert (got.grad.double() - expected.grad).abs().max() <= 2 ** -7 * scale, "beyond bf16 rounding"
    assert not torch.equal(args[0].grad.double(), ref_args[0].grad)  # the products did run in bf16
