"""Training objectives: BiBERT's Direction-Matching Distillation, the standard objective, fine-tuning.

Follows docs/method.md §4 (DMD, Qin et al. ICLR 2022, paper §3.3) and its standard
TinyBERT / BinaryBERT objective of the straightforward baseline. Every loss takes the
student's and the teacher's tensors and a `LayerMap` that says which teacher layer each
student layer matches (the identity when both have the same depth). The objectives the
training loop calls (`FinetuneObjective`, `DistillObjective`) run the models on a batch
and return their loss parts; each declares the names of its parts.

    r2b(S, T)      = || S/||S|| - T/||T|| ||_2           norms over the WHOLE tensor
    P_F            = F F^T / sqrt(d)                     per head, F in {Q, K, V}: (B, nh, T, T)
    dmd_loss       = sum_l r2b(P_Q^s, P_Q^t) + r2b(P_K^s, P_K^t) + r2b(P_V^s, P_V^t)
    hidden_loss    = sum_{l=0..L} r2b(H_l^s, H_l^t)
    prediction_loss= mean_b(-sum softmax(z_t) log_softmax(z_s)) + w_gt CE(z_s, y)
                     (regression: MSE(z_s, z_t))
    standard       = sum_l MSE(A_l^s, A_l^t) + sum_l MSE(H_l^s, H_l^t) + soft CE

Padded positions stay in P_F and H (the reference's choice, docs/method.md §4); with `mask` (the
batch's attention mask) they are zeroed in student and teacher alike before the norms:
the entries of P_F that involve a padded query or key, and H at padded positions.

Every r2b is computed from inner products (`r2b_from_products`), and DMD's from (hs, hs) Gram
matrices F^T F' instead of the (T, T) patterns: the same values, in a fraction of the time
and memory.

In the standard objective, the masked attention scores (-10000 on padded keys) are replaced
by 0 before the MSE, as TinyBERT does. Every loss is computed in at least float32 (also
under bf16 autocast).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import BibertError

EPS = 1e-12  # guards ||S|| = 0 (an all-zero tensor has no direction)


def _wide(x: torch.Tensor) -> torch.Tensor:
    """x in float32 at least (bf16/fp16 are widened, float64 stays)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


@dataclass(frozen=True)
class LayerMap:
    """Which teacher layer each student layer matches (docs/method.md §4, TinyBERT's uniform map).

    With k = teacher_layers / student_layers: student layer i (0-based) matches teacher
    layer (i+1)k-1 for Q/K/V and attention scores, and hidden state i (0 = embeddings)
    matches teacher hidden state i*k.
    """

    student_layers: int
    teacher_layers: int

    def __post_init__(self) -> None:
        s, t = self.student_layers, self.teacher_layers
        if s < 1 or t < 1 or t % s:
            raise BibertError(
                f"a {s}-layer student cannot be mapped onto a {t}-layer teacher: the teacher's depth"
                " must be a multiple of the student's"
            )

    @property
    def factor(self) -> int:
        return self.teacher_layers // self.student_layers

    @property
    def layers(self) -> list[int]:
        """Teacher layer for each student layer (Q/K/V, attention scores)."""
        return [(i + 1) * self.factor - 1 for i in range(self.student_layers)]

    @property
    def hidden(self) -> list[int]:
        """Teacher hidden-state index for each of the student's L+1 hidden states."""
        return [i * self.factor for i in range(self.student_layers + 1)]


