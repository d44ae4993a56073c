import bz2
import csv
import io
import sys
import types
from pathlib import Path

import pytest
import torch
from transformers import BertTokenizer

from bibert.cli import main
from bibert.batches import build_dataset, collate_batch, make_dataloader
from bibert.data import Example, infer_custom_task, label_counts, load_examples
from bibert.errors import BibertError
from bibert.fetch import cache_dir
from bibert.tasks import get_task

GLUE = Path(__file__).parent / "fixtures" / "glue"

# (task, folder, split) -> (count, first text_a, first text_b, first label)
EXPECTED = {
    ("cola", "train"): (4, "Our friends won't buy this analysis, let alone the next one we propose.", None, 1),
    ("cola", "dev"): (3, "The sailors rode the breeze clear of the rocks.", None, 1),
    ("cola", "test"): (2, "Bill whistled past the house.", None, None),
    ("sst2", "train"): (3, "hide new secretions from the parental units ", None, 0),
    ("sst2", "dev"): (2, "it 's a charming and often affecting journey . ", None, 1),
    ("sst2", "test"): (2, "uneasy mishmash of styles and genres .", None, None),
    ("mrpc", "train"): (3, 'Amrozi accused his brother , whom he called " the witness " , of deliberately '
                           'distorting his evidence .', 'Referring to him as only " the witness " , Amrozi '
                           'accused his brother of deliberately distorting his evidence .', 1),
    ("mrpc", "dev"): (2, "He said the foodservice pie business doesn 't fit the company 's long-term growth "
                         "strategy .", '" The foodservice pie business does not fit our long-term growth '
                         'strategy .', 1),
    ("mrpc", "test"): (1, "PCCW 's chief operating officer , Mike Butcher , and Alex Arena , the chief "
                          "financial officer , will report directly to Mr So .", "Current Chief Operating "
                          "Officer Mike Butcher and Group Chief Financial Officer Alex Arena will report to So .",
                       None),
    ("stsb", "train"): (3, "A plane is taking off.", "An air plane is taking off.", 5.0),
    ("stsb", "dev"): (3, "A man with a hard hat is dancing.", "A man wearing a hard hat is dancing.", 5.0),
    ("stsb", "test"): (1, "A girl is styling her hair.", "A girl is brushing her hair.", None),
    ("qqp", "train"): (3, "How is the life of a math student? Could you describe your own experiences?",
                       "Which level of prepration is enough for the exam jlpt5?", 0),
    ("qqp", "dev"): (3, "Why are African-Americans so beautiful?", "Why are hispanics so beautiful?", 0),
    ("qqp", "test"): (1, "How does the Surface Pro himself 4 compare with iPad Pro?",
                      "Why did Microsoft choose core m3 and not core i3 home Surface Pro 4?", None),
    ("mnli", "train"): (9, "Conceptually cream skimming has two basic dimensions - product and geography.",
                        "Product and geography are what make cream skimming work. ", 1),
    ("mnli", "dev_matched"): (2, "The new rights are nice enough", "Everyone really likes the newest benefits ", 1),
    ("mnli", "dev_mismatched"): (2, "Your contribution helped make it possible for us to provide our students "
                                    "with a quality education.", "Your contributions were of no help with our "
                                    "students' education.", 2),
    ("mnli", "test_matched"): (1, "Hierbas, ans seco, ans dulce, and frigola are just a few names worth keeping "
                                  "a look-out for.", "Hierbas is a name worth looking out for.", None),
    ("mnli", "test_mismatched"): (1, "What have you decided, what are you going to do?", "So what's your decision?",
                                  None),
    ("qnli", "train"): (3, "When did the third Digimon series begin?", None, 1),
    ("qnli", "dev"): (2, "What came into force after the new constitution was herald?",
                      "As of that day, the new constitution heralding the Second Republic came into force.", 0),
    ("qnli", "test"): (1, "What organization is devoted to Jihad against Israel?", None, None),
    ("rte", "train"): (2, "No Weapons of Mass Destruction Found in Iraq Yet.",
                       "Weapons of Mass Destruction Found in Iraq.", 1),
    ("rte", "dev"): (2, "Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at age 44, "
                        "according to the Christopher Reeve Foundation.", "Christopher Reeve had an accident.", 1),
    ("rte", "test"): (1, "Mangla was summoned after Madhumita's sister Nidhi Shukla, who was the first witness in "
                         "the case, told the court that she had heard Mangla and Madhumita quarrelling.",
                      "Shukla is related to Mangla.", None),
    ("wnli", "train"): (4, "I stuck a pin through a carrot. When I pulled the pin out, it had a hole.",
                        "The carrot had a hole.", 1),
    ("wnli", "dev"): (2, "The drain is clogged with hair. It has to be cleaned.", "The hair has to be cleaned.", 0),
    ("wnli", "test"): (1, "Maude and Dora had seen the trains rushing across the prairie, with long, rolling "
                          "puffs of black smoke streaming back from the engine. Their roars and their wild, clear "
                          "whistles could be heard from far away. Horses ran away when they came in sight.",
                       "Horses ran away when Maude and Dora came in sight.", None),
}


