"""The runtime without torch: a packed model's tokenizer built with `tokenizers` alone gives
exactly transformers' ids, masks, token types and truncation (on the offline teacher's
tokenizer over real corpus rows, pairs included, and on hand-made tokenizer files), and the
packed commands, scoring a labelled file with a packed model included, run where torch and
transformers cannot be imported (a blocker on PYTHONPATH, and a venv that holds only the
runtime's packages)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import venv
from pathlib import Path

import numpy as np
import pytest

from bibert import BibertError
from bibert.packed import export_packed, load_packed
from bibert.packed.format import TOKENIZER_FILES
from bibert.packed.tokenizer import PackedTokenizer, build_tokenizer
from test_packed import WORDS, make_student

BLOCKED = ("torch", "transformers")
REPO = Path(__file__).resolve().parents[1]


def folder_files(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in TOKENIZER_FILES if (folder / name).exists()}


def transformers_tokenizer(files: dict[str, bytes]):
    """transformers' tokenizer of the same files (what the engine used before)."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        for name, raw in files.items():
            Path(tmp, name).write_bytes(raw)
        Path(tmp, "config.json").write_text(json.dumps({"model_type": "bert"}))
        return AutoTokenizer.from_pretrained(tmp, local_files_only=True)


def assert_same_encodings(files, texts, pairs=None, lengths=(8, 32, 128)):
    ref, mine = transformers_tokenizer(files), build_tokenizer(files, {})
    assert mine.num_special_tokens_to_add(False) == ref.num_special_tokens_to_add(False)
    assert mine.num_special_tokens_to_add(True) == ref.num_special_tokens_to_add(True)
    for max_length in lengths:
        for second in (None, pairs):
            for s in range(0, len(texts), 64):  # batches, as the engine tokenizes
                a, b = texts[s:s + 64], None if second is None else second[s:s + 64]
                want = ref(a, b, truncation=True, max_length=max_length, padding=True, return_tensors="np")
                got = mine(a, b, truncation=True, max_length=max_length, padding=True, return_tensors="np")
                assert set(got) == set(want)
                for key in want:
                    np.testing.assert_array_equal(got[key], want[key], err_msg=f"{key}, max_length {max_length}")


