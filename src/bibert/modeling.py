"""The fully binarized BERT student (BiBERT) and its straightforward baseline.

One readable model file, following docs/method.md §1-3 (and §7, elastic binarization).
The modules mirror Hugging Face's BertForSequenceClassification so that the latent
full-precision parameters keep the teacher's state-dict names
(`bert.encoder.layer.N.attention.self.query.weight`, ...; listed in bibert.bert_names).
What changes is where the numbers are quantized (see `QuantConfig`):

    word embedding            -> quantize_weight (1 bit: alpha_row * sign(row - mean))
    every encoder Linear, pooler dense -> weights quantize_weight, inputs quantize_activation
    attention "bi"            -> A = sign(Q) sign(K)^T / sqrt(d) + M;  context = bool(A) @ sign(V)
    attention "softmax"       -> P = softmax(A); context = quantize_probs(P) @ quantize(V)
    everything else           -> full precision (position / token-type embeddings,
                                 LayerNorm, biases, residuals, GELU, tanh, classifier)

With `QuantConfig.full_precision()` the model computes exactly what BERT computes, so the
teacher of the distillation is the same class (it exposes Q, K, V for DMD).
Only BERT (model_type "bert", absolute positions) is supported.

Also here: loading the teacher and the starting student of a distillation
(`load_teacher`, `load_student_init`, `shrink_student`) and the sign-flip diagnostic of
training (`binarized_signs`, `flip_ratio`).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import BertConfig
from transformers.activations import ACT2FN

from .bert_names import LAYER_PREFIX, QKV, SELF_ATTENTION, layer_of
from .checkpoint import (CONFIG_NAME, WEIGHTS_NAME, atomic_write, is_student_config, is_student_folder,
                         model_folder_advice, read_config, split_student_config, student_config, verify_folder)
from .config import QuantConfig
from .errors import BibertError
from .losses import LayerMap
from .quantizers import (binary_linear, bool_ste, positive_signs, quantize_activation, quantize_probs, quantize_weight,
                         scale_grad, threshold_ste)
from .tasks import Task

MASK_VALUE = -10000.0  # additive key mask: far below any score, so bool() and softmax give 0
GELU_FAMILY = ("gelu", "gelu_new", "gelu_python", "gelu_pytorch_tanh", "gelu_accurate")


@dataclass
class BiBertOutput:
    """What one forward returns; the optional parts are what the distillation losses need."""

    logits: torch.Tensor  # (B, num_labels)
    loss: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None  # L+1 x (B, T, hidden)
    qkv: tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], ...] | None = None  # L x 3 x (B, nh, T, hs)
    attention_scores: tuple[torch.Tensor, ...] | None = None  # L x (B, nh, T, T), masked, before softmax/bool


class ActQuantizer(nn.Module):
    """Elastic binarizer of one activation tensor (QuantConfig.activations = "elastic").

    levels:    sign(x - threshold) in {-1, +1}, or with `unsigned` 1[x >= threshold] in {0, 1}
    threshold: learned, one per channel (None: fixed at 0, e.g. where a bias already shifts x)
    scale:     learned scalar s; the consuming Linear sees s * levels (None: s = 1)
    window:    the STE's width (a buffer, set from data by `calibrate_quantizers`)
    hardness:  1 (binary levels, the default and what is exported) or, during a phase-in
               (progressive binarization, docs/method.md §7), lam in [0, 1): the forward gives
               lam * levels + (1 - lam) * the STE's surrogate (the hard-tanh, or its {0, 1}
               form, of (x - threshold) / window); the backward is the STE's either way.
               Not saved: the trainer sets it every step.
    The gradient of s is LSQ's, scaled by 1/sqrt(elements); see `threshold_ste` for the rest.
    """

    def __init__(self, channels: int, unsigned: bool = False, threshold: bool = True, scale: bool = True):
        super().__init__()
        self.unsigned = unsigned
        self.strict = False
        self.threshold = nn.Parameter(torch.zeros(channels)) if threshold else None
        if not threshold:
            self.register_buffer("fixed_threshold", torch.zeros(channels), persistent=False)
        self.scale = nn.Parameter(torch.ones(())) if scale else None
        self.register_buffer("window", torch.ones(()))
        self.hardness = 1.0

    @property
    def binary(self) -> bool:
        """Whether the output holds exact levels (+-1 or {0, 1}): not during a phase-in."""
        return self.hardness >= 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = (self.threshold if self.threshold is not None else self.fixed_threshold).to(x.dtype)
        levels = threshold_ste(x, t, self.window, self.unsigned, self.strict)
        if self.binary:
            return levels
        with torch.no_grad():  # the surrogate the STE's gradient stands for, in the forward only
            u = (x - t) / self.window.to(x.dtype)
            soft = (u + 0.5).clamp_(0, 1) if self.unsigned else u.clamp_(-1, 1)
            blend = (1.0 - self.hardness) * (soft - levels)
        return levels + blend

    def output_scale(self, x: torch.Tensor) -> torch.Tensor | None:
        """s for an input like x, with LSQ's gradient scale 1/sqrt(x.numel())."""
        if self.scale is None:
            return None
        return scale_grad(self.scale, 1.0 / math.sqrt(max(1, x.numel())))

    def extra_repr(self) -> str:
        return f"{'unsigned' if self.unsigned else 'signed'}, threshold={self.threshold is not None}, " \
               f"scale={self.scale is not None}"