@pytest.mark.parametrize("task_name,split", sorted(EXPECTED))
def test_glue_tsv_parsing(task_name, split):
    task = get_task(task_name)
    examples = load_examples(task, split, data_dir=GLUE / task.glue_dir)
    count, text_a, text_b, label = EXPECTED[task_name, split]
    assert len(examples) == count
    first = examples[0]
    assert first.text_a == text_a
    if text_b is not None or not task.is_pair:
        assert first.text_b == text_b
    assert first.label == label
    if split.startswith("test"):
        assert all(ex.label is None for ex in examples)
    else:
        assert all(ex.label is not None for ex in examples)


def test_every_glue_task_and_split_has_a_fixture():
    for task_name in ["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"]:
        for split in get_task(task_name).splits:
            assert (task_name, split) in EXPECTED


def test_label_sets_seen_in_fixtures():
    assert [ex.label for ex in load_examples("cola", "train", data_dir=GLUE / "CoLA")] == [1, 1, 0, 1]
    mnli = load_examples("mnli", "train", data_dir=GLUE / "MNLI")
    assert sorted({ex.label for ex in mnli}) == [0, 1, 2]
    assert [ex.label for ex in load_examples("stsb", "dev", data_dir=GLUE / "STS-B")] == [5.0, 4.75, 0.5]


def test_qqp_rows_with_missing_fields_are_skipped(capsys):
    examples = load_examples("qqp", "train", data_dir=GLUE / "QQP")
    assert [ex.label for ex in examples] == [0, 1, 0]
    assert "skipped 1 rows" in capsys.readouterr().err


def test_glue_root_folder_is_accepted():
    assert len(load_examples("rte", "dev", data_dir=GLUE)) == 2


# ------------------------------------------------------------------------- bad input

def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def test_missing_column(tmp_path):
    _write(tmp_path / "train.tsv", "text\tlabel\nhello\t1\n")
    with pytest.raises(BibertError, match=r"train.tsv: missing column 'sentence' \(columns: text, label\)"):
        load_examples("sst2", "train", data_dir=tmp_path)


def test_unknown_label_names_file_and_line(tmp_path):
    _write(tmp_path / "dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\tmaybe\n")
    with pytest.raises(BibertError, match=r"dev.tsv line 3: unknown label 'maybe' for rte "
                                          r"\(expected one of: entailment, not_entailment\)"):
        load_examples("rte", "dev", data_dir=tmp_path)


def test_empty_file(tmp_path):
    _write(tmp_path / "train.tsv", "")
    with pytest.raises(BibertError, match="train.tsv is empty"):
        load_examples("sst2", "train", data_dir=tmp_path)


def test_header_only_file_has_no_examples(tmp_path):
    _write(tmp_path / "train.tsv", "sentence\tlabel\n")
    with pytest.raises(BibertError, match="has no examples"):
        load_examples("sst2", "train", data_dir=tmp_path)


def test_malformed_row(tmp_path):
    _write(tmp_path / "train.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\t1\n1\tonly one field\n")
    with pytest.raises(BibertError, match=r"train.tsv line 3: malformed row, expected at least 4"):
        load_examples("wnli", "train", data_dir=tmp_path)


def test_not_utf8(tmp_path):
    _write(tmp_path / "train.tsv", "sentence\tlabel\n".encode() + "caf\u00e9\t1\n".encode("latin-1"))
    with pytest.raises(BibertError, match=r"train.tsv line 2 is not UTF-8"):
        load_examples("sst2", "train", data_dir=tmp_path)


def test_missing_file_and_unknown_split(tmp_path):
    with pytest.raises(BibertError, match="file not found: .*dev.tsv .*glue_data/SST-2"):
        load_examples("sst2", "dev", data_dir=tmp_path)
    with pytest.raises(BibertError, match="no split 'dev'; valid: train, dev_matched"):
        load_examples("mnli", "dev", data_dir=GLUE / "MNLI")


def test_regression_label_must_be_a_number(tmp_path):
    _write(tmp_path / "f.csv", "sentence1,sentence2,label\na,b,high\n")
    with pytest.raises(BibertError, match="line 2: label 'high' is not a number"):
        load_examples("stsb", "train", file=tmp_path / "f.csv")


