"""Quantizers of BiBERT, each a pure function with its forward and backward formula.

Follows docs/method.md §1-3 (Qin et al., "BiBERT: Accurate Fully Binarized BERT", ICLR
2022). One deliberate definition everywhere, in training and in the packed engine:

    sign(x) = +1 if x >= 0 else -1        (IEEE compare: -0.0 -> +1, never 0)

so that every binarized value fits in one bit. The k-bit quantizers (2, 4, 8 bits) are
the comparison rows of the paper's table (BinaryBERT 1-1-2, 1-1-4); they are simple,
documented uniform quantizers, not BinaryBERT's exact learned-step variant.
"""
from __future__ import annotations

import os

import torch

# Clipping multiples of the standard deviation for k-bit activations: the MSE-optimal
# clipping of a Gaussian (Banner et al., "ACIQ", 2019). Full precision beyond 8 bits.
ACTIVATION_CLIP_STD = {2: 1.71, 4: 2.55, 8: 3.92}


def sign(x: torch.Tensor) -> torch.Tensor:
    """+1 where x >= 0 (including -0.0), -1 elsewhere; same dtype as x."""
    return plus_minus_one(x >= 0, x.dtype)


def plus_minus_one(positive: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """+1 where `positive` (bool), -1 elsewhere, in dtype (a few times faster on CPU than
    torch.where with scalars)."""
    return positive.to(dtype).mul_(2).sub_(1)


class _SignSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sign_source):
        ctx.save_for_backward(x)
        return sign(sign_source)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1), None  # a bool factor: the same products, one pass fewer


def sign_ste(x: torch.Tensor, sign_source: torch.Tensor | None = None) -> torch.Tensor:
    """Activation binarizer ("ste_sign").

    forward:  sign(x)                          (no scaling factor)
    backward: dL/dx = dL/dy * 1[|x| <= 1]      (clipped straight-through estimator)

    `sign_source`, when given, supplies the forward signs while the gradient still
    follows x. FFN-out uses it: its input is GELU(h), whose sign is sign(h) although
    GELU underflows to -0.0 for h below about -5.5.
    """
    return _SignSTE.apply(x, x if sign_source is None else sign_source)


class _BoolSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return (x > 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1)


def bool_ste(x: torch.Tensor) -> torch.Tensor:
    """Bi-Attention's binarizer of the attention scores.

    forward:  1 if x > 0 else 0                (x == 0 gives 0)
    backward: dL/dx = dL/dy * 1[|x| <= 1]
    """
    return _BoolSTE.apply(x)


def centre_rows(w: torch.Tensor) -> torch.Tensor:
    """Wc = W - mean_i W[o, i]: each row minus its mean, what the weight binarizer takes the sign of."""
    return w - w.mean(dim=-1, keepdim=True)