class QuantLinear(nn.Linear):
    """A Linear whose weight and input are quantized; the bias stays full precision.

    With an `input_quantizer` (elastic binarization) the input is binarized by it and
    scaled by its learned scale; otherwise by `quantize_activation` (sign for 1 bit).
    """

    def __init__(self, in_features: int, out_features: int, weight_bits: int, activation_bits: int,
                 input_quantizer: ActQuantizer | None = None):
        super().__init__(in_features, out_features)
        self.weight_bits = weight_bits
        self.activation_bits = activation_bits
        self.input_quantizer = input_quantizer

    def forward(self, x: torch.Tensor, sign_source: torch.Tensor | None = None) -> torch.Tensor:
        if self.input_quantizer is not None:
            q = self.input_quantizer
            return self.forward_levels(q(x), q.output_scale(x), exact=q.binary)
        xq = quantize_activation(x, self.activation_bits, sign_source)
        if self.weight_bits == 1:
            return binary_linear(xq, self.weight, self.bias, integer_input=self.activation_bits == 1)
        return F.linear(xq, quantize_weight(self.weight, self.weight_bits), self.bias)

    def forward_levels(self, levels: torch.Tensor, scale: torch.Tensor | None, exact: bool = True) -> torch.Tensor:
        """The Linear on already binarized input levels (+-1 or {0, 1}) times `scale`; `exact`
        False: levels blended with their surrogate during a phase-in (float counts)."""
        if self.weight_bits == 1:
            return binary_linear(levels, self.weight, self.bias, scale, integer_input=exact)
        xq = levels if scale is None else levels * scale
        return F.linear(xq, quantize_weight(self.weight, self.weight_bits), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, W{self.weight_bits}A{self.activation_bits}"


class ScoreBinarizer(ActQuantizer):
    """Elastic Bi-Attention on the scores A (B, nh, T, T), with a data-sized STE window:

    absolute (attention "bi"):      BA = 1[A - t_h > 0], a learned threshold t_h per head
                                    (A == t_h gives 0, as the paper's bool at t = 0; the
                                    paper's Bi-Attention is t = 0 with window 1)
    relative (attention "bi-max"):  BA = 1[(A - max_j A) + m_h >= 0], a learned margin m_h
                                    per head below each query's best key (which is always
                                    attended while m_h >= 0); max_j over the real keys,
                                    taken as a constant in the backward.
    `threshold` holds t_h, or m_h for the relative form (initialised to 1).
    """

    def __init__(self, heads: int, relative: bool = False):
        super().__init__(heads, unsigned=True, threshold=True, scale=False)
        self.relative = relative
        self.strict = not relative
        if relative:
            with torch.no_grad():
                self.threshold.fill_(1.0)

    def forward(self, scores: torch.Tensor) -> torch.Tensor:  # (B, nh, T, T)
        t = self.threshold.to(scores.dtype)[None, :, None, None]
        if self.relative:
            shifted = (scores - scores.detach().amax(-1, keepdim=True)) + t
        else:
            shifted = scores - t
        return threshold_ste(shifted, self.fixed_zero(scores), self.window, unsigned=True, strict=self.strict)

    @staticmethod
    def fixed_zero(scores: torch.Tensor) -> torch.Tensor:
        return scores.new_zeros(scores.shape[-1])


def _elastic(quant: QuantConfig, channels: int, **kwargs) -> ActQuantizer | None:
    """An ActQuantizer when `quant` asks for elastic binarization, else None."""
    return ActQuantizer(channels, **kwargs) if quant.elastic else None


class QuantEmbedding(nn.Embedding):
    """The word-embedding table, quantized per token row (only the looked-up rows)."""

    def __init__(self, num: int, dim: int, bits: int, padding_idx: int | None):
        super().__init__(num, dim, padding_idx=padding_idx)
        self.bits = bits

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return quantize_weight(F.embedding(ids, self.weight, self.padding_idx), self.bits)


class Embeddings(nn.Module):
    def __init__(self, config: BertConfig, quant: QuantConfig):
        super().__init__()
        self.word_embeddings = QuantEmbedding(config.vocab_size, config.hidden_size, quant.embedding_bits,
                                              config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # (T,)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        x = x + self.position_embeddings(positions)[None]  # (B, T, hidden)
        return self.dropout(self.LayerNorm(x))


class SelfAttention(nn.Module):
    """Bi-Attention (attention="bi") or softmax attention over quantized Q, K, V.

    With elastic binarization, Q, K and V share one input quantizer (the engine binarizes
    their common input once) and each of q, k, v has a data-sized STE window (no threshold:
    the Linear's bias already shifts it; no scale: Bi-Attention only reads their signs).
    """

    def __init__(self, config: BertConfig, quant: QuantConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_size = config.hidden_size // config.num_attention_heads
        self.quant = quant
        w, a, h = quant.weight_bits, quant.activation_bits, config.hidden_size
        self.query = QuantLinear(h, h, w, a)
        self.key = QuantLinear(h, h, w, a)
        self.value = QuantLinear(h, h, w, a)
        self.input_quantizer = _elastic(quant, h)
        if quant.elastic:
            self.qkv_quantizers = nn.ModuleList(ActQuantizer(h, threshold=False, scale=False) for _ in range(3))
            if quant.binary_attention:
                self.score_quantizer = ScoreBinarizer(self.num_heads, relative=quant.attention == "bi-max")
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.num_heads, self.head_size).transpose(1, 2)  # (B, nh, T, hs)

    def forward(self, x: torch.Tensor, mask: torch.Tensor):
        a = self.quant.activation_bits
        if self.input_quantizer is not None:
            levels, scale = self.input_quantizer(x), self.input_quantizer.output_scale(x)
            exact = self.input_quantizer.binary
            q, k, v = (lin.forward_levels(levels, scale, exact) for lin in (self.query, self.key, self.value))  # (B, T, h)
            qb, kb, vb = (self._heads(quantizer(t)) for quantizer, t in zip(self.qkv_quantizers, (q, k, v)))
            q, k, v = self._heads(q), self._heads(k), self._heads(v)  # real-valued, for DMD
        else:
            q, k, v = self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x))  # real-valued
            qb, kb, vb = (quantize_activation(t, a) for t in (q, k, v))
        scores = qb @ kb.transpose(-1, -2) / math.sqrt(self.head_size) + mask  # (B, nh, T, T)
        if self.quant.binary_attention and self.quant.elastic:
            weights = self.score_quantizer(self.dropout(scores))  # {0, 1}; 0 on padded keys
        elif self.quant.attention == "bi":
            weights = bool_ste(self.dropout(scores))  # {0, 1}; 0 on padded keys
        else:
            weights = quantize_probs(self.dropout(F.softmax(scores, dim=-1)), a)
        context = weights @ vb  # (B, nh, T, hs)
        B, _, T, _ = context.shape
        return context.transpose(1, 2).reshape(B, T, -1), (q, k, v), scores


