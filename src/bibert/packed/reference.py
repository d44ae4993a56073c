"""Naive NumPy references of the packed engine's kernels and of the student's forward.

Written from docs/method.md in plain integer / float arithmetic on {-1, +1} values, with no bit
tricks, so that the native kernels can be checked against something independent:

    sign(x)            +1 if x >= 0 else -1                       (IEEE: -0.0 -> +1)
    binary Linear      y = alpha * (sign(x) . sign(Wc)) + bias     Wc = W - rowmean(W)
    Bi-Attention       A = sign(Q) sign(K)^T / sqrt(d) + mask,  BA = A > 0,
                       context = BA @ sign(V)   (integer counts)
    FFN-out input      sign of the pre-GELU value

`student_forward` runs the whole student from its latent weights (Hugging Face names)
in float64 and returns every intermediate that the layer-by-layer tests compare;
`kbit_student_forward` runs a 2- or 4-bit student with the exact integer sums its
quantizers define (docs/packed_format.md, "Multi-bit activations").
"""
from __future__ import annotations

import math

import numpy as np

MASK_VALUE = -10000.0


def sign(x: np.ndarray) -> np.ndarray:
    """+1 / -1 as int64, +1 where x >= 0."""
    return np.where(np.asarray(x) >= 0, 1, -1).astype(np.int64)