def test_cli_prints_one_line_and_exits_2(tmp_path, capsys):
    _write(tmp_path / "train.tsv", "sentence\tlabel\nok\t7\n")
    assert main(["data", "info", "sst2", "--data-dir", str(tmp_path), "--split", "train"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bibert data: error: file") and "unknown label '7'" in err and "Traceback" not in err
    assert main(["data", "info", "nope"]) == 2
    assert "valid tasks: cola" in capsys.readouterr().err


# ------------------------------------------------------------------------- user files

def test_user_csv_with_label_names(tmp_path):
    path = _write(tmp_path / "reviews.csv", 'review,verdict\n"great, really",fresh\nbad,rotten\n')
    examples = load_examples("rotten_tomatoes", "train", file=path, text_column="review", label_column="verdict")
    assert examples == [Example("great, really", None, 1), Example("bad", None, 0)]


def test_user_jsonl_and_tsv_pairs(tmp_path):
    path = _write(tmp_path / "nli.jsonl", '{"sentence1": "a", "sentence2": "b", "label": "neutral"}\n\n'
                                         '{"sentence1": "c", "sentence2": "d", "label": 2}\n')
    assert [ex.label for ex in load_examples("mnli", "train", file=path)] == [1, 2]
    tsv = _write(tmp_path / "p.tsv", "q\ts\ty\nwho?\tme.\t0.5\n")
    assert load_examples("stsb", "dev", file=tsv, text_column="q", pair_column="s", label_column="y") == \
        [Example("who?", "me.", 0.5)]


def test_user_file_errors(tmp_path):
    bad_json = _write(tmp_path / "x.jsonl", '{"sentence": "a", "label": 1}\n{"sentence": \n')
    with pytest.raises(BibertError, match="x.jsonl line 2: malformed JSON"):
        load_examples("sst2", "train", file=bad_json)
    ragged = _write(tmp_path / "x.csv", "sentence,label\na,1\nb,1,extra\n")
    with pytest.raises(BibertError, match="x.csv line 3: malformed row, expected 2 fields, found 3"):
        load_examples("sst2", "train", file=ragged)
    no_label = _write(tmp_path / "y.csv", "sentence\nhello\n")
    with pytest.raises(BibertError, match="missing column 'label'"):
        load_examples("sst2", "train", file=no_label)
    assert load_examples("sst2", "test", file=no_label) == [Example("hello", None, None)]
    with pytest.raises(BibertError, match="unsupported format '.txt'"):
        load_examples("sst2", "train", file=_write(tmp_path / "z.txt", "x"))


def test_custom_task_from_file(tmp_path):
    path = _write(tmp_path / "topics.csv", "body,topic\nball game,sport\nnew chip,tech\nrace,sport\n")
    task = infer_custom_task(path, name="topics", text_column="body", label_column="topic")
    assert task.label_list == ("sport", "tech") and not task.is_pair
    examples = load_examples(task, "train", file=path, text_column="body", label_column="topic")
    assert label_counts(task, examples) == {"sport": 2, "tech": 1}


# ------------------------------------------------------------------------- features

@pytest.fixture
def tokenizer(tmp_path):
    words = "[PAD] [UNK] [CLS] [SEP] [MASK] a plane is taking off . an air man the".split()
    return BertTokenizer(vocab={w: i for i, w in enumerate(words)})


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BIBERT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_build_dataset_tokenizes_truncates_and_caches(tokenizer, cache, monkeypatch):
    task = get_task("stsb")
    examples = load_examples(task, "train", data_dir=GLUE / "STS-B")
    ds = build_dataset(examples, tokenizer, 8, task)
    assert len(ds) == 3 and ds.has_labels
    item = ds[0]
    assert len(item["input_ids"]) == 8 and item["input_ids"][0] == tokenizer.cls_token_id
    assert item["token_type_ids"].tolist().count(1) > 0 and item["labels"] == 5.0
    files = list((cache / "features").glob("*.npz"))
    assert len(files) == 1

    def boom(*a, **k):
        raise AssertionError("tokenizer called although the features are cached")
    monkeypatch.setattr(type(tokenizer), "__call__", boom)
    again = build_dataset(examples, tokenizer, 8, task)
    assert [again[i]["input_ids"].tolist() for i in range(3)] == [ds[i]["input_ids"].tolist() for i in range(3)]
    monkeypatch.undo()
    monkeypatch.setenv("BIBERT_CACHE", str(cache))
    build_dataset(examples[:2], tokenizer, 8, task)  # other content: another cache file
    build_dataset(examples, tokenizer, 16, task)  # other max length: another cache file
    assert len(list((cache / "features").glob("*.npz"))) == 3


def test_collate_pads_and_masks(tokenizer, cache):
    task = get_task("sst2")
    ds = build_dataset([Example("a plane", None, 1), Example("a man is taking off .", None, 0)],
                       tokenizer, 64, task)
    batch = collate_batch([ds[0], ds[1]], pad_token_id=tokenizer.pad_token_id)
    assert batch["input_ids"].shape == (2, 8) and batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0, 0, 0], [1] * 8]
    assert batch["input_ids"][0, 4:].tolist() == [tokenizer.pad_token_id] * 4
    assert batch["labels"].tolist() == [1, 0] and batch["labels"].dtype == torch.long
    unlabeled = build_dataset([Example("a plane", None, None)], tokenizer, 64, task)
    assert not unlabeled.has_labels and "labels" not in collate_batch([unlabeled[0]])
    reg = build_dataset([Example("a", "b", 0.5)], tokenizer, 64, get_task("stsb"))
    assert collate_batch([reg[0]])["labels"].dtype == torch.float32