class Layer(nn.Module):
    def __init__(self, config: BertConfig, quant: QuantConfig):
        super().__init__()
        h, i, w, a = config.hidden_size, config.intermediate_size, quant.weight_bits, quant.activation_bits
        self.attention = nn.Module()
        self.attention.self = SelfAttention(config, quant)
        self.attention.output = _DenseNorm(h, h, w, a, config, _elastic(quant, h))
        self.intermediate = nn.Module()
        self.intermediate.dense = QuantLinear(h, i, w, a, _elastic(quant, h))
        # elastic: FFN-out reads {0, 1} levels thresholded on the pre-activation (where GELU
        # output is close to 0, so is the level); sign: sign(GELU(pre)) = sign(pre)
        self.output = _DenseNorm(i, h, w, a, config, _elastic(quant, i, unsigned=True))
        self.act = ACT2FN[config.hidden_act]
        self.sign_from_pre_activation = config.hidden_act in GELU_FAMILY
        self.levels_from_pre_activation = quant.elastic

    def forward(self, x: torch.Tensor, mask: torch.Tensor):
        context, qkv, scores = self.attention.self(x, mask)
        x = self.attention.output(context, x)
        pre = self.intermediate.dense(x)  # (B, T, intermediate)
        if self.levels_from_pre_activation:
            x = self.output(pre, x)
        else:
            x = self.output(self.act(pre), x, sign_source=pre if self.sign_from_pre_activation else None)
        return x, qkv, scores