def _scale_and_centred(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha = mean_i |W[o,i]| per row, Wc = W - row mean): the two halves of the binarizer."""
    return w.abs().mean(dim=-1), centre_rows(w)


def positive_signs(w: torch.Tensor) -> torch.Tensor:
    """sign(Wc) == +1 of `binarize_weight`, as a bool tensor (the bits its signs take)."""
    return centre_rows(w) >= 0


class _RowBinarize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w):
        alpha, centred = _scale_and_centred(w)
        ctx.save_for_backward(centred)
        return alpha[..., None] * sign(centred)

    @staticmethod
    def backward(ctx, grad):
        (centred,) = ctx.saved_tensors
        return grad * (centred.abs() <= 1)


def binarize_weight(w: torch.Tensor) -> torch.Tensor:
    """BiBERT's weight (and word-embedding) binarizer, one scale per row.

    forward:  alpha_o * sign(W[o,:] - mean_i W[o,i]),  alpha_o = mean_i |W[o,i]|
              (alpha on the un-centred row)
    backward: dL/dW = dL/dWb * 1[|Wc| <= 1]            (Wc the centred row; alpha and the
              row mean are treated as constants)
    """
    return _RowBinarize.apply(w)


def _integer_matmul_available() -> bool:
    """Whether torch has the int8 x int8 -> int32 matmul on CPU (exact integer counts)."""
    try:
        a = torch.ones(2, 8, dtype=torch.int8)
        return bool(torch._int_mm(a, a.T.contiguous()).eq(8).all())
    except (AttributeError, RuntimeError):
        return False


# BIBERT_INT_MM=0 turns the int8 path off (float counts everywhere: the same numbers, slower on CPU)
_INT_MM = os.environ.get("BIBERT_INT_MM", "1") != "0" and _integer_matmul_available()


def integer_counts(levels: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """levels (..., K) of integers in [-1, 1] times signs (O, K) in {-1, +1}, transposed:
    (..., O), exact, in levels' dtype. On CPU an int8 matmul with int32 accumulation (several
    times faster than float32 there); elsewhere a float matmul (exact for K < 2^24)."""
    if _INT_MM and levels.device.type == "cpu" and levels.dtype.is_floating_point:
        flat = levels.reshape(-1, levels.shape[-1]).to(torch.int8)
        counts = torch._int_mm(flat, signs.to(torch.int8).T)  # (N, O) int32
        return counts.to(levels.dtype).reshape(*levels.shape[:-1], signs.shape[0])
    return torch.nn.functional.linear(levels, signs.to(levels.dtype))


class _BinaryLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, bias, act_scale, integer_input):
        alpha, centred = _scale_and_centred(w)  # (out,), (out, in)
        signs = sign(centred)
        ctx.save_for_backward(x, centred, alpha, signs, act_scale)
        # gradients in bf16 when the forward runs under bf16 autocast (mixed precision)
        ctx.low_precision = torch.is_autocast_enabled(x.device.type)
        if integer_input:  # +-1 / {0,1} levels: exact integer counts
            counts = integer_counts(x, signs)
        else:
            counts = torch.nn.functional.linear(x, signs.to(x.dtype))
        scale = alpha if act_scale is None else alpha * act_scale  # one float per output row
        return counts * scale + bias  # two roundings, as the packed engine's epilogue

    @staticmethod
    def backward(ctx, grad):
        x, centred, alpha, signs, act_scale = ctx.saved_tensors
        mm = torch.bfloat16 if ctx.low_precision else grad.dtype
        g2 = grad.reshape(-1, grad.shape[-1])  # (N, out)
        grad_xb = (grad.to(mm) @ (alpha[:, None] * signs).to(mm)).to(grad.dtype)  # dL/d(scaled input)
        xq = x if act_scale is None else x * act_scale  # the input as the Linear sees it
        grad_w = (g2.T.to(mm) @ xq.reshape(-1, x.shape[-1]).to(mm)).to(g2.dtype) * (centred.abs() <= 1)
        grad_s = None
        if act_scale is not None:
            grad_s = (x.to(grad.dtype) * grad_xb).sum().to(act_scale.dtype)
            grad_xb = grad_xb * act_scale.to(grad.dtype)
        return grad_xb.to(x.dtype), grad_w.to(centred.dtype), g2.sum(0).to(centred.dtype), grad_s, None


def binary_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor,
                  act_scale: torch.Tensor | None = None, integer_input: bool = False) -> torch.Tensor:
    """A Linear with BiBERT's binarized weight: y = alpha * (x @ sign(Wc)^T) + b.

    The same function as F.linear(x, binarize_weight(w), b), evaluated the way the packed
    engine does: integer counts first, then one multiply and one add per output, so that
    signs of y (the bits the next layer sees) agree exactly with the engine's.
    backward: dL/dx = dL/dy @ Wb;  dL/dW = (dL/dy^T x) * 1[|Wc| <= 1];  dL/db = sum dL/dy
    (the gradients of F.linear with `binarize_weight`).

    act_scale (a scalar tensor, elastic binarization): x holds the binarized input's levels
    (+-1 or {0, 1}) and s their learned scale, so the Linear sees s * x:
        y = (alpha * s) * (x @ sign(Wc)^T) + b      (alpha * s rounded once per row)
        dL/dx = s (dL/dy @ Wb);  dL/dW = (dL/dy^T (s x)) * 1[|Wc| <= 1];
        dL/ds = sum(x * (dL/dy @ Wb))

    integer_input: x holds integers in [-1, 1] (binarized levels), so the counts are taken
    with an exact integer matmul where that is faster (`integer_counts`). Under bf16
    autocast the backward's two matmuls run in bf16 (the forward stays exact).
    """
    return _BinaryLinear.apply(x, w, bias, act_scale, integer_input)


def weight_scale_and_signs(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha [rows], signs [rows, cols] in {-1,+1}) of `binarize_weight`, for export."""
    alpha, centred = _scale_and_centred(w)
    return alpha, sign(centred)


class _UniformSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, clip, levels):
        ctx.save_for_backward(x, clip)
        step = clip / levels
        return torch.round(torch.clamp(x, -clip, clip) / step) * step

    @staticmethod
    def backward(ctx, grad):
        x, clip = ctx.saved_tensors
        return grad * (x.abs() <= clip), None, None