def r2b(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """|| s/||s|| - t/||t|| ||, every norm the Frobenius norm over the whole tensor (not squared).

    Batch, heads and positions are normalised together, not row by row. The result lies in
    [0, 2]: 0 when s and t point the same way, sqrt(2) when orthogonal. Computed from the
    three inner products <s, t>, <s, s>, <t, t> (`r2b_from_products`): the same function, with
    one pass over each tensor instead of normalised copies.
    """
    _check_same_shape(s, t)
    s, t = _wide(s), _wide(t)
    return r2b_from_products(_dot(s, t), _dot(s, s), _dot(t, t)).to(s.dtype)


def _check_same_shape(s: torch.Tensor, t: torch.Tensor) -> None:
    if s.shape != t.shape:
        raise BibertError(f"r2b needs tensors of one shape, got {tuple(s.shape)} and {tuple(t.shape)}")


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """<a, b> over every element (one BLAS dot in the tensors' dtype), as a float64 scalar."""
    return torch.tensordot(a, b, dims=a.dim()).to(torch.float64) if a.dim() else (a * b).to(torch.float64)


def r2b_from_products(st: torch.Tensor, ss: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
    """r2b(s, t) from <s, t>, ||s||^2 and ||t||^2 (float64 scalars):

        r2b^2 = |s_dir|^2 + |t_dir|^2 - 2 <s, t> / (||s|| ||t||)

    with |x_dir| = 1, or 0 for an all-zero tensor (its direction is taken as 0, so r2b is 1,
    as with a norm guarded by EPS). The square root is guarded at 0, where rounding may land
    (s and t pointing the same way): there the gradient is 0 instead of infinite."""
    us, ut = ss.clamp_min(EPS ** 2), tt.clamp_min(EPS ** 2)
    squared = ss / us + tt / ut - 2 * st / (us * ut).sqrt()
    return squared.clamp_min(1e-30).sqrt()


def similarity_pattern(f: torch.Tensor) -> torch.Tensor:
    """P_F = F F^T / sqrt(d) per head: (B, nh, T, d) -> (B, nh, T, T)."""
    f = _wide(f)
    return f @ f.transpose(-1, -2) / math.sqrt(f.shape[-1])


def dmd_loss(student_qkv, teacher_qkv, layer_map: LayerMap | None = None,
             mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Direction-matching loss of Q, K and V, summed over the mapped layers.

    student_qkv / teacher_qkv: per layer a (q, k, v) triple of real-valued projections
    before sign, each (B, nh, T, hs). Returns {"q", "k", "v"}, each sum_l r2b(P_F^s, P_F^t);
    loss_DMD is their sum. mask (B, T), optional: leave padded positions out of P_F.

    The (T, T) patterns are never formed: r2b needs only <P^s, P^t>, ||P^s||^2 and ||P^t||^2,
    and per head <F_s F_s^T, F_t F_t^T> = ||F_s^T F_t||^2, a (hs, hs) Gram matrix (the
    1/sqrt(d) of P_F cancels in the directions). Zeroing the rows of padded positions in F
    zeroes exactly the entries of P_F that involve them.
    """
    layer_map = layer_map or LayerMap(len(student_qkv), len(teacher_qkv))
    _check_depth("qkv", len(student_qkv), len(teacher_qkv), layer_map)
    rows = None if mask is None else mask[:, None, :, None]

    def wide(f):
        f = _wide(f)
        return f if rows is None else f * rows.to(f.dtype)

    def gram_norm2(a, b):  # ||a^T b||^2 summed over batch and heads: <a a^T, b b^T> when a is b
        g = a.transpose(-1, -2) @ b  # (B, nh, hs, hs)
        return _dot(g, g)

    parts = {}
    for j, name in enumerate("qkv"):
        total = 0.0
        for i, t in enumerate(layer_map.layers):
            fs, ft = wide(student_qkv[i][j]), wide(teacher_qkv[t][j])
            _check_same_shape(fs, ft)
            total = total + r2b_from_products(gram_norm2(fs, ft), gram_norm2(fs, fs), gram_norm2(ft, ft))
        parts[name] = total.to(torch.promote_types(student_qkv[0][j].dtype, torch.float32))
    return parts


def hidden_loss(student_hidden, teacher_hidden, layer_map: LayerMap | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """sum_{l=0..L} r2b(H_l^s, H_l^t) over the L+1 hidden states, each (B, T, hidden);
    mask (B, T), optional: leave padded positions out."""
    layer_map = layer_map or LayerMap(len(student_hidden) - 1, len(teacher_hidden) - 1)
    _check_depth("hidden states", len(student_hidden) - 1, len(teacher_hidden) - 1, layer_map)

    def masked(h):
        h = _wide(h)
        return h if mask is None else h * mask[..., None].to(h.dtype)

    return sum(r2b(masked(student_hidden[i]), masked(teacher_hidden[t])) for i, t in enumerate(layer_map.hidden))


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """mean_b( -sum_c softmax(z_t)[b,c] * log_softmax(z_s)[b,c] )."""
    target = F.softmax(_wide(teacher_logits), dim=-1)  # (B, C)
    return -(target * F.log_softmax(_wide(student_logits), dim=-1)).sum(-1).mean()


def prediction_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    is_regression: bool = False,
    ground_truth_weight: float = 0.5,
) -> torch.Tensor:
    """DMD's prediction loss.

    classification: soft_cross_entropy(z_s, z_t) + ground_truth_weight * CE(z_s, y)
                    (the CE term only when labels are given and the weight is non-zero)
    regression:     MSE(z_s, z_t)
    """
    if is_regression:
        return F.mse_loss(_wide(student_logits).view(-1), _wide(teacher_logits).view(-1))
    loss = soft_cross_entropy(student_logits, teacher_logits)
    if labels is not None and ground_truth_weight:
        loss = loss + ground_truth_weight * F.cross_entropy(_wide(student_logits), labels.long())
    return loss


def attention_score_mse(student_scores, teacher_scores, attention_mask: torch.Tensor,
                        layer_map: LayerMap | None = None) -> torch.Tensor:
    """sum_l MSE(A_l^s, A_l^t) over masked attention scores (B, nh, T, T), with the scores
    on padded keys (attention_mask == 0, where -10000 was added) replaced by 0."""
    layer_map = layer_map or LayerMap(len(student_scores), len(teacher_scores))
    _check_depth("attention scores", len(student_scores), len(teacher_scores), layer_map)
    padded = attention_mask[:, None, None, :] == 0  # (B, 1, 1, T)
    total = 0.0
    for i, t in enumerate(layer_map.layers):
        s = _wide(student_scores[i]).masked_fill(padded, 0.0)
        tt = _wide(teacher_scores[t]).masked_fill(padded, 0.0)
        total = total + F.mse_loss(s, tt)
    return total


def hidden_mse(student_hidden, teacher_hidden, layer_map: LayerMap | None = None) -> torch.Tensor:
    """sum_{l=0..L} MSE(H_l^s, H_l^t) over the L+1 hidden states."""
    layer_map = layer_map or LayerMap(len(student_hidden) - 1, len(teacher_hidden) - 1)
    _check_depth("hidden states", len(student_hidden) - 1, len(teacher_hidden) - 1, layer_map)
    return sum(F.mse_loss(_wide(student_hidden[i]), _wide(teacher_hidden[t])) for i, t in enumerate(layer_map.hidden))


def standard_distill_loss(student, teacher, attention_mask: torch.Tensor, is_regression: bool = False,
                          layer_map: LayerMap | None = None, pred_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """TinyBERT / BinaryBERT objective on two `BiBertOutput`s (with hidden states and
    attention scores): {"att": attention_score_mse, "hid": hidden_mse, "pred": soft CE
    (MSE for regression), "loss": att + hid + pred_weight * pred}."""
    parts = {
        "att": attention_score_mse(student.attention_scores, teacher.attention_scores, attention_mask, layer_map),
        "hid": hidden_mse(student.hidden_states, teacher.hidden_states, layer_map),
        "pred": prediction_loss(student.logits, teacher.logits, None, is_regression, ground_truth_weight=0.0),
    }
    parts["loss"] = parts["att"] + parts["hid"] + pred_weight * parts["pred"]
    return parts


def dmd_distill_loss(student, teacher, labels: torch.Tensor | None, is_regression: bool = False,
                     layer_map: LayerMap | None = None, mask: torch.Tensor | None = None,
                     pred_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """BiBERT's objective on two `BiBertOutput`s (with hidden states and Q/K/V):
    {"pred", "q", "k", "v", "hid", "loss" = pred_weight * pred + q + k + v + hid} (docs/method.md §4;
    the paper's weights are all 1).
    mask: the attention mask, to leave padded positions out of DMD and the hidden loss
    (an option; the reference keeps them)."""
    parts = {"pred": prediction_loss(student.logits, teacher.logits, labels, is_regression)}
    parts.update(dmd_loss(student.qkv, teacher.qkv, layer_map, mask))
    parts["hid"] = hidden_loss(student.hidden_states, teacher.hidden_states, layer_map, mask)
    parts["loss"] = pred_weight * parts["pred"] + parts["q"] + parts["k"] + parts["v"] + parts["hid"]
    return parts


class FinetuneObjective:
    """The model's own loss: cross-entropy (MSE for regression) against the labels."""

    parts = ("loss",)

    def __call__(self, model, batch: dict) -> dict[str, torch.Tensor]:
        return {"loss": model(**batch).loss}


class DistillObjective:
    """DMD (`dmd_distill_loss`) or the standard TinyBERT/BinaryBERT objective
    (`standard_distill_loss`) of a student against a frozen teacher (docs/method.md §4)."""

    PARTS = {"dmd": ("loss", "pred", "q", "k", "v", "hid"), "standard": ("loss", "pred", "att", "hid")}

    def __init__(self, teacher: nn.Module, kind: str, layer_map: LayerMap, is_regression: bool,
                 mask_padding: bool = False, pred_weight: float = 1.0):
        self.teacher, self.kind, self.layer_map, self.is_regression = teacher, kind, layer_map, is_regression
        self.mask_padding, self.pred_weight = mask_padding, pred_weight
        self.parts = self.PARTS[kind]

    def __call__(self, model, batch: dict) -> dict[str, torch.Tensor]:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
        want = dict(output_hidden_states=True, output_qkv=self.kind == "dmd",
                    output_attention_scores=self.kind == "standard")
        with torch.no_grad():
            t = self.teacher(**inputs, **want)
        s = model(**inputs, **want)
        if self.kind == "dmd":
            mask = batch["attention_mask"] if self.mask_padding else None
            return dmd_distill_loss(s, t, batch.get("labels"), self.is_regression, self.layer_map, mask,
                                    self.pred_weight)
        return standard_distill_loss(s, t, batch["attention_mask"], self.is_regression, self.layer_map,
                                     self.pred_weight)


def _check_depth(what: str, n_student: int, n_teacher: int, layer_map: LayerMap) -> None:
    if (n_student, n_teacher) != (layer_map.student_layers, layer_map.teacher_layers):
        raise BibertError(
            f"{what}: got {n_student} student and {n_teacher} teacher layers, but the layer map is"
            f" {layer_map.student_layers} -> {layer_map.teacher_layers}"
        )