class _DenseNorm(nn.Module):
    """LayerNorm(dropout(QuantLinear(x)) + residual): BertSelfOutput / BertOutput."""

    def __init__(self, n_in: int, n_out: int, w: int, a: int, config: BertConfig,
                 input_quantizer: ActQuantizer | None = None):
        super().__init__()
        self.dense = QuantLinear(n_in, n_out, w, a, input_quantizer)
        self.LayerNorm = nn.LayerNorm(n_out, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x, residual, sign_source=None):
        return self.LayerNorm(self.dropout(self.dense(x, sign_source)) + residual)


class BertBody(nn.Module):
    def __init__(self, config: BertConfig, quant: QuantConfig):
        super().__init__()
        self.embeddings = Embeddings(config, quant)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(Layer(config, quant) for _ in range(config.num_hidden_layers))
        self.pooler = nn.Module()
        self.pooler.dense = QuantLinear(config.hidden_size, config.hidden_size, quant.weight_bits,
                                        quant.activation_bits, _elastic(quant, config.hidden_size))


class BiBertForSequenceClassification(nn.Module):
    """A BERT sequence classifier (or regressor when num_labels == 1) with quantized parts.

    Build it from a trained classifier with `bibert.binarize`, or load a saved one with
    `from_pretrained`.
    """

    def __init__(self, config: BertConfig, quant: QuantConfig | None = None):
        super().__init__()
        _check_bert_config(config)
        self.config = config
        self.quant = quant or QuantConfig()
        self.bert = BertBody(config, self.quant)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.apply(self._init_weights)

    def _init_weights(self, m: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @property
    def num_labels(self) -> int:
        return self.config.num_labels

    @property
    def is_regression(self) -> bool:
        return self.config.num_labels == 1

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        output_qkv: bool = False,
        output_attention_scores: bool = False,
    ) -> BiBertOutput:
        attention_mask, token_type_ids = self._check_inputs(input_ids, attention_mask, token_type_ids)
        key_mask = (1.0 - attention_mask[:, None, None, :].float()) * MASK_VALUE  # (B, 1, 1, T)
        x = self.bert.embeddings(input_ids, token_type_ids)  # (B, T, hidden)
        hidden, qkvs, scores = [x], [], []
        for layer in self.bert.encoder.layer:
            x, qkv, s = layer(x, key_mask)
            hidden.append(x)
            qkvs.append(qkv)
            scores.append(s)
        pooled = torch.tanh(self.bert.pooler.dense(x[:, 0]))  # (B, hidden)
        logits = self.classifier(self.dropout(pooled))  # (B, num_labels)
        loss = None
        if labels is not None:
            if self.is_regression:
                loss = F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))
            else:
                loss = F.cross_entropy(logits, labels.long())
        return BiBertOutput(
            logits=logits,
            loss=loss,
            hidden_states=tuple(hidden) if output_hidden_states else None,
            qkv=tuple(qkvs) if output_qkv else None,
            attention_scores=tuple(scores) if output_attention_scores else None,
        )

    def _check_inputs(self, input_ids, attention_mask, token_type_ids):
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise BibertError("input_ids must be a 2-D tensor of token ids, shape (batch, sequence)")
        if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise BibertError(f"input_ids must hold integer token ids, not {input_ids.dtype}")
        B, T = input_ids.shape
        if T > self.config.max_position_embeddings:
            raise BibertError(
                f"sequence of {T} tokens is longer than the model's {self.config.max_position_embeddings}"
                " positions; truncate the input (max_length)"
            )
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= self.config.vocab_size):
            raise BibertError(f"token ids must lie in [0, {self.config.vocab_size}); is the tokenizer the model's own?")
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        token_type_ids = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        for name, t in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != (B, T):
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise BibertError(f"{name} has shape {shape}, but input_ids has shape {(B, T)}; they must match")
            if t.dtype.is_floating_point and name == "token_type_ids":
                raise BibertError("token_type_ids must hold integers")
        if token_type_ids.numel() and (token_type_ids.min() < 0 or token_type_ids.max() >= self.config.type_vocab_size):
            raise BibertError(f"token_type_ids must lie in [0, {self.config.type_vocab_size})")
        return attention_mask, token_type_ids

    # ---- saving and loading ---------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write config.json (BertConfig + quantization + model format version) and
        model.safetensors (latent full-precision weights, Hugging Face names); each file is
        written to a temporary name and renamed, so a crash never leaves half a file."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = student_config({**self.config.to_dict(), "architectures": [type(self).__name__]}, self.quant.to_dict())
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(state, p, metadata={"format": "pt"}))
        atomic_write(directory / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(config, indent=2, sort_keys=True)))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, map_location: str = "cpu") -> "BiBertForSequenceClassification":
        """Load a folder written by `save_pretrained`; refuses other kinds of folders, and one whose
        files differ from its manifest (bibert.checkpoint.verify_folder)."""
        config_dict = read_config(directory)
        verify_folder(directory, model_folder_advice(directory))
        if not is_student_config(config_dict):
            raise BibertError(
                f"{directory} holds a Hugging Face model, not a BiBERT student; build one with "
                "bibert.binarize(path) or `bibert distill`"
            )
        config_dict, quant = split_student_config(config_dict, directory)
        quant = QuantConfig.from_dict(quant)
        weights = Path(directory) / WEIGHTS_NAME
        if not weights.is_file():
            raise BibertError(f"{directory} has no {WEIGHTS_NAME}: the checkpoint is incomplete")
        model = cls(BertConfig.from_dict(config_dict), quant)
        try:
            state = load_file(str(weights), device=map_location)
        except Exception as exc:  # safetensors raises its own error types
            raise BibertError(f"cannot read {weights}: {exc}; the file is damaged, write it again") from None
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise BibertError(f"{weights} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
        return model


def _check_bert_config(config) -> None:
    if getattr(config, "model_type", None) != "bert":
        raise BibertError(
            f"bibert binarizes BERT models (model_type 'bert'); got model_type {getattr(config, 'model_type', None)!r}"
        )
    if getattr(config, "position_embedding_type", "absolute") not in (None, "absolute"):
        raise BibertError("only absolute position embeddings are supported")
    if config.hidden_size % config.num_attention_heads:
        raise BibertError("hidden_size must be a multiple of num_attention_heads")


def binarize(model_or_path, config: QuantConfig | None = None, num_labels: int | None = None) -> BiBertForSequenceClassification:
    """Build a quantized student (default: BiBERT 1-1-1) from a BERT sequence classifier.

    `model_or_path` is a Hugging Face BERT model (BertForSequenceClassification, or a bare
    BertModel whose classifier is then freshly initialised), a folder holding one (or a hub
    name), or a BiBERT folder. The student copies every weight by name; its latent
    full-precision parameters are the teacher's.
    """
    quant = config or QuantConfig()
    if isinstance(model_or_path, BiBertForSequenceClassification):
        source, hf_config = model_or_path, model_or_path.config
    elif isinstance(model_or_path, nn.Module):
        hf_config = getattr(model_or_path, "config", None)
        if hf_config is None:
            raise BibertError(f"{type(model_or_path).__name__} is not a Hugging Face model (it has no config)")
        _check_bert_config(hf_config)
        source = model_or_path
    else:
        path = str(model_or_path)
        if os.path.isdir(path) and is_student_folder(path):
            return binarize(BiBertForSequenceClassification.from_pretrained(path), quant, num_labels)
        source = load_hf_classifier(path, num_labels)
        hf_config = source.config
    if num_labels is not None and num_labels != hf_config.num_labels:
        raise BibertError(f"the model has {hf_config.num_labels} labels but {num_labels} were asked for")
    student = BiBertForSequenceClassification(BertConfig.from_dict(hf_config.to_dict()), quant)
    state = source.state_dict()
    if not any(k.startswith("bert.") for k in state):  # a bare BertModel
        state = {f"bert.{k}": v for k, v in state.items()}
    own = student.state_dict()
    missing = [k for k in own if k not in state]
    if [k for k in missing if not k.startswith("classifier.") and not _is_quantizer_key(k)]:
        raise BibertError(f"the model lacks BERT weights {missing[:5]}; is it a BERT classifier?")
    student.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return student


def set_activation_hardness(model: nn.Module, hardness: float) -> None:
    """Progressive binarization: every elastic activation quantizer that feeds a Linear or
    Bi-Attention's Q/K/V gives hardness * levels + (1 - hardness) * surrogate (ActQuantizer);
    1 = binary. Bi-Attention's own {0, 1} weights stay binary."""
    if not 0.0 <= hardness <= 1.0:
        raise ValueError(f"hardness must lie in [0, 1], got {hardness}")
    for m in model.modules():
        if isinstance(m, ActQuantizer) and not isinstance(m, ScoreBinarizer):
            m.hardness = float(hardness)


def _is_quantizer_key(name: str) -> bool:
    """State-dict entries of the elastic quantizers (new in a student built from a teacher)."""
    return any("quantizer" in part for part in name.split("."))


@torch.no_grad()
def calibrate_quantizers(student: BiBertForSequenceClassification, batch: dict,
                         teacher: nn.Module | None = None, layer_map=None) -> dict[str, dict[str, float]]:
    """Set every elastic quantizer's STE window, and its scale, from one batch of data.

    window: mean |x - threshold| of the student's own input to the quantizer, so that the
        straight-through gradient reaches the bulk of the values whatever their scale (the
        Bi-Attention context is an integer count, far outside BiBERT's fixed |x| <= 1).
    scale:  with a teacher, the size of the teacher's input to the same Linear: mean |x|
        for {-1, +1} levels, the mean of the positive values for {0, 1} levels (the best
        scalar for a sign / step approximation), so that each branch starts at the
        teacher's scale relative to the residual; without one, 1 (the paper's unscaled
        sign). `layer_map` maps student layers to teacher layers (a shallower student).
    Returns {quantizer name: {"window": w, "scale": s}}.
    """
    quantizers = {n: m for n, m in student.named_modules() if isinstance(m, ActQuantizer)}
    if not quantizers:
        return {}
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask"),
              "token_type_ids": batch.get("token_type_ids")}
    seen: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, name=n: seen.__setitem__(name, args[0].detach()))
             for n, m in quantizers.items()]
    was_training = student.training
    student.eval()
    try:
        student(**inputs)
    finally:
        student.train(was_training)
        for h in hooks:
            h.remove()
    valid = inputs["attention_mask"]
    valid = torch.ones_like(inputs["input_ids"], dtype=torch.bool) if valid is None else valid.bool()

    def real(x: torch.Tensor, name: str) -> torch.Tensor:
        """The values at real (not padded) token positions, flattened per channel."""
        if x.dim() == 3 and x.shape[:2] == valid.shape:
            return x[valid]
        return x.reshape(-1, x.shape[-1])  # the pooler's [CLS] rows

    pairs = (valid[:, None, :, None] & valid[:, None, None, :])  # (B, 1, T, T): real query and key

    teacher_inputs = _teacher_linear_inputs(teacher, inputs, quantizers, student, layer_map) if teacher is not None else {}
    report = {}
    for name, q in quantizers.items():
        if isinstance(q, ScoreBinarizer):  # scores (B, nh, T, T), threshold per head
            scores, t = seen[name].float(), q.threshold.float()[None, :, None, None]
            shifted = scores - scores.amax(-1, keepdim=True) + t if q.relative else scores - t
            window = shifted.masked_select(pairs.expand_as(shifted)).abs().mean().clamp_min(1e-3)
        else:
            x = real(seen[name].float(), name)
            t = (q.threshold if q.threshold is not None else q.fixed_threshold).float()
            window = (x - t).abs().mean().clamp_min(1e-3)
        q.window.fill_(float(window))
        entry = {"window": float(window)}
        if q.scale is not None:
            xt = teacher_inputs.get(name)
            if xt is None:
                scale = torch.tensor(1.0)
            else:
                xt = real(xt.float(), name)
                scale = xt.clamp_min(0)[xt > 0].mean() if q.unsigned else xt.abs().mean()
            q.scale.fill_(float(scale.clamp_min(1e-3)))
            entry["scale"] = float(q.scale)
        report[name] = entry
    return report


