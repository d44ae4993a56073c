"""Naive NumPy references of the packed engine's kernels and of the student's forward.

Written from docs/method.md in plain integer / float arithmetic on {-1, +1} values, with no bit
tricks, so that the native kernels can be checked against something independent:

    sign(x)            +1 if x >= 0 else -1                       (IEEE: -0.0 -> +1)
    binary Linear      y = alpha * (sign(x) . sign(Wc)) + bias     Wc = W - rowmean(W)
    Bi-Attention       A = sign(Q) sign(K)^T / sqrt(d) + mask,  BA = A > 0,
                       context = BA @ sign(V)   (integer counts)
    FFN-out input      sign of the pre-GELU value

`student_forward` runs the whole student from its latent weights (Hugging Face names)
in float64 and returns every intermediate that the layer-by-layer tests compare.
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
