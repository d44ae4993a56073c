"""The packed engine: a BiBERT student run from its packed file with bitwise kernels.

Per encoder layer, with x the float hidden state and xb its sign bits:

    qkv   = BinaryLinear_qkv(xb) -> bits          (Q, K, V fused: 3 x hidden output bits)
    ctx   = BiAttention(qkv)     -> bits          (bool(sign(Q) sign(K)^T > 0) @ sign(V), signed)
    a     = LayerNorm(BinaryLinear_o(ctx) + x)    -> float + bits
    f     = BinaryLinear_in(a)   -> bits          (sign of the pre-GELU value = sign of GELU)
    x'    = LayerNorm(BinaryLinear_out(f) + a)    -> float + bits

then pooler tanh(BinaryLinear(sign(x[CLS]))) and the full-precision classifier. Floats
appear only where the student keeps full precision: embeddings sum, LayerNorms,
residuals, the epilogues alpha * (K - 2 popcount) + bias, tanh and the classifier. When the
hidden states are not asked for, the last layer computes its keys and values for every row
and the rest for the [CLS] rows only (all the pooler reads).

A 2- or 4-bit student (1-1-2, 1-1-4) runs each sequence on its own, bit-serially: every
quantized input is k bit-planes, each a binary product whose popcounts are summed with their
powers of two (docs/packed_format.md, "Multi-bit activations").

An elastic student (docs/method.md §7) runs the same kernels: each bit compares with its
quantizer's per-channel threshold (when packing a LayerNorm output, on the context counts,
or inside the integer thresholds of the FFN-in bit epilogue), each scale is folded into the
per-row alpha of the Linear it feeds, and FFN-out's {0, 1} input changes its float epilogue.
Elastic Bi-Attention compares each popcount with an integer limit per head ("bi"), or per head
and row: a limit looked up from the row's smallest popcount over its real keys ("bi-max").
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import BibertError
from .. import hub
from . import kernels, tuning
from ..bert_names import (ATTENTION_OUTPUT, BODY, CLASSIFIER, FFN_IN, FFN_OUT, LAYER_NORMS, LAYER_PREFIX, QKV,
                          SELF_ATTENTION, WORD_EMBEDDINGS)
from .format import (ACTIVATION_CLIP_STD, EMBEDDINGS, POOLER_DENSE, QUANTIZER_SCALE, QUANTIZER_THRESHOLD,
                     SCORE_COUNT_MIN, SCORE_THRESHOLD, TOKENIZER_FILES, PackedFile, check_packed)
from .reader import read_packed


@dataclass
class BinaryLinear:
    """A binarized Linear ready for the kernel: weight bits in panels of 32 channels."""

    panels: np.ndarray  # uint64 [ceil(N/32), words(K), 32]
    K: int
    N: int
    alpha: np.ndarray  # float32 [N]
    bias: np.ndarray  # float32 [N]
    thresholds: tuple[np.ndarray, np.ndarray]  # the bit epilogue as integer thresholds
    epilogue: tuple[np.ndarray, np.ndarray]  # the float epilogue's c0, c1
    kbits: int = 0  # k-bit input (bit-serial): k, and the count offsets of `kernels.kbit_offsets`
    koff: np.ndarray | None = None

    @classmethod
    def from_rows(cls, bits: np.ndarray, K: int, alpha: np.ndarray, bias: np.ndarray,
                  compare: np.ndarray | None = None, zero_one: bool = False, kbits: int = 0) -> "BinaryLinear":
        """compare: the thresholds of the quantizer that binarizes the output (bit output);
        zero_one: the input bits stand for {0, 1} levels (float output). Elastic binarization,
        docs/method.md §7; alpha already holds the input quantizer's scale. kbits: the input is
        k-bit (2 or 4), run bit-serially (`kbit`)."""
        alpha, bias = np.ascontiguousarray(alpha, np.float32), np.ascontiguousarray(bias, np.float32)
        offset = kernels.zero_one_offsets(bits, K) if zero_one else None
        return cls(kernels.pack_panels(bits), K, bits.shape[0], alpha, bias,
                   kernels.bit_thresholds(alpha, bias, K, compare), kernels.float_epilogue(alpha, bias, K, offset),
                   kbits, kernels.kbit_offsets(bits, K, kbits) if kbits else None)

    def kbit(self, planes: np.ndarray, M: int, step: float, residual: np.ndarray | None = None) -> np.ndarray:
        """The Linear on M rows of k-bit input (`kernels.quantize_planes`): float [M, N]."""
        return kernels.linear_kbit(planes, M, self.K, self.panels, self.N, self.kbits, step, self.alpha, self.bias,
                                   self.koff, residual)

    def __call__(self, a_bits: np.ndarray, residual: np.ndarray | None = None, out_bits: bool = False) -> np.ndarray:
        return kernels.binary_linear(a_bits, self.K, self.panels, self.N, self.alpha, self.bias, residual, out_bits,
                                     self.thresholds, self.epilogue)


@dataclass
class Layer:
    qkv: BinaryLinear
    attn_out: BinaryLinear
    ln1: tuple[np.ndarray, np.ndarray]
    ffn_in: BinaryLinear
    ffn_out: BinaryLinear
    ln2: tuple[np.ndarray, np.ndarray]
    # elastic binarization: thresholds of the Q/K/V input, the context and the FFN-in input
    # bits (None: plain signs); ln2_t packs this layer's output for the next layer's Q/K/V
    qkv_t: np.ndarray | None = None
    ctx_t: np.ndarray | None = None
    ln1_t: np.ndarray | None = None
    ln2_t: np.ndarray | None = None
    score_lim: np.ndarray | None = None  # per-head score thresholds as popcount limits (`kernels.score_limits`)
    score_rel: np.ndarray | None = None  # "bi-max": limits per head and row minimum (`kernels.relative_limits`)


@dataclass
class Predictions:
    """labels: one per text (label names; floats for a regression model). scores: class
    probabilities (n, num_labels), or the predicted values (n,) for regression."""

    labels: list
    scores: np.ndarray
    logits: np.ndarray


class PackedModel:
    """A packed BiBERT classifier. Build with `load_packed(path)`.

    Public: `predict` and calling the model (texts in, labels and scores out), `forward`
    (token ids in, logits out), `tokenizer`, `save_pretrained` / `push_to_hub`; `source`
    (where it was read from), `labels` and `num_labels`, `quant` (its bits, activations and
    attention, a `format.PackedQuant`) and its sizes: `num_layers`, `hidden`, `heads`,
    `head_size`, `intermediate`, `vocab_size`, `max_positions`, `type_vocab_size`. The
    weights, the kernels' handles, the stored files and the step-by-step forward
    (`_embeddings`, `_encoder_layer`, `_head`, `_kbit_layer`, `_kbit_head`, which the tests
    compare with the student) are internal.
    """

    def __init__(self, packed: PackedFile, source: str = "the packed model"):
        """Checks `packed` (config, every tensor's dtype and shape, the files) before any of
        it reaches the kernels; `source` names it in the error."""
        shape, self.quant = check_packed(packed, source)  # its sizes, and its quantization (`format.PackedQuant`)
        self._config = packed.config
        self.source = source
        self.hidden, self.heads, self.head_size = shape.hidden, shape.heads, shape.head_size
        self.intermediate, self.num_layers = shape.intermediate, shape.layers
        self._eps = shape.layer_norm_eps
        self.vocab_size, self.max_positions = shape.vocab, shape.positions
        self.type_vocab_size = shape.token_types
        self._files = packed.files
        self._side_dtype = packed.side_dtype
        self._tokenizer = None
        t = packed.tensors

        def f32(name):
            return np.ascontiguousarray(t[name], dtype=np.float32)

        elastic, kbits = self.quant.elastic, self.quant.kbits

        def quantizer(module):
            """(threshold float32 [C], scale float32) of a module's input quantizer, or Nones."""
            if not elastic:
                return None, None
            return f32(module + QUANTIZER_THRESHOLD), np.float32(f32(module + QUANTIZER_SCALE)[0])

        def scaled(alpha, scale):
            """alpha * s in float32, one rounding per row: what the student computes."""
            return alpha if scale is None else np.ascontiguousarray(alpha * scale, dtype=np.float32)

        def linear(name, K, compare=None, zero_one=False):
            _, scale = quantizer(name)
            return BinaryLinear.from_rows(t[name + ".bits"], K, scaled(f32(name + ".alpha"), scale),
                                          f32(name + ".bias"), compare, zero_one, kbits)

        self._clip_std = float(t[ACTIVATION_CLIP_STD][0]) if kbits else None

        e, word = EMBEDDINGS, f"{BODY}.{WORD_EMBEDDINGS}"
        self._word_bits = np.ascontiguousarray(t[word + ".bits"])
        self._word_alpha = f32(word + ".alpha")
        self._position = f32(e + "position_embeddings.weight")
        self._token_type = f32(e + "token_type_embeddings.weight")
        self._emb_ln = (f32(e + "LayerNorm.weight"), f32(e + "LayerNorm.bias"))
        H = self.hidden
        self._layers = []
        for n in range(self.num_layers):
            p = LAYER_PREFIX.format(n)
            q, k, v = (p + name for name in QKV)
            qkv_t, qkv_s = quantizer(p + SELF_ATTENTION)  # one quantizer for the three
            qkv = BinaryLinear.from_rows(
                np.concatenate([t[q + ".bits"], t[k + ".bits"], t[v + ".bits"]]), H,
                scaled(np.concatenate([f32(q + ".alpha"), f32(k + ".alpha"), f32(v + ".alpha")]), qkv_s),
                np.concatenate([f32(q + ".bias"), f32(k + ".bias"), f32(v + ".bias")]), kbits=kbits)
            out_t, _ = quantizer(p + FFN_OUT)  # FFN-out's {0, 1} levels: a compare of FFN-in's output
            ln1, ln2 = (p + name for name in LAYER_NORMS)
            self._layers.append(Layer(
                qkv=qkv,
                attn_out=linear(p + ATTENTION_OUTPUT, H),
                ln1=(f32(ln1 + ".weight"), f32(ln1 + ".bias")),
                ffn_in=linear(p + FFN_IN, H, compare=out_t),
                ffn_out=linear(p + FFN_OUT, self.intermediate, zero_one=elastic),
                ln2=(f32(ln2 + ".weight"), f32(ln2 + ".bias")),
                qkv_t=qkv_t,
                ctx_t=quantizer(p + ATTENTION_OUTPUT)[0],
                ln1_t=quantizer(p + FFN_IN)[0],
                score_lim=kernels.score_limits(f32(p + SCORE_THRESHOLD), self.head_size)
                if elastic and not self.quant.relative_attention else None,
                score_rel=kernels.relative_limits(t[p + SCORE_COUNT_MIN], self.head_size)
                if self.quant.relative_attention else None,
            ))
        for layer, following in zip(self._layers, self._layers[1:]):
            layer.ln2_t = following.qkv_t  # the last layer's bits are not read: the head packs [CLS] again
        self._weights = _arena([lin for l in self._layers for lin in (l.qkv, l.attn_out, l.ffn_in, l.ffn_out)])
        self._native_layers = (kernels.LayerParams * self.num_layers)(*(self._layer_params(l) for l in self._layers))
        self._dense = (None, None)  # (B, L) of the last unpadded batch, and its row arrays (`_dense_rows`)
        self._pooler = linear(POOLER_DENSE, H)
        self._pooler_t = quantizer(POOLER_DENSE)[0]
        self._native_model = self._model_params()  # check_packed: the pooler is H x H
        if kbits:  # the k-bit forward's Linears and LayerNorms (`forward`, bb_forward_kbit)
            self._native_kbit_layers = (kernels.KbitLayerParams * self.num_layers)(
                *(self._kbit_layer_params(l) for l in self._layers))
            self._native_kbit_pooler = self._kbit_linear_params(self._pooler)
        self._classifier_weight, self._classifier_bias = f32(f"{CLASSIFIER}.weight"), f32(f"{CLASSIFIER}.bias")
        self.num_labels = shape.num_labels
        self.labels = list(shape.labels)

    def _model_params(self) -> kernels.ModelParams:
        """The embeddings, their LayerNorm and the pooler for the native forward (`forward`)."""
        def opt(a: np.ndarray | None):
            return None if a is None else a.ctypes.data

        return kernels.ModelParams(self._word_bits.ctypes.data, self._word_alpha.ctypes.data, self._word_bits.shape[0],
                                   self._position.ctypes.data, self._position.shape[0],
                                   self._token_type.ctypes.data, self._token_type.shape[0],
                                   self._emb_ln[0].ctypes.data, self._emb_ln[1].ctypes.data, opt(self._layers[0].qkv_t),
                                   self._pooler.panels.ctypes.data, self._pooler.epilogue[0].ctypes.data,
                                   self._pooler.epilogue[1].ctypes.data, opt(self._pooler_t))

    @staticmethod
    def _layer_params(layer: Layer) -> kernels.LayerParams:
        def lin(b: BinaryLinear, bits: bool):
            tail = b.thresholds if bits else b.epilogue
            return [b.panels.ctypes.data, tail[0].ctypes.data, tail[1].ctypes.data]

        def opt(a: np.ndarray | None):
            return None if a is None else a.ctypes.data

        return kernels.LayerParams(*lin(layer.qkv, True), *lin(layer.attn_out, False),
                                   layer.ln1[0].ctypes.data, layer.ln1[1].ctypes.data,
                                   *lin(layer.ffn_in, True), *lin(layer.ffn_out, False),
                                   layer.ln2[0].ctypes.data, layer.ln2[1].ctypes.data,
                                   opt(layer.ctx_t), opt(layer.ln1_t), opt(layer.ln2_t), opt(layer.score_lim),
                                   opt(layer.score_rel))

    @staticmethod
    def _kbit_linear_params(lin: BinaryLinear) -> kernels.KbitLinearParams:
        return kernels.KbitLinearParams(lin.panels.ctypes.data, lin.alpha.ctypes.data, lin.bias.ctypes.data,
                                        lin.koff.ctypes.data)

    @classmethod
    def _kbit_layer_params(cls, layer: Layer) -> kernels.KbitLayerParams:
        return kernels.KbitLayerParams(*(cls._kbit_linear_params(lin) for lin in
                                         (layer.qkv, layer.attn_out, layer.ffn_in, layer.ffn_out)),
                                       layer.ln1[0].ctypes.data, layer.ln1[1].ctypes.data,
                                       layer.ln2[0].ctypes.data, layer.ln2[1].ctypes.data)

    # ---- the forward, piece by piece -------------------------------------------------

    def _check(self, input_ids, attention_mask, token_type_ids, ranges: bool = True):
        """The inputs, before any of them reaches the kernels: integer ids inside the
        vocabulary, integer token types inside the type table, a numeric mask, all three of
        one 2-D shape, at most max_position_embeddings tokens. ranges=False leaves out the two
        range checks (the native forward checks every id and type itself, see `forward`)."""
        try:
            ids = np.asarray(input_ids)
            mask = None if attention_mask is None else np.asarray(attention_mask)
            tt = None if token_type_ids is None else np.asarray(token_type_ids)
        except ValueError as exc:  # ragged nested lists
            raise BibertError(f"the inputs must be rectangular arrays ({exc})") from None
        if ids.ndim != 2 or not issubclass(ids.dtype.type, np.integer):  # np.issubdtype, in one call
            raise BibertError("input_ids must be a 2-D array of integer token ids, shape (batch, sequence)")
        B, L = ids.shape
        if L > self.max_positions:
            raise BibertError(f"sequence of {L} tokens is longer than the model's {self.max_positions} positions; "
                              "truncate the input (max_length)")
        if ranges and ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise BibertError(f"token ids must lie in [0, {self.vocab_size}); is the tokenizer the model's own?")
        for name, a in (("attention_mask", mask), ("token_type_ids", tt)):
            if a is not None and a.shape != (B, L):
                raise BibertError(f"{name} has shape {a.shape}, but input_ids has shape {(B, L)}; they must match")
        if mask is not None and not issubclass(mask.dtype.type, (np.number, np.bool_)):
            raise BibertError("attention_mask must hold numbers: 1 for a token, 0 for padding")
        if tt is not None and not issubclass(tt.dtype.type, (np.integer, np.bool_)):
            raise BibertError("token_type_ids must be integers: 0 for the first segment, 1 for the second")
        if ranges and tt is not None and tt.size and (tt.min() < 0 or tt.max() >= self.type_vocab_size):
            raise BibertError(f"token_type_ids must lie in [0, {self.type_vocab_size})")
        valid = np.ones((B, L), bool) if mask is None else mask != 0
        return ids.astype(np.int64, copy=False), valid, np.zeros((B, L), np.int64) if tt is None else \
            tt.astype(np.int64, copy=False)

    def _embeddings(self, ids: np.ndarray, token_type_ids: np.ndarray,
                    positions: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """LayerNorm(word + token type + position): float [B*L, H] and its bits (the first
        layer's Q/K/V input). Token j of a row is at position j, or at positions[b, j]."""
        x = kernels.embed(ids, token_type_ids, self._word_bits, self._word_alpha, self._position, self._token_type,
                          positions)
        return kernels.layernorm(x, *self._emb_ln, self._eps, with_bits=True, thresholds=self._layers[0].qkv_t)

    def _encoder_layer(self, n: int, x: np.ndarray, xb: np.ndarray, key_valid: np.ndarray,
                       trace: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Layer n on hidden state x [B*L, H] (bits xb, packed for this layer's Q/K/V input);
        key_valid bool [B, L], one kernel call per step (`forward` runs the same steps natively:
        the embeddings, all layers and the pooler in one call). With `trace`, stores the intermediates: qkv bits, context bits
        and counts, attention output, FFN bits."""
        layer, H = self._layers[n], self.hidden
        B, L = key_valid.shape
        qkv = layer.qkv(xb, out_bits=True)  # [B*L, words(3H)]
        if trace is not None:
            ctx, trace["context_counts"] = kernels.biattention(qkv, (0, H, 2 * H), B, L, self.heads, self.head_size,
                                                               key_valid, counts=True, thresholds=layer.ctx_t,
                                                               score_limits=layer.score_lim, relative=layer.score_rel)
        else:
            ctx = kernels.biattention(qkv, (0, H, 2 * H), B, L, self.heads, self.head_size, key_valid,
                                      thresholds=layer.ctx_t, score_limits=layer.score_lim, relative=layer.score_rel)
        a, ab = kernels.layernorm(layer.attn_out(ctx, residual=x), *layer.ln1, self._eps, with_bits=True,
                                  thresholds=layer.ln1_t)
        f = layer.ffn_in(ab, out_bits=True)  # [B*L, words(intermediate)]
        out, outb = kernels.layernorm(layer.ffn_out(f, residual=a), *layer.ln2, self._eps, with_bits=True,
                                      thresholds=layer.ln2_t)
        if trace is not None:
            trace.update(qkv_bits=qkv, context_bits=ctx, attn_out=a, ffn_bits=f, output=out)
        return out, outb

    def _dense_rows(self, B: int, L: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The row arrays of B sequences of L tokens without padding, kept for the last (B, L)
        (the native forward only reads them): start [B + 1], token types 0 [B*L], row_valid 1 [B*L]."""
        shape, arrays = self._dense  # one read: a call on another thread may replace it meanwhile
        if shape != (B, L):
            arrays = (np.arange(0, (B + 1) * L, L, dtype=np.int64), np.zeros(B * L, np.int64), np.ones(B * L, np.uint8))
            for a in arrays:
                a.flags.writeable = False
            self._dense = ((B, L), arrays)
        return arrays

    def _head(self, cls_hidden: np.ndarray) -> np.ndarray:
        """Pooler + classifier on the [CLS] hidden states [B, H]: logits [B, num_labels]."""
        return self._classify(self._pooler(kernels.sign_pack(cls_hidden, self._pooler_t)))

    def _classify(self, pooled: np.ndarray) -> np.ndarray:
        """The classifier on the pooler's output before its tanh [B, H]: logits [B, num_labels].
        Each row's dot products are summed on their own (NumPy's pairwise sum along H), not by
        a matrix product, whose summation order changes with the number of rows: so a text's
        logits do not depend on the batch it runs in."""
        products = np.tanh(pooled)[:, None, :] * self._classifier_weight[None, :, :]  # (B, num_labels, H)
        return products.sum(axis=-1, dtype=np.float32) + self._classifier_bias

    def forward(self, input_ids, attention_mask=None, token_type_ids=None,
                output_hidden_states: bool = False):
        """Logits float32 [B, num_labels] (and, if asked, the L+1 hidden states [B, L, H]).

        Only the rows that matter are computed: the positions the mask marks as tokens, and
        each sequence's first ([CLS]) position. A padded position is never a key, so no token
        depends on it; its hidden states are returned as zeros."""
        # the ids' and types' ranges are checked natively (each one, before any layer runs), and
        # here only when that check refuses them, for its message
        ids, valid, tt = self._check(input_ids, attention_mask, token_type_ids, ranges=self.quant.is_kbit)
        B, L = ids.shape
        if B and not L:
            raise BibertError("the input sequences are empty (length 0): each needs at least its [CLS] token")
        if not B:  # no sequences: no logits
            logits = np.zeros((0, self.num_labels), np.float32)
            if output_hidden_states:
                return logits, [np.zeros((0, L, self.hidden), np.float32) for _ in range(self.num_layers + 1)]
            return logits
        if self.quant.is_kbit:
            return self._forward_kbit(ids, valid, tt, output_hidden_states)
        if valid.all():  # no padding: rows in place, each at its index in its sequence
            rows, positions = None, None
            start, no_types, row_valid = self._dense_rows(B, L)
            row_ids, row_types = ids.reshape(-1), no_types if token_type_ids is None else tt.reshape(-1)
        else:  # the computed rows of every sequence (its tokens and [CLS]), packed one after another
            keep = valid.copy()
            keep[:, 0] = True  # the head reads [CLS]
            start = np.zeros(B + 1, np.int64)
            np.cumsum(keep.sum(axis=1), out=start[1:])
            rows = np.flatnonzero(keep)
            positions = rows % L
            row_ids, row_types, row_valid = ids.reshape(-1)[rows], tt.reshape(-1)[rows], valid.reshape(-1)[rows]
        M = int(start[-1])
        hidden = np.empty((self.num_layers + 1, M, self.hidden), np.float32) if output_hidden_states else None
        try:  # embeddings, every layer and the pooler in one native call
            _, pooled = kernels.forward(self._native_model, self._native_layers, self.num_layers, start, self.hidden,
                                        self.heads, self.intermediate, self._eps, row_ids, row_types, positions,
                                        row_valid, hidden)
        except BibertError:
            self._check(input_ids, attention_mask, token_type_ids)  # an id or a type out of range: its message
            raise
        logits = self._classify(pooled)
        if output_hidden_states:
            def unpack(h):
                if rows is None:
                    return h.reshape(B, L, self.hidden)
                full = np.zeros((B * L, self.hidden), np.float32)
                full[rows] = h
                return full.reshape(B, L, self.hidden)
            return logits, [unpack(h) for h in hidden]
        return logits

    # ---- k-bit activations, bit-serially ------------------------------------------------

    def _kbit_layer(self, n: int, x: np.ndarray, key_valid: np.ndarray, trace: dict | None = None) -> np.ndarray:
        """Layer n of a 2- or 4-bit model on one sequence x [L, H] (key_valid bool [L]). Each
        quantized input is the student's k-bit quantizer of that whole tensor (its clip from the
        tensor's max and standard deviation, docs/packed_format.md, "Multi-bit activations"),
        as bit-planes; every Linear and the attention count in integers. With `trace`, stores
        the intermediates."""
        layer, H, k, c = self._layers[n], self.hidden, self.quant.kbits, self._clip_std
        L = x.shape[0]
        xp, xs = kernels.quantize_planes(x, k, c)
        qkv = layer.qkv.kbit(xp, L, xs)
        (_, qs, ql), (_, ks, kl), (_, vs, vl) = (kernels.quantize_planes(qkv[:, i * H:(i + 1) * H], k, c, levels=True)
                                                 for i in range(3))
        if self.quant.softmax:
            ctx = kernels.softmax_attention_kbit(ql, kl, vl, (qs, ks, vs), self.heads, self.head_size, key_valid, k)
        else:
            ctx = kernels.biattention_kbit(ql, kl, vl, vs, self.heads, self.head_size, key_valid)
        cp, cs = kernels.quantize_planes(ctx, k, c)
        a = kernels.layernorm(layer.attn_out.kbit(cp, L, cs, residual=x), *layer.ln1, self._eps)
        ap, a_s = kernels.quantize_planes(a, k, c)
        pre = layer.ffn_in.kbit(ap, L, a_s)
        g = kernels.gelu(pre)
        gp, gs = kernels.quantize_planes(g, k, c)
        out = kernels.layernorm(layer.ffn_out.kbit(gp, L, gs, residual=a), *layer.ln2, self._eps)
        if trace is not None:
            trace.update(qkv=qkv, context=ctx, attn_out=a, ffn_pre=pre, gelu=g, output=out)
        return out

    def _kbit_head(self, cls_hidden: np.ndarray) -> np.ndarray:
        """Pooler + classifier of a 2- or 4-bit model on the [CLS] hidden states [B, H], each
        sequence's own (the student quantizes the pooler input of a batch of one)."""
        rows = []
        for h in np.ascontiguousarray(cls_hidden, np.float32):
            planes, step = kernels.quantize_planes(h[None], self.quant.kbits, self._clip_std)
            rows.append(self._pooler.kbit(planes, 1, step)[0])
        return self._classify(np.stack(rows) if rows else np.zeros((0, self.hidden), np.float32))

    def _forward_kbit(self, ids, valid, tt, output_hidden_states):
        """forward of a 2- or 4-bit model in one native call (bb_forward_kbit), with Bi-Attention or
        softmax attention: each sequence on its own (its tokens and [CLS]), as the student computes
        a batch of one, with the steps of `_kbit_layer` and `_kbit_head`; padded positions are not
        computed (zeros)."""
        B, L = ids.shape
        keep = valid.copy()
        keep[:, 0] = True  # the head reads [CLS]
        start = np.zeros(B + 1, np.int64)
        np.cumsum(keep.sum(axis=1), out=start[1:])
        rows = np.flatnonzero(keep)
        M = int(start[-1])
        hidden = np.empty((self.num_layers + 1, M, self.hidden), np.float32) if output_hidden_states else None
        _, pooled = kernels.forward_kbit(self._native_model, self._native_kbit_pooler, self._native_kbit_layers,
                                         self.num_layers, start, self.hidden, self.heads, self.intermediate, self._eps,
                                         self.quant.kbits, self._clip_std, ids.reshape(-1)[rows], tt.reshape(-1)[rows],
                                         rows % L, valid.reshape(-1)[rows], hidden, softmax=self.quant.softmax)
        logits = self._classify(pooled)
        if not output_hidden_states:
            return logits
        full = np.zeros((self.num_layers + 1, B * L, self.hidden), np.float32)
        full[:, rows] = hidden
        return logits, list(full.reshape(self.num_layers + 1, B, L, self.hidden))

    # ---- sharing ---------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike, info: dict | None = None, speed: bool = True) -> Path:
        """Write this model as a Hub repository folder (model.bibert, config.json, model card;
        `bibert.hub.save_pretrained`); `load_packed(directory)` reads it back."""
        return hub.save_pretrained(self, directory, info=info, speed=speed)

    def push_to_hub(self, repo_id: str, info: dict | None = None, private: bool | None = None,
                    token: str | None = None, speed: bool = True) -> str:
        """Upload this model to the Hugging Face Hub (`bibert.hub.push_to_hub`); returns the commit URL."""
        return hub.push_to_hub(self, repo_id, info=info, private=private, token=token, speed=speed)

    # ---- text in, labels out ---------------------------------------------------------

    @property
    def tokenizer(self):
        """The tokenizer stored in the packed file (`bibert.packed.tokenizer.PackedTokenizer`,
        built with the `tokenizers` library; see `_load_tokenizer`)."""
        if self._tokenizer is None:
            self._tokenizer = _load_tokenizer(self._files, self._config, self.source)
        return self._tokenizer

    def __repr__(self) -> str:
        q = self.quant
        return (f"PackedModel({self.source!r}, bits 1-1-{q.activation_bits}, activations {q.activations}, "
                f"attention {q.attention}, {self.num_layers} layers x {self.hidden} ({self.heads} heads), "
                f"labels {self.labels}, kernel {kernels.get_kernel()}, {kernels.get_threads()} threads)")

    def __call__(self, texts: str | list[str], pairs: str | list[str] | None = None, top_k: int | None = 1,
                 **options) -> list[dict] | list[list[dict]]:
        """In the style of a transformers text-classification pipeline: a text or a list of them
        (with `pairs`, their second segments) -> one {"label", "score"} per text, the score
        the probability of that label (a regression model: its value); top_k=None or k gives
        each text the list of its k (None: all) labels, most probable first. options go to
        `predict` (batch_size, max_length)."""
        one = isinstance(texts, str)
        if one != (pairs is None or isinstance(pairs, str)) and pairs is not None:
            raise BibertError("give texts and pairs alike: one string each, or one list each")
        pred = self.predict([texts] if one else texts, None if pairs is None else [pairs] if one else pairs, **options)
        if self.num_labels == 1:
            return [{"label": self.labels[0], "score": float(v)} for v in pred.scores]
        if top_k is not None and (not _positive_int(top_k)):
            raise BibertError(f"top_k is {top_k!r}: give a positive number of labels, or None for all")
        out = []
        for row in pred.scores:
            order = np.argsort(-row, kind="stable")[:top_k]
            ranked = [{"label": self.labels[i], "score": float(row[i])} for i in order]
            out.append(ranked[0] if top_k == 1 else ranked)
        return out

    def predict(self, texts: list[str], pairs: list[str] | None = None, batch_size: int = 32,
                max_length: int | None = None) -> Predictions:
        """Labels and scores for `texts` (with `pairs` as second segments, if given).
        max_length: tokens per input after truncation (default and cap: the model's
        positions). Texts must be valid Unicode strings."""
        texts = _text_list(texts, "texts")
        pairs = None if pairs is None else _text_list(pairs, "pairs")
        if pairs is not None and len(pairs) != len(texts):
            raise BibertError(f"{len(texts)} texts but {len(pairs)} pairs: give one pair per text")
        if not _positive_int(batch_size):
            raise BibertError(f"batch_size is {batch_size!r}: give a positive number of texts per batch, e.g. 32")
        if max_length is not None and not _positive_int(max_length):
            raise BibertError(f"max_length is {max_length!r}: give a positive number of tokens (at most the "
                              f"model's {self.max_positions} positions), or leave it out")
        max_length = min(int(max_length or self.max_positions), self.max_positions)
        logits = []
        if texts:
            special = self.tokenizer.num_special_tokens_to_add(pair=pairs is not None)
            if max_length <= special:
                raise BibertError(f"max_length {max_length} leaves no room for text: the tokenizer adds {special} "
                                  f"special tokens; give at least {special + 1}")
        for s in range(0, len(texts), batch_size):
            first, second = texts[s:s + batch_size], None if pairs is None else pairs[s:s + batch_size]
            try:
                enc = self.tokenizer(first, second, truncation=True, max_length=max_length, padding=True,
                                     return_tensors="np")
            except BaseException as exc:  # the tokenizer comes from the file: any failure is the file's
                if not _is_failure(exc):
                    raise
                raise BibertError(f"the tokenizer of {self.source} failed on texts {s} to {s + len(first) - 1} "
                                  f"({type(exc).__name__}: {_first_line(exc)})") from None
            logits.append(self.forward(*self._encoded(enc)))
        logits = np.concatenate(logits) if logits else np.zeros((0, self.num_labels), np.float32)
        if self.num_labels == 1:
            scores = logits[:, 0]
            return Predictions([float(v) for v in scores], scores, logits)
        z = np.exp(logits - logits.max(axis=1, keepdims=True))
        scores = z / z.sum(axis=1, keepdims=True)
        return Predictions([self.labels[i] for i in scores.argmax(axis=1)], scores, logits)

    def _encoded(self, enc) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """The stored tokenizer's output, checked against the model it came with: token ids
        inside the vocabulary, token types inside the type table."""
        ids, types = np.asarray(enc["input_ids"]), enc.get("token_type_ids")
        problems = []
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            problems.append(f"token ids up to {ids.max()}, for a vocabulary of {self.vocab_size}")
        if types is not None and np.size(types) and (np.min(types) < 0 or np.max(types) >= self.type_vocab_size):
            problems.append(f"token types up to {np.max(types)}, for {self.type_vocab_size} types")
        if problems:
            raise BibertError(f"{self.source} is not a valid bibert file: its tokenizer gives {' and '.join(problems)}")
        return ids, enc["attention_mask"], types


def softmax_attention_kbit(q: np.ndarray, k: np.ndarray, v: np.ndarray, steps: tuple[float, float, float], heads: int,
                           head_size: int, key_valid: np.ndarray, bits: int) -> np.ndarray:
    """Softmax attention of one sequence on k-bit Q, K, V given as levels (int8 [L, heads *
    head_size]) and steps, as the student computes it (docs/method.md §3): scores = (integer
    q . k) * step_q * step_k / sqrt(d) over the valid keys, P = softmax(scores) on the grid of
    2^bits - 1 steps, context = (integer round(P * S) . level_v) * step_v / S: float [L, H].
    The readable reference in NumPy of the engine's `kernels.softmax_attention_kbit` (which
    `_kbit_layer` and the one-call forward run): NumPy's float32 exp and sum order differ from the
    engine's in the last bits, so a probability within rounding of a grid midpoint may round
    apart."""
    L, levels = q.shape[0], 2**bits - 1
    qh, kh, vh = (np.ascontiguousarray(a, np.int32).reshape(L, heads, head_size).transpose(1, 0, 2) for a in (q, k, v))
    keys = np.flatnonzero(np.asarray(key_valid, bool))
    counts = qh @ kh[:, keys].transpose(0, 2, 1)  # (heads, L, keys), exact
    scores = counts.astype(np.float32) * (np.float32(steps[0]) * np.float32(steps[1])) / np.float32(math.sqrt(head_size))
    e = np.exp(scores - scores.max(axis=-1, keepdims=True))
    p = e / e.sum(axis=-1, keepdims=True)
    grid = np.round(p * np.float32(levels)).astype(np.int32)  # half to even, as torch.round
    context = (grid @ vh[:, keys]).astype(np.float32) * np.float32(steps[2] / levels)
    return np.ascontiguousarray(context.transpose(1, 0, 2).reshape(L, heads * head_size))


def _arena(linears: list[BinaryLinear]) -> np.ndarray:
    """Moves the weight panels of `linears` into one buffer, in the order the forward reads
    them (each panel 64-byte aligned): the forward streams one contiguous region, which the
    operating system can back with large pages (NumPy asks for them on large buffers)."""
    sizes = [-(-lin.panels.size // 8) * 8 for lin in linears]
    arena = np.empty(sum(sizes) + 8, dtype=np.uint64)
    start = (-arena.ctypes.data % 64) // 8
    for lin, size in zip(linears, sizes):
        view = arena[start:start + lin.panels.size].reshape(lin.panels.shape)
        view[...] = lin.panels
        lin.panels = view
        start += size
    return arena


def _positive_int(value) -> bool:
    """value is an integer (not a bool) of at least 1."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)) and value >= 1


def _is_failure(exc: BaseException) -> bool:
    """An error of the code that ran (an Exception, or a panic of the Rust tokenizers library,
    which derives from BaseException); not an interrupt or an exit."""
    return isinstance(exc, Exception) or type(exc).__name__ == "PanicException"


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message, at most 200 characters."""
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else ""


def _text_list(values, name: str) -> list[str]:
    """`values` (a string or an iterable of strings) as a list of strings, each valid
    Unicode (a lone surrogate cannot be encoded, so the tokenizer cannot take it)."""
    if isinstance(values, str):
        values = [values]
    try:
        values = list(values)
    except TypeError:
        raise BibertError(f"{name} must be a string or a list of strings, not {type(values).__name__}") from None
    for i, text in enumerate(values):
        if not isinstance(text, str):
            raise BibertError(f"{name}[{i}] is of type {type(text).__name__}, not a string")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise BibertError(
                f"{name}[{i}] is not valid Unicode: it holds a lone surrogate {text[exc.start]!r} at character "
                f"{exc.start} (text read with errors='surrogateescape', or a broken \\u escape); clean it first, "
                "e.g. text.encode('utf-8', 'replace').decode('utf-8')") from None
    return values


def _without_paths(name: str, raw: bytes) -> bytes:
    """A tokenizer settings file (tokenizer_config.json, special_tokens_map.json) without the
    keys that name files or remote code (`*_file`, `*_files`, `auto_map`): the tokenizer's
    files are the ones stored beside it, and no code from a model file is run."""
    if name not in ("tokenizer_config.json", "special_tokens_map.json"):
        return raw
    settings = json.loads(raw)
    drop = [k for k in settings if k == "auto_map" or k.endswith(("_file", "_files"))]
    if not drop:
        return raw
    return json.dumps({k: v for k, v in settings.items() if k not in drop}).encode()


def _load_tokenizer(files: dict[str, bytes], config: dict, source: str):
    """The tokenizer of a packed model, from its stored files: a BERT tokenizer is built in
    memory with the `tokenizers` library alone (`bibert.packed.tokenizer`; the ids, masks
    and truncation of transformers' own), another class through transformers where it is
    installed (`_load_hf_tokenizer`). Any failure makes the file invalid."""
    from .tokenizer import UnsupportedTokenizer, build_tokenizer, tokenizer_class

    try:
        return build_tokenizer(files, config)
    except UnsupportedTokenizer:
        pass
    except BaseException as exc:
        if not _is_failure(exc):
            raise
        raise BibertError(f"{source} is not a valid bibert file: its tokenizer cannot be loaded "
                          f"({type(exc).__name__}: {_first_line(exc)})") from None
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise BibertError(f"{source}: its tokenizer class {tokenizer_class(files, config)} is not a BERT tokenizer, "
                          "which only transformers loads: pip install 'bibert[train]'") from None
    return _load_hf_tokenizer(files, config, source)


def _load_hf_tokenizer(files: dict[str, bytes], config: dict, source: str):
    """The Hugging Face tokenizer of a packed model, from its stored files. They are written
    under their fixed names only (TOKENIZER_FILES, never a name taken from the file) into a
    fresh private temporary folder, removed afterwards; remote code is refused and nothing
    is downloaded. Any failure makes the file invalid."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="bibert-tokenizer-") as tmp:
        folder = Path(tmp)
        for name in TOKENIZER_FILES:
            if name in files:
                (folder / name).write_bytes(_without_paths(name, files[name]))
        hint = {"model_type": "bert"}  # which tokenizer class, when tokenizer_config.json does not say
        if isinstance(config.get("tokenizer_class"), str):
            hint["tokenizer_class"] = config["tokenizer_class"]
        (folder / "config.json").write_text(json.dumps(hint))
        try:
            return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False, local_files_only=True)
        except BaseException as exc:
            if not _is_failure(exc):
                raise
            raise BibertError(f"{source} is not a valid bibert file: its tokenizer cannot be loaded "
                              f"({type(exc).__name__}: {_first_line(exc)})") from None


def load_packed(path: str | os.PathLike, threads: int | None = None, kernel: str | None = None,
                revision: str | None = None) -> PackedModel:
    """Load a packed model: a file, a folder written by `save_pretrained`, or a Hugging Face
    Hub repo id ("user/name", at `revision`; `bibert.hub`). threads: threads of the kernels' pool (default: the
    environment's BIBERT_THREADS or every core); kernel: "auto", "avx512", "avx2" or
    "portable" (default: BIBERT_KERNEL or auto). Both settings are process-wide, and so is
    the kernel family's per-host tuning (`bibert.packed.tuning`: measured at the first load of
    a model of this size on this CPU, then cached; BIBERT_TUNE=0 keeps the defaults)."""
    kernels.lib()
    if kernel is not None:
        kernels.set_kernel(kernel)
    if threads is not None:
        kernels.set_threads(threads)
    path = hub.resolve(path, revision)
    model = PackedModel(read_packed(path), source=str(path))
    tuning.tune_host(model.hidden, model.intermediate)  # cached per CPU after the first time
    return model