def _teacher_linear_inputs(teacher, inputs, quantizers, student, layer_map) -> dict[str, torch.Tensor]:
    """For each student quantizer that feeds a Linear, the teacher's input to that Linear."""
    student_layers = student.config.num_hidden_layers
    teacher_layers = teacher.config.num_hidden_layers
    factor = teacher_layers // student_layers if layer_map is None else layer_map.factor
    targets = {}
    for name in quantizers:
        parts = name.split(".")
        if parts[-1] != "input_quantizer":
            continue
        owner = ".".join(parts[:-1])  # the Linear (or SelfAttention for the shared Q/K/V input)
        if owner.endswith(SELF_ATTENTION):
            owner = owner[:-len(SELF_ATTENTION)] + QKV[0]
        i = layer_of(owner)
        if i is not None:
            owner = owner.replace(LAYER_PREFIX.format(i), LAYER_PREFIX.format((i + 1) * factor - 1), 1)
        targets[owner] = name
    modules = dict(teacher.named_modules())
    seen = {}
    hooks = [modules[o].register_forward_hook(lambda mod, args, out, name=n: seen.__setitem__(name, args[0].detach()))
             for o, n in targets.items() if o in modules]
    try:
        teacher(**inputs)
    finally:
        for h in hooks:
            h.remove()
    return seen