def test_dataloader_shuffle_is_seeded(tokenizer, cache):
    ds = build_dataset([Example("a " * i, None, i % 2) for i in range(1, 21)], tokenizer, 32, get_task("sst2"))

    def order(seed):
        return [int(b["attention_mask"].sum(1)[0]) for b in make_dataloader(ds, 1, shuffle=True, seed=seed)]
    assert order(3) == order(3) and order(3) != order(4)
    plain = [b["input_ids"].shape for b in make_dataloader(ds, 8)]
    assert plain[0] == (8, 10) and plain[-1] == (4, 22)


# ------------------------------------------------------------------------- Hugging Face datasets

def test_hf_datasets_source(monkeypatch):
    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return [{"premise": "p", "hypothesis": "h", "label": 2}, {"premise": "q", "hypothesis": "i", "label": -1}]
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    examples = load_examples("mnli", "dev_mismatched")
    assert calls == [("glue", "mnli", "validation_mismatched")]
    assert examples == [Example("p", "h", 2), Example("q", "i", None)]


def test_no_source_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    with pytest.raises(BibertError, match="pass --data-dir glue_data/CoLA"):
        load_examples("cola", "train")


# ------------------------------------------------------------------------- offline corpora (real data)

def _movie_of_text():
    raw = bz2.decompress((cache_dir() / "rotten_tomatoes" / "rotten_tomatoes_corpus_full.csv.bz2").read_bytes())
    movies = {}
    for row in csv.DictReader(io.StringIO(raw.decode("utf-8"))):
        if row["category"] != "plot":
            movies.setdefault(row["text"], row["movie_name"])
    return movies


def test_rotten_tomatoes_splits():
    task = get_task("rotten_tomatoes")
    splits = {s: load_examples(task, s) for s in task.splits}
    assert {s: len(v) for s, v in splits.items()} == {"train": 10613, "dev": 1138, "test": 1001}
    assert label_counts(task, splits["train"]) == {"rotten": 4543, "fresh": 6070}
    assert label_counts(task, splits["dev"]) == {"rotten": 445, "fresh": 693}
    assert label_counts(task, splits["test"]) == {"rotten": 396, "fresh": 605}
    texts = [ex.text_a for v in splits.values() for ex in v]
    assert len(texts) == len(set(texts)) == 12752  # 12,808 reviews less 56 repeated texts
    movie = _movie_of_text()
    movies = {s: {movie[ex.text_a] for ex in v} for s, v in splits.items()}
    assert not movies["train"] & movies["dev"] and not movies["train"] & movies["test"]
    assert not movies["dev"] & movies["test"]


def test_snli_splits():
    task = get_task("snli")
    splits = {s: load_examples(task, s) for s in task.splits}
    assert {s: len(v) for s, v in splits.items()} == {"train": 94772, "dev": 5000, "test": 9824}
    assert label_counts(task, splits["dev"]) == {"entailment": 1710, "neutral": 1645, "contradiction": 1645}
    assert label_counts(task, splits["test"]) == {"entailment": 3368, "neutral": 3219, "contradiction": 3237}
    pairs = {s: {(ex.text_a, ex.text_b) for ex in v} for s, v in splits.items()}
    assert sum(map(len, pairs.values())) == sum(map(len, splits.values()))  # no pair twice
    assert all(ex.label in (0, 1, 2) for v in splits.values() for ex in v)
    assert load_examples(task, "dev") == splits["dev"]  # deterministic