def corpus_rows(task: str, n: int):
    from bibert.data import load_examples

    try:
        examples = load_examples(task, "dev")
    except BibertError as exc:
        pytest.skip(f"the {task} corpus is not available offline: {exc}")
    step = max(1, len(examples) // n)
    return examples[::step][:n]


def test_tokenizer_matches_transformers_on_corpus_rows(teacher_dir):
    """The offline teacher's tokenizer (tokenizer.json and its settings, as a packed model
    stores them) on Rotten Tomatoes reviews and SNLI pairs: the same ids, types and masks,
    at lengths that truncate singles and pairs."""
    files = folder_files(Path(teacher_dir))
    reviews = [ex.text_a for ex in corpus_rows("rotten_tomatoes", 300)]
    snli = corpus_rows("snli", 300)
    texts = reviews + [ex.text_a for ex in snli]
    pairs = [ex.text_b or "" for ex in snli] + reviews  # long second segments too
    texts += ["", "  ", "café naïve façade — 日本語のテキスト 🎬", "a [SEP] b [CLS] [PAD] [mask]", "x" * 300, "\u0000\ufffd\u200b"]
    pairs += ["", "only a pair", "", "[SEP]", "short", "y " * 200]
    assert_same_encodings(files, texts, pairs)


@pytest.mark.parametrize("variant", ["vocab-only", "json-only", "cased", "extra-tokens", "legacy-added", "distilbert"])
def test_tokenizer_matches_transformers_on_variants(teacher_dir, variant):
    """Settings a packed model may carry: a vocab.txt alone, tokenizer.json alone, cased with
    accents stripped, extra special tokens and left padding and truncation, a legacy
    added_tokens.json, and DistilBERT's class (no token types)."""
    files = folder_files(Path(teacher_dir))
    settings = json.loads(files["tokenizer_config.json"])
    if variant == "vocab-only":
        files = {"vocab.txt": files["vocab.txt"]}
    elif variant == "json-only":
        files = {"tokenizer.json": files["tokenizer.json"]}
    elif variant == "cased":
        settings.update(do_lower_case=False, strip_accents=True, tokenize_chinese_chars=False)
    elif variant == "extra-tokens":
        settings.update(additional_special_tokens=["<ent>", "[X]"], padding_side="left", truncation_side="left")
    elif variant == "legacy-added":
        files["added_tokens.json"] = b'{"zzz": 99999, "[MASK]": 103}'
    elif variant == "distilbert":
        settings["tokenizer_class"] = "DistilBertTokenizer"
    if "tokenizer_config.json" in files:
        files["tokenizer_config.json"] = json.dumps(settings).encode()
    texts = ["Hello World, a <ent> and [X] here", "Café NAÏVE zzz 中文字", "", "a much longer text " * 10]
    pairs = ["second", "zzz [SEP]", "x", "y " * 30]
    assert_same_encodings(files, texts, pairs, lengths=(6, 16, 64))


def test_packed_model_tokenizer_needs_no_transformers(tmp_path):
    """A packed model's tokenizer is the tokenizers-only one, for the word-level vocabulary of
    the test students too, and equal to transformers' on it."""
    student, folder = make_student(tmp_path)
    out = tmp_path / "m.bibert"
    export_packed(folder, out)
    model = load_packed(out)
    assert isinstance(model.tokenizer, PackedTokenizer)
    assert_same_encodings(model._files, ["w1 w2 W3 w4", "w5", "", "zz w1"], ["w2", "w3 w4 w5 w6 w7 w8 w9", "w0", ""],
                          lengths=(4, 8, 32))


# ---- the packed commands where torch and transformers cannot be imported -------------------


@pytest.fixture(scope="module")
def packed_file(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runtime")
    _, folder = make_student(tmp)
    out = tmp / "tiny.bibert"
    export_packed(folder, out)
    return out


def blocker(folder: Path) -> Path:
    """A folder whose torch.py and transformers.py fail to import, as if not installed."""
    folder.mkdir(exist_ok=True)
    for name in BLOCKED:
        (folder / f"{name}.py").write_text(f"raise ModuleNotFoundError(\"No module named '{name}'\", name={name!r})\n")
    return folder


def run_cli(python: str, *args: str, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([python, "-m", "bibert.cli", *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=120)


def check_runtime(python: str, env: dict, model: Path, tmp: Path) -> None:
    """predict (texts, pairs, --file), summary, data info and evaluate of a labelled file, a
    refused bad file and a training command, in the interpreter `python` with environment
    `env`."""
    probe = subprocess.run([python, "-c", "import torch"], capture_output=True, text=True, env=env)
    assert probe.returncode != 0, "torch is importable: the check would prove nothing"
    r = run_cli(python, "predict", "--model", str(model), "w1 w2 w3", env=env, cwd=tmp)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("LABEL_") and len(r.stdout.splitlines()) == 1
    r = run_cli(python, "predict", "--model", str(model), "w1", "w2", "--pair", "w3", "--pair", "w4", "--json",
                env=env, cwd=tmp)
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)) == 2
    (tmp / "in.csv").write_text("text\nw1 w2\nw3\n")
    r = run_cli(python, "predict", "--model", str(model), "--file", str(tmp / "in.csv"), "--text-column", "text",
                "--out", str(tmp / "out.csv"), "--no-progress", env=env, cwd=tmp)
    assert r.returncode == 0, r.stderr
    assert (tmp / "out.csv").read_text().count("\n") == 3
    r = run_cli(python, "summary", str(model), env=env, cwd=tmp)
    assert r.returncode == 0 and "quantized parameters" in r.stdout, r.stderr
    (tmp / "labelled.csv").write_text("text,label\nw1 w2,LABEL_0\nw3,LABEL_1\nw4 w5,LABEL_2\nw6,LABEL_0\n")
    r = run_cli(python, "data", "info", "--file", str(tmp / "labelled.csv"), env=env, cwd=tmp)
    assert r.returncode == 0 and "LABEL_0 2 (50.0%)" in r.stdout, r.stderr
    r = run_cli(python, "evaluate", "--model", str(model), "--file", str(tmp / "labelled.csv"),
                "--out", str(tmp / "eval.json"), env=env, cwd=tmp)
    assert r.returncode == 0, r.stderr
    assert set(json.loads((tmp / "eval.json").read_text())["metrics"]["dev"]) == {"accuracy", "f1"}
    bad = tmp / "bad.bibert"
    bad.write_bytes(b"not a model at all")
    start = time.perf_counter()
    r = run_cli(python, "predict", "--model", str(bad), "text", env=env, cwd=tmp)
    assert time.perf_counter() - start < 30  # a refusal is quick (benchmarks/startup.py times it)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "is not a valid bibert file" in r.stderr, r.stderr
    r = run_cli(python, "distill", "--teacher", "x", "--task", "sst2", "--out", str(tmp / "run"), env=env, cwd=tmp)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "pip install 'bibert[train]'" in r.stderr and not (tmp / "run").exists()


def test_packed_commands_run_with_torch_and_transformers_blocked(packed_file, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(blocker(tmp_path / "block")), "BIBERT_THREADS": "1"}
    check_runtime(sys.executable, env, packed_file, tmp_path)
    code = ("import sys, bibert; m = bibert.load_packed(sys.argv[1]); m.predict(['w1']); "
            "print(sorted(k for k in sys.modules if k.split('.')[0] in ('torch', 'transformers', 'sklearn', "
            "'scipy', 'safetensors', 'matplotlib')))")
    r = subprocess.run([sys.executable, "-c", code, str(packed_file)], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr


WATCHED = BLOCKED + ("sklearn", "scipy")  # the training stack the runtime install does not have

# runs `bibert ...` in this process, recording every attempt to import a WATCHED module (a failed
# attempt too: the blocker makes `import torch` fail, and a caught ImportError would go unseen)
WATCH_CODE = """import sys
attempts = []
class Watch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in %r:
            attempts.append(name)
        return None
sys.meta_path.insert(0, Watch())
from bibert.cli import main
code = main(sys.argv[1:])
print("IMPORT ATTEMPTS", sorted(set(attempts)))
sys.exit(code)
""" % (WATCHED,)


def labelled_rows(model, n: int = 60, seed: int = 0) -> tuple[list[str], list[str]]:
    """n texts of the students' vocabulary and gold labels that agree with the model on about
    two thirds of them (every label occurs)."""
    rng = np.random.default_rng(seed)
    texts = [" ".join(rng.choice(WORDS, int(rng.integers(1, 9)))) for _ in range(n)]
    predicted = model.predict(texts).labels
    gold = [label if rng.random() < 0.65 else str(rng.choice(model.labels)) for label in predicted]
    gold[:len(model.labels)] = model.labels
    return texts, gold


def test_evaluate_packed_model_with_torch_and_transformers_blocked(packed_file, tmp_path):
    """`bibert evaluate --model M.bibert --file data.csv` where torch and transformers cannot be
    imported: the metrics it writes are those of the model's own predictions on the file's
    rows (accuracy and macro F1 counted here from the labels), and it never tried to import
    torch, transformers, scikit-learn or scipy."""
    model = load_packed(packed_file)
    texts, gold = labelled_rows(model)
    data = tmp_path / "labelled.csv"
    data.write_text("text,label\n" + "".join(f"{t},{g}\n" for t, g in zip(texts, gold)))
    out = tmp_path / "metrics.json"
    env = {**os.environ, "PYTHONPATH": str(blocker(tmp_path / "block")), "BIBERT_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", WATCH_CODE, "evaluate", "--model", str(packed_file), "--file", str(data),
                        "--out", str(out), "--batch-size", "7"], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "IMPORT ATTEMPTS []" in r.stdout, r.stdout
    written = json.loads(out.read_text())
    assert written["model"] == str(packed_file) and written["source"]["file"] == str(data)
    (metrics,) = written["metrics"].values()

    predicted = model.predict(texts).labels
    accuracy = sum(p == g for p, g in zip(predicted, gold)) / len(gold)
    f1 = []
    for label in model.labels:
        tp = sum(p == g == label for p, g in zip(predicted, gold))
        wrong = sum((p == label) != (g == label) for p, g in zip(predicted, gold))
        f1.append(2 * tp / (2 * tp + wrong) if tp + wrong else 0.0)
    assert 0 < accuracy < 1
    assert metrics == pytest.approx({"accuracy": accuracy, "f1": sum(f1) / len(f1)}, rel=1e-12)
    assert f"accuracy {100 * accuracy:.2f}" in r.stdout


RUNTIME_PACKAGES = ("numpy", "numpy.libs", "tokenizers", "tqdm", "pyarrow", "pyarrow.libs")


def test_packed_commands_run_in_a_venv_without_torch(packed_file, tmp_path):
    """A fresh venv (no system site-packages) holding only the runtime's packages, linked from
    this environment's, and bibert's sources: no torch or transformers exist there at all."""
    import numpy

    site = Path(numpy.__file__).resolve().parents[1]
    root = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False, symlinks=True).create(root)
    python = root / "bin" / "python"
    target = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 capture_output=True, text=True, check=True).stdout.strip())
    for name in RUNTIME_PACKAGES:
        if (site / name).exists():
            (target / name).symlink_to(site / name)
    import bibert

    (target / "bibert_src.pth").write_text(str(Path(bibert.__file__).resolve().parents[1]) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["BIBERT_THREADS"] = "1"
    check_runtime(str(python), env, packed_file, tmp_path)