def load_hf_classifier(name_or_path: str, num_labels: int | None = None, **kwargs):
    """A Hugging Face BERT sequence classifier from a folder or hub name (eager attention).
    Weights stored as a pickle (pytorch_model.bin) are read only when they hold plain
    tensors; a pickle that holds anything else (it could run code) or a damaged one is
    refused with a BibertError. Weights the checkpoint lacks (a new classification head)
    are named in one line on stderr, instead of transformers' load report."""
    import pickle

    from transformers import AutoConfig, AutoModelForSequenceClassification

    if os.path.isdir(name_or_path):
        read_config(name_or_path)  # a folder without config.json holds no model: say so
        verify_folder(name_or_path, model_folder_advice(name_or_path))
    else:
        from .fetch import check_hub

        check_hub(name_or_path)  # offline: fail at once, naming the offline teacher
    try:
        hf_config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as exc:
        raise BibertError(f"cannot load a model from {name_or_path!r}: {str(exc).splitlines()[0]}") from None
    _check_bert_config(hf_config)
    extra = {"num_labels": num_labels} if num_labels is not None else {}
    try:
        with _quiet_load_report():
            model, info = AutoModelForSequenceClassification.from_pretrained(
                name_or_path, attn_implementation="eager", output_loading_info=True, **extra, **kwargs
            )
    except pickle.UnpicklingError:
        raise BibertError(
            f"refusing the weights of {name_or_path!r}: pytorch_model.bin is a pickle that holds more than plain "
            "tensors (loading it could run code), or it is damaged. Use a copy of the model with model.safetensors, "
            "or convert it where you trust the file: model.save_pretrained(folder, safe_serialization=True)"
        ) from None
    new = sorted(set(info.get("missing_keys") or ()) | {m[0] for m in info.get("mismatched_keys") or ()})
    if new:
        what = (f"a new classification head ({model.config.num_labels} outputs)"
                if all(k.startswith("classifier.") for k in new) else "weights the checkpoint lacks")
        print(f"{name_or_path}: {what} starts from random values: {', '.join(new)}", file=sys.stderr)
    return model