def quantize_symmetric(x: torch.Tensor, bits: int, clip: torch.Tensor) -> torch.Tensor:
    """k-bit symmetric uniform quantizer with levels {-Q..Q} * clip/Q, Q = 2^(k-1) - 1.

    forward:  round(clamp(x, -c, c) / s) * s,  s = c / Q
    backward: dL/dx = dL/dy * 1[|x| <= c]      (c treated as a constant)
    2 bits gives the ternary grid {-c, 0, c}.
    """
    levels = 2 ** (bits - 1) - 1
    clip = torch.clamp(clip.detach(), min=1e-8)
    return _UniformSTE.apply(x, clip, levels)


def quantize_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Weights/embeddings: 1 bit = `binarize_weight`; k bits = per-row symmetric min-max;
    32 = unchanged."""
    if bits >= 32:
        return w
    if bits == 1:
        return binarize_weight(w)
    return quantize_symmetric(w, bits, w.abs().amax(dim=-1, keepdim=True))


def quantize_activation(x: torch.Tensor, bits: int, sign_source: torch.Tensor | None = None) -> torch.Tensor:
    """Inputs of quantized Linears: 1 bit = `sign_ste`; k bits = per-tensor symmetric,
    clipped at min(max|x|, c_k * std(x)) (ACIQ Gaussian optimum); 32 = unchanged."""
    if bits >= 32:
        return x
    if bits == 1:
        return sign_ste(x, sign_source)
    with torch.no_grad():
        clip = torch.minimum(x.abs().amax(), ACTIVATION_CLIP_STD[bits] * x.float().std().to(x.dtype))
    return quantize_symmetric(x, bits, clip)


def quantize_probs(p: torch.Tensor, bits: int) -> torch.Tensor:
    """Softmax probabilities of the straightforward baseline (docs/method.md §3).

    1 bit: sign(p) like any activation (all ones since p >= 0: the information collapse
    Bi-Attention removes); k bits: unsigned uniform grid on [0, 1] with 2^k - 1 steps and a
    straight-through gradient; 32: unchanged.
    """
    if bits >= 32:
        return p
    if bits == 1:
        return sign_ste(p)
    steps = 2**bits - 1
    return p + (torch.round(p * steps) / steps - p).detach()


# ------------------------------------------------------------------ elastic binarization
#
# Beyond the paper, after BiT (Liu et al., NeurIPS 2022): each binarized activation gets a
# learned per-channel threshold and a learned scalar scale, and an input that is
# non-negative by construction (the FFN-out input, after GELU) becomes {0, 1} instead of
# {-1, +1}. docs/method.md ("Elastic binarization") states the whole scheme; every piece
# folds into the packed engine (a threshold is a compare, a scale one multiply).


class _ThresholdSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, threshold, window, unsigned, strict):
        d = x - threshold
        half = window / 2 if unsigned and not strict else window
        ctx.save_for_backward(d.abs() <= half, window)  # the STE's window, as bools (d itself is not needed)
        # IEEE compare: x == threshold gives +1 (or 1), as sign(0) = +1; `strict` gives 0 there
        keep = d > 0 if strict else d >= 0
        if unsigned:
            return keep.to(x.dtype)
        return plus_minus_one(keep, x.dtype)

    @staticmethod
    def backward(ctx, grad):
        inside, window = ctx.saved_tensors
        grad_x = grad * inside / window.to(grad.dtype)
        grad_t = -grad_x.reshape(-1, grad_x.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        return grad_x, grad_t, None, None, None


def threshold_ste(x: torch.Tensor, threshold: torch.Tensor, window: torch.Tensor, unsigned: bool = False,
                  strict: bool = False) -> torch.Tensor:
    """Elastic activation binarizer: a learned per-channel threshold, a data-sized STE window.

    forward:  signed:   sign(x - t)      in {-1, +1}   (x == t gives +1)
              unsigned: 1[x - t >= 0]    in {0, 1}
    backward: the gradient of the hard-tanh the step stands for:
              signed:   dL/dx = dL/dy * 1[|x - t| <= w] / w          (htanh((x - t) / w))
              unsigned: dL/dx = dL/dy * 1[|x - t| <= w/2] / w        (clip((x - t) / w + 1/2, 0, 1))
              dL/dt = -sum over every position of dL/dx, per channel
    x: (..., C); t: (C,); w: a positive scalar tensor (no gradient). With t = 0 and w = 1
    the signed form is exactly `sign_ste`.
    strict (unsigned only; Bi-Attention's bool): forward 1[x - t > 0] (x == t gives 0),
    backward dL/dx = dL/dy * 1[|x - t| <= w] / w; with t = 0 and w = 1 exactly `bool_ste`.
    """
    return _ThresholdSTE.apply(x, threshold, window, unsigned, strict)


class _GradScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Identity forward; backward multiplies the gradient by `factor` (LSQ's gradient scale
    for a step size: 1 / sqrt(elements per step x levels))."""
    return _GradScale.apply(x, factor)