def binarize_rows(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(alpha [rows], signs [rows, cols]) of BiBERT's weight binarizer, in float32 as trained."""
    w = np.asarray(w, dtype=np.float32)
    return np.abs(w).mean(axis=1, dtype=np.float32), sign(w - w.mean(axis=1, keepdims=True, dtype=np.float32))


def binary_linear(x_signs: np.ndarray, w_signs: np.ndarray, alpha: np.ndarray, bias: np.ndarray,
                  residual: np.ndarray | None = None) -> np.ndarray:
    """float32 alpha * (x . w) + bias [+ residual], with the integer dot product computed exactly."""
    dot = x_signs.astype(np.int64) @ w_signs.astype(np.int64).T
    y = np.float32(1) * alpha.astype(np.float32) * dot.astype(np.float32) + bias.astype(np.float32)
    return y if residual is None else y + residual.astype(np.float32)


def layernorm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


def biattention_counts(q: np.ndarray, k: np.ndarray, v: np.ndarray, key_valid: np.ndarray, heads: int) -> np.ndarray:
    """Integer context BA @ sign(V), int64 [B, L, H*d], from real-valued q, k, v [B, L, H*d]."""
    B, L, hidden = q.shape
    d = hidden // heads
    split = lambda t: sign(t).reshape(B, L, heads, d).transpose(0, 2, 1, 3)  # (B, H, L, d)
    sq, sk, sv = split(q), split(k), split(v)
    scores = (sq @ sk.transpose(0, 1, 3, 2)) / math.sqrt(d)  # (B, H, L, L)
    scores = scores + np.where(key_valid, 0.0, MASK_VALUE)[:, None, None, :]
    ba = (scores > 0).astype(np.int64)
    ctx = ba @ sv  # (B, H, L, d)
    return ctx.transpose(0, 2, 1, 3).reshape(B, L, hidden)


def student_forward(weights: dict[str, np.ndarray], config: dict, input_ids: np.ndarray,
                    attention_mask: np.ndarray, token_type_ids: np.ndarray) -> dict:
    """The student in float64 from latent weights (Hugging Face names, optional 'bert.' prefix).

    Returns {"hidden": [L+1 arrays (B, L, H)], "q"/"k"/"v"/"context"/"attn_in"/"ffn_in"
    /"ffn_pre": per-layer lists, "pooled", "logits"}; "ffn_pre" is the pre-GELU value.
    """
    def w(name):
        return np.asarray(weights[name], dtype=np.float64)

    def blin(x, prefix):
        alpha, s = binarize_rows(weights[prefix + ".weight"])
        return (sign(x) @ s.T).astype(np.float64) * alpha.astype(np.float64) + w(prefix + ".bias")

    heads, eps = config["num_attention_heads"], config.get("layer_norm_eps", 1e-12)
    B, L = input_ids.shape
    e = "bert.embeddings."
    alpha, s = binarize_rows(weights[e + "word_embeddings.weight"])
    word = alpha[input_ids][..., None].astype(np.float64) * s[input_ids]
    x = word + w(e + "token_type_embeddings.weight")[token_type_ids] + w(e + "position_embeddings.weight")[:L][None]
    x = layernorm(x, w(e + "LayerNorm.weight"), w(e + "LayerNorm.bias"), eps)
    out = {"hidden": [x], "q": [], "k": [], "v": [], "context": [], "attn_out": [], "ffn_pre": []}
    valid = attention_mask.astype(bool)
    for n in range(config["num_hidden_layers"]):
        p = f"bert.encoder.layer.{n}."
        q, k, v = (blin(x, p + f"attention.self.{t}") for t in ("query", "key", "value"))
        ctx = biattention_counts(q, k, v, valid, heads)
        a = layernorm(blin(ctx, p + "attention.output.dense") + x,
                      w(p + "attention.output.LayerNorm.weight"), w(p + "attention.output.LayerNorm.bias"), eps)
        f = blin(a, p + "intermediate.dense")
        x = layernorm(blin(f, p + "output.dense") + a,  # sign(GELU(f)) = sign(f)
                      w(p + "output.LayerNorm.weight"), w(p + "output.LayerNorm.bias"), eps)
        for key, val in (("q", q), ("k", k), ("v", v), ("context", ctx), ("attn_out", a), ("ffn_pre", f)):
            out[key].append(val)
        out["hidden"].append(x)
    out["pooled"] = np.tanh(blin(x[:, 0], "bert.pooler.dense"))
    out["logits"] = out["pooled"] @ w("classifier.weight").T + w("classifier.bias")
    return out


def kbit_levels(x, bits: int):
    """(levels, step) of the student's k-bit quantizer of the whole tensor x (torch; the
    operations of quantize_activation / quantize_symmetric): levels are integers in [-Q, Q]."""
    import torch

    from ..quantizers import ACTIVATION_CLIP_STD

    with torch.no_grad():
        clip = torch.minimum(x.abs().amax(), ACTIVATION_CLIP_STD[bits] * x.float().std().to(x.dtype))
        clip = torch.clamp(clip, min=1e-8)
        step = clip / (2 ** (bits - 1) - 1)
        return torch.round(torch.clamp(x, -clip, clip) / step), step


def kbit_student_forward(student, input_ids, token_type_ids=None) -> dict:
    """A 2- or 4-bit student (bits 1-1-k, Bi-Attention) on one sequence [1, L], with the integer
    arithmetic its quantizers define: every Linear counts sum_j level_j w_j exactly and scales
    the count once, (count * step) * alpha + bias; Bi-Attention takes the sign of the exact
    integer scores (S = 0 gives 0) and the context count times the value step. The student's
    own float32 matrix products only approximate these integers (their sums round, and the
    sign of a score whose exact value is 0 is left to rounding), which is why this reference
    exists. Embeddings, LayerNorms, GELU, tanh and the classifier are the student's modules.
    Returns {"hidden": L+1 tensors [L, H], "levels": per layer dict of int levels,
    "counts": per layer dict of integer counts, "logits"}."""
    import torch

    from ..quantizers import weight_scale_and_signs

    bits = student.quant.activation_bits
    ids = torch.as_tensor(input_ids)
    tt = torch.zeros_like(ids) if token_type_ids is None else torch.as_tensor(token_type_ids)

    def linear(module, x):
        n, step = kbit_levels(x, bits)
        alpha, signs = weight_scale_and_signs(module.weight.detach())
        counts = (n.double() @ signs.double().T).float()
        return (counts * step) * alpha + module.bias.detach(), n, counts

    out = {"hidden": [], "levels": [], "counts": []}
    with torch.no_grad():
        x = student.bert.embeddings(ids, tt)[0]  # [L, H]
        out["hidden"].append(x)
        heads, d = student.config.num_attention_heads, student.config.hidden_size // student.config.num_attention_heads
        for layer in student.bert.encoder.layer:
            sa = layer.attention.self
            lv, ct = {}, {}
            q, lv["x"], ct["q"] = linear(sa.query, x)
            k, _, ct["k"] = linear(sa.key, x)
            v, _, ct["v"] = linear(sa.value, x)
            (nq, _), (nk, _), (nv, sv) = (kbit_levels(t, bits) for t in (q, k, v))
            lv.update(q=nq, k=nk, v=nv)
            split = lambda t: t.double().reshape(-1, heads, d).transpose(0, 1)  # (heads, L, d)
            ba = (split(nq) @ split(nk).transpose(1, 2)) > 0
            ct["context"] = (ba.double() @ split(nv)).transpose(0, 1).reshape(-1, heads * d).float()
            ctx = ct["context"] * sv
            y, lv["context"], ct["attn_out"] = linear(layer.attention.output.dense, ctx)
            a = layer.attention.output.LayerNorm(y + x)
            pre, lv["attn_out"], ct["ffn_in"] = linear(layer.intermediate.dense, a)
            y, lv["gelu"], ct["ffn_out"] = linear(layer.output.dense, layer.act(pre))
            x = layer.output.LayerNorm(y + a)
            out["hidden"].append(x)
            out["levels"].append(lv)
            out["counts"].append(ct)
        pooled, _, _ = linear(student.bert.pooler.dense, x[:1])
        out["logits"] = student.classifier(torch.tanh(pooled))
    return out