@contextlib.contextmanager
def _quiet_load_report():
    """Holds back transformers' load report (a table that reads like an error for the
    expected new head); `load_hf_classifier` says what matters in one line."""
    logger = logging.getLogger("transformers.modeling_utils")
    drop = _DropLoadReport()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


class _DropLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)


def load_any_model(directory: str | os.PathLike) -> nn.Module:
    """A BiBERT folder as BiBertForSequenceClassification, any other as a HF classifier."""
    if is_student_folder(directory):
        return BiBertForSequenceClassification.from_pretrained(directory)
    return load_hf_classifier(str(directory))


# ------------------------------------------------- distillation: teacher and student

def load_teacher(path: str, task: Task) -> BiBertForSequenceClassification:
    """The frozen teacher (eval mode, no gradients), exposing Q/K/V and hidden states.

    A Hugging Face BERT classifier becomes the full-precision BiBERT wrapper (computes
    exactly BERT); a BiBERT folder is used as it is (multi-step distillation). Its head
    must match the task: a classifier with the task's number of labels.
    """
    if os.path.isdir(path):
        config = read_config(path)
        if is_student_config(config):
            teacher = BiBertForSequenceClassification.from_pretrained(path)
        else:
            if not any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or []):
                raise BibertError(
                    f"the teacher {path} has no classification head ({', '.join(config.get('architectures') or ['?'])});"
                    f" fine-tune it on {task.name} first: bibert finetune --model {path} "
                    + (f"--task {task.name}" if task.registered else "--train-file FILE") + " --out DIR"
                )
            teacher = binarize(load_hf_classifier(path), QuantConfig.full_precision())
    else:  # a hub name
        teacher = binarize(load_hf_classifier(path), QuantConfig.full_precision())
    check_labels(teacher.config, task, f"the teacher {path}")
    teacher.eval().requires_grad_(False)
    return teacher


