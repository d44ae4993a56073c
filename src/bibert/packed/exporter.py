"""Exporting a BiBERT student folder to a packed file (docs/packed_format.md). Needs PyTorch
(imported when a student is exported); the tensors a file holds are `bibert.packed.format`'s
(`expected_tensors`), and `bibert.packed.writer` writes them, refusing what the reader refuses.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..bert_names import BODY, CLASSIFIER
from ..checkpoint import (CONFIG_NAME, QUANTIZATION_KEY, WEIGHTS_NAME, check_finite, is_student_config,
                          model_folder_advice, read_config, split_student_config, verify_folder)
from ..errors import BibertError
from .format import (ACTIVATION_CLIP_STD, QUANTIZER_SCALE, SCORE_COUNT_MIN, SCORE_THRESHOLD, SIDE_DTYPES,
                     TOKENIZER_FILES, TRAINING_ONLY, PackedFile, PackedFormatError, PackedQuant, expected_tensors,
                     pack_bool)
from .writer import write_packed


@dataclass
class ExportReport:
    path: Path
    packed_bytes: int
    fp32_bytes: int  # the student's fp32 safetensors

    @property
    def ratio(self) -> float:
        return self.fp32_bytes / self.packed_bytes

    def __str__(self) -> str:
        return (f"wrote {self.path}: {self.packed_bytes / 2**20:.2f} MiB packed vs "
                f"{self.fp32_bytes / 2**20:.2f} MiB fp32 safetensors ({self.ratio:.1f}x smaller)")


def _check_exportable(config: dict, directory) -> None:
    from ..modeling import GELU_FAMILY

    if not is_student_config(config) or QUANTIZATION_KEY not in config:
        raise BibertError(f"{directory} is not a BiBERT student folder (no quantization in {CONFIG_NAME})")
    q = config[QUANTIZATION_KEY]
    bits = (q.get("weight_bits"), q.get("embedding_bits"), q.get("activation_bits"))
    kbit_softmax = bits in ((1, 1, 2), (1, 1, 4)) and q.get("attention") == "softmax"
    if bits not in ((1, 1, 1), (1, 1, 2), (1, 1, 4)) or q.get("attention") not in ("bi", "bi-max") and not kbit_softmax:
        raise BibertError(
            f"only students with binary weights and word embedding, 1-, 2- or 4-bit activations and "
            f"Bi-Attention (bits 1-1-1, 1-1-2, 1-1-4, attention 'bi' or, elastic, 'bi-max'), or softmax attention "
            f"with 2- or 4-bit activations, can be packed; "
            f"{directory} is {'-'.join(map(str, bits))} with attention {q.get('attention')!r}"
        )
    if config.get("hidden_act") not in GELU_FAMILY:
        raise BibertError(f"hidden_act {config.get('hidden_act')!r} does not keep the sign of its input; "
                          "the packed engine needs a GELU")


def export_packed(student_dir: str | os.PathLike, out: str | os.PathLike, side_dtype: str = "float32",
                  tokenizer_dir: str | os.PathLike | None = None) -> ExportReport:
    """Write the packed model of a BiBERT student folder (`save_pretrained` output) to `out`."""
    import torch
    from safetensors.torch import load_file

    from ..quantizers import weight_scale_and_signs

    if side_dtype not in SIDE_DTYPES:
        raise BibertError(f"side dtype {side_dtype!r}: choose float32 or float16")
    side = SIDE_DTYPES[side_dtype]
    student_dir = Path(student_dir)
    config = read_config(student_dir)
    verify_folder(student_dir, model_folder_advice(student_dir))
    _check_exportable(config, student_dir)
    weights_path = student_dir / WEIGHTS_NAME
    if not weights_path.is_file():
        raise BibertError(f"{student_dir} has no {WEIGHTS_NAME}")
    try:
        state = load_file(str(weights_path))
    except Exception as exc:
        raise BibertError(f"cannot read {weights_path}: {exc}") from None
    check_finite(state, weights_path, "a packed model of it would predict garbage: export a student that trained "
                 "without diverging (another checkpoint, or train again)")
    state = {k if k.startswith((f"{BODY}.", f"{CLASSIFIER}.")) else f"{BODY}.{k}": v for k, v in state.items()}

    hf_config, quantization = split_student_config(config, student_dir)
    try:
        quant = PackedQuant.from_dict(quantization)
        table = expected_tensors(hf_config, np.dtype(side).name, quant)
    except PackedFormatError as exc:
        raise BibertError(f"cannot pack {student_dir}: {exc}") from None

    taken: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in state:
            raise BibertError(f"{weights_path} lacks {name}")
        taken.add(name)
        return state[name].float()

    tensors: dict[str, np.ndarray] = {}
    for name, spec in table.items():  # file order; a weight's sign bits and scale come from one binarization
        if name.endswith(".bits"):
            base = name[: -len(".bits")]
            alpha, signs = weight_scale_and_signs(take(base + ".weight"))
            tensors[name] = pack_bool(signs.numpy() < 0)
            tensors[base + ".alpha"] = alpha.numpy().astype(side)
        elif name.endswith(QUANTIZER_SCALE):  # a scalar parameter, stored as one value
            value = take(name)
            if value.numel() != 1:
                raise BibertError(f"{weights_path}: {name} has shape {list(value.shape)}; it must be a scalar")
            tensors[name] = value.reshape(spec.shape).numpy().astype(side)
        elif name == ACTIVATION_CLIP_STD:  # a constant of the student's k-bit quantizer
            from ..quantizers import ACTIVATION_CLIP_STD as clip_std

            tensors[name] = np.array([clip_std[quant.activation_bits]], "<f4")
        elif name.endswith(SCORE_COUNT_MIN):  # "bi-max": the margins as a table of counts
            margin_name = name[: -len(SCORE_COUNT_MIN)] + SCORE_THRESHOLD
            try:
                tensors[name] = score_count_minima(take(margin_name), spec.counts)
            except BibertError as exc:
                raise BibertError(f"cannot pack {student_dir}: {margin_name}: {exc}") from None
        elif name.endswith(SCORE_THRESHOLD) and name not in state:  # a student without learned score
            tensors[name] = np.zeros(spec.shape, side)  # thresholds computes Bi-Attention's bool, t = 0
        elif not name.endswith(".alpha"):
            tensors[name] = take(name).numpy().astype(side)
    # every parameter of the student must reach the file: one the format has no place for
    # would change what the student computes (the STE windows only matter in training)
    left = sorted(k for k in state if k not in taken and not k.endswith(TRAINING_ONLY))
    if left:
        raise BibertError(f"{weights_path} holds {left[0]}{f' (and {len(left) - 1} more)' if len(left) > 1 else ''}, "
                          "which the packed format has no place for: this bibert cannot pack the student exactly")
    for name, spec in table.items():
        if tensors[name].shape != spec.shape:
            raise BibertError(f"{weights_path}: {name} has shape {list(tensors[name].shape)}, but {CONFIG_NAME} "
                              f"implies {list(spec.shape)}")

    tok_dir = Path(tokenizer_dir) if tokenizer_dir else student_dir
    files = {name: (tok_dir / name).read_bytes() for name in TOKENIZER_FILES if (tok_dir / name).is_file()}
    if "tokenizer.json" not in files and "vocab.txt" not in files:
        raise BibertError(f"no tokenizer (tokenizer.json or vocab.txt) in {tok_dir}: copy the teacher's "
                          "tokenizer files there or pass --tokenizer DIR")
    if "tokenizer.json" in files:  # it holds the vocabulary too
        files.pop("vocab.txt", None)

    packed = PackedFile(hf_config, quantization, np.dtype(side).name, tensors, files, quant.format_version)
    out = Path(out)
    write_packed(packed, out)
    return ExportReport(out, out.stat().st_size, weights_path.stat().st_size)


def score_count_minima(margins, head_size: int) -> np.ndarray:
    """The integer form of relative Bi-Attention (attention "bi-max", docs/method.md §7) with
    per-head margins m_h: for each head and each count c_max a row's best real key can have,
    the smallest count c = q . k that the student attends to, int32 [heads, d + 1] (column j
    for c_max = 2j - d; d + 2 where the row attends to nothing). The student's scores are a
    float function of the counts, so the table is not derived algebraically: it is what the
    student's own operations compute, in float32: the scores c / sqrt(d) + key mask (q @ k^T
    of +-1 values is the integer c exactly), then its ScoreBinarizer, for one row per c_max
    whose keys take every count, those above c_max as padded keys. A margin under which the
    student would attend to a padded key (the engine never does) is refused."""
    import math

    import torch

    from ..modeling import MASK_VALUE, ScoreBinarizer

    margins = torch.as_tensor(margins, dtype=torch.float32).reshape(-1)
    heads, d = margins.numel(), int(head_size)
    counts = torch.arange(-d, d + 1, 2)  # every q . k of d signs, ascending; row r has c_max = counts[r]
    binarizer = ScoreBinarizer(heads, relative=True).eval()
    table = np.full((heads, d + 1), d + 2, dtype=np.int32)
    block = max(1, (1 << 22) // (heads * (d + 1)))  # rows at a time
    with torch.no_grad():
        binarizer.threshold.copy_(margins)
        for r0 in range(0, d + 1, block):
            rows = counts[r0:r0 + block]
            real = counts[None, :] <= rows[:, None]  # [rows, keys]: a row's keys up to its best
            mask = (1.0 - real.float()) * MASK_VALUE  # the student's additive key mask
            scores = counts.float()[None, None, None, :] / math.sqrt(d) + mask[None, None]  # (1, heads, rows, keys)
            attended = (binarizer(scores.expand(1, heads, -1, -1).contiguous())[0] > 0.5).numpy()
            padded = attended & ~real.numpy()
            if padded.any():
                h = int(np.flatnonzero(padded.any(axis=(1, 2)))[0])
                raise BibertError(f"the margin {float(margins[h])!r} of head {h} makes the student attend to padded "
                                  f"keys (its key mask is {MASK_VALUE}); the packed engine never does")
            # keys in ascending count: a row must attend to every key from its lowest to its best
            some, lowest, n = attended.any(-1), attended.argmax(-1), attended.sum(-1)  # (heads, rows)
            if np.any(some & (n != np.arange(r0, r0 + len(rows))[None, :] - lowest + 1)):
                raise BibertError("the student's choice of keys is not a threshold on the count")
            table[:, r0:r0 + len(rows)] = np.where(some, counts.numpy()[lowest], d + 2)
    return table