def load_student_init(path: str, task: Task) -> nn.Module:
    """The weights a student starts from when they are not the teacher's: a BiBERT folder
    (e.g. an intermediate 1-1-4 student) or a Hugging Face classifier folder."""
    if not os.path.isdir(path):
        raise BibertError(f"--init-from {path}: no such folder; give a student's best/ folder")
    model = BiBertForSequenceClassification.from_pretrained(path) if is_student_folder(path) \
        else load_hf_classifier(path)
    check_labels(model.config, task, f"the starting student {path}")
    return model


def check_labels(config, task: Task, what: str) -> None:
    """Refuse a model (`what`, for the message) whose head does not fit the task: another
    number of outputs, or label names other than the task's (generic LABEL_i names pass)."""
    if config.num_labels != task.num_labels:
        kind = "a regressor (1 output)" if config.num_labels == 1 else f"{config.num_labels} labels"
        raise BibertError(f"{what} has {kind}, but {task.name} needs {task.num_labels}; "
                          f"use a teacher fine-tuned on {task.name}")
    names = [config.id2label[i] for i in sorted(config.id2label)] if getattr(config, "id2label", None) else []
    generic = all(str(n) == f"LABEL_{i}" for i, n in enumerate(names))
    if task.label_list is not None and names and not generic and tuple(map(str, names)) != task.label_list:
        raise BibertError(f"{what} predicts labels {names}, but {task.name}'s labels are {list(task.label_list)}")


def shrink_student(student: BiBertForSequenceClassification, layers: int) -> BiBertForSequenceClassification:
    """Keep `layers` encoder layers: student layer i starts from teacher layer (i+1)k-1,
    the layer it is matched to (docs/method.md §4's depth mapping)."""
    keep = LayerMap(layers, student.config.num_hidden_layers).layers
    student.bert.encoder.layer = nn.ModuleList(student.bert.encoder.layer[i] for i in keep)
    student.config.num_hidden_layers = layers
    return student


def binarized_signs(model: nn.Module) -> dict[str, torch.Tensor]:
    """The signs of every 1-bit weight and word-embedding table, as `binarize_weight` takes
    them (sign(W - rowmean(W)) == +1; bool)."""
    out = {}
    for name, m in model.named_modules():
        bits = m.weight_bits if isinstance(m, QuantLinear) else m.bits if isinstance(m, QuantEmbedding) else None
        if bits == 1:
            out[name] = positive_signs(m.weight.detach())
    return out


def flip_ratio(model: nn.Module, reference: dict[str, torch.Tensor]) -> float:
    """Fraction of binarized weight signs that differ from `reference`."""
    now = binarized_signs(model)
    changed = sum(int((now[k] != ref.to(now[k].device)).sum()) for k, ref in reference.items())
    total = sum(ref.numel() for ref in reference.values())
    return changed / total if total else 0.0
