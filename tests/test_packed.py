"""The packed format and engine: export round trip, layer-by-layer exactness against the
student, end-to-end agreement, both dispatch paths, bad files and bad inputs, the CLI."""
from __future__ import annotations

import json
import os
import shutil
import struct

import numpy as np
import pytest
import torch
from transformers import BertConfig

from bibert import BibertError
from bibert.cli import main as cli_main
from bibert.modeling import BiBertForSequenceClassification
from bibert.packed import export_packed, kernels, load_packed, read_packed, reference
from bibert.packed.format import PACKED_FORMAT_VERSION, PackedFile, pack_bool
from bibert.packed.writer import write_packed
from packed_util import SPECIAL_TOKENS, assert_same_outputs, randomize, save_with_tokenizer
from bibert.quantizers import weight_scale_and_signs

PATHS = kernels.available_kernels()  # portable, plus avx2 / avx512 where this CPU has them
WORDS = ["the", "movie", "was", "good", "bad", "great", "boring", "a", "plot", "film", "not", "very", "and",
         "is", "it", "fun", "dull", "acting", "story", "ending"]


def make_student(tmp_path, hidden=24, heads=3, ffn=40, layers=2, labels=3, seed=0, std=0.5):
    """A random 1-1-1 student folder with a small word-level tokenizer beside it."""
    vocab = SPECIAL_TOKENS + WORDS
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=ffn, max_position_embeddings=32,
                        num_labels=labels)
    torch.manual_seed(seed)
    student = BiBertForSequenceClassification(config).eval()
    randomize(student, std)
    return student, save_with_tokenizer(student, tmp_path / f"student_{hidden}_{heads}", vocab)


def batch(vocab, B=3, T=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (B, T), generator=g)
    ids[:, 0] = 2
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    types = torch.zeros_like(ids)
    types[:, T // 2:] = 1
    return ids, mask, types


SHAPES = [dict(hidden=24, heads=3, ffn=40), dict(hidden=130, heads=2, ffn=200), dict(hidden=128, heads=2, ffn=256)]


@pytest.fixture(scope="module", params=range(len(SHAPES)), ids=["h24x3", "h130x2", "h128x2"])
def exported(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("packed")
    student, folder = make_student(tmp, **SHAPES[request.param])
    out = tmp / "model.bibert"
    report = export_packed(folder, out)
    return student, folder, out, report



def test_export_round_trip(exported):
    student, folder, out, report = exported
    packed = read_packed(out)
    assert packed.format_version == 1 and packed.side_dtype == "float32"  # a sign student needs version 1
    assert packed.config["hidden_size"] == student.config.hidden_size
    assert set(packed.files) >= {"vocab.txt", "tokenizer_config.json"}
    state = student.state_dict()
    for name in ["bert.embeddings.word_embeddings", "bert.encoder.layer.1.intermediate.dense", "bert.pooler.dense"]:
        alpha, signs = weight_scale_and_signs(state[name + ".weight"])
        np.testing.assert_array_equal(packed.tensors[name + ".bits"], pack_bool(signs.numpy() < 0))
        np.testing.assert_array_equal(packed.tensors[name + ".alpha"], alpha.numpy())
    np.testing.assert_array_equal(packed.tensors["classifier.weight"], state["classifier.weight"].numpy())
    assert report.packed_bytes == out.stat().st_size and report.fp32_bytes > 0


def test_fp16_side_parameters(exported, tmp_path):
    student, folder, out, _ = exported
    half = export_packed(folder, tmp_path / "half.bibert", side_dtype="float16")
    assert half.packed_bytes < out.stat().st_size
    assert read_packed(half.path).tensors["classifier.bias"].dtype == np.float16
    # the engine computes in float32 from the stored float16 values: the same file with those
    # values widened to float32 gives bit-identical logits, close to the float32 file's
    p16 = read_packed(half.path)
    widened = PackedFile(p16.config, p16.quantization, "float32", files=p16.files, tensors={
        name: t.astype(np.float32) if t.dtype == np.float16 else t for name, t in p16.tensors.items()})
    write_packed(widened, tmp_path / "widened.bibert")
    ids, mask, types = batch(student.config.vocab_size)
    run = lambda path: load_packed(path).forward(ids.numpy(), mask.numpy(), types.numpy())  # noqa: E731
    logits16, logits32 = run(half.path), run(out)
    assert np.array_equal(logits16, run(tmp_path / "widened.bibert"))
    assert not np.array_equal(logits16, logits32)  # the rounding is real ...
    assert np.abs(logits16 - logits32).max() < 0.1 * np.abs(logits32).max()  # ... and small


def capture(student, ids, mask, types):
    """Inputs and outputs of the student's submodules, by forward hooks."""
    seen, hooks = {}, []
    for n, layer in enumerate(student.bert.encoder.layer):
        for name, mod in (("ctx", layer.attention.output.dense), ("pre", layer.intermediate.dense),
                          ("attn", layer.attention.output)):
            hooks.append(mod.register_forward_hook(
                lambda m, i, o, key=f"{name}{n}": seen.__setitem__(key, (i[0].detach(), o.detach()))))
    with torch.no_grad():
        out = student(ids, mask, types, output_hidden_states=True, output_qkv=True)
    for h in hooks:
        h.remove()
    return out, seen


def sign_bits(t: torch.Tensor) -> np.ndarray:
    a = t.detach().numpy()
    return pack_bool(a.reshape(-1, a.shape[-1]) < 0)


def assert_bits_equal(bits, values):
    """Bits equal the signs of `values` exactly (bit 1 <=> value < 0; 0 and -0.0 give +1)."""
    v = values.detach().numpy().reshape(-1, values.shape[-1])
    np.testing.assert_array_equal(kernels.unpack_bool(bits, v.shape[1]), v < 0)


def test_layer_by_layer_exact_against_student(exported, path):
    student, _, out, _ = exported
    check_layer_by_layer(student, load_packed(out), *batch(student.config.vocab_size))


def check_layer_by_layer(student, engine, ids, mask, types):
    """Each engine step fed the student's own inputs: bits and counts identical, floats
    equal to rounding."""
    H = engine.hidden
    res, seen = capture(student, ids, mask, types)
    B, L = ids.shape
    valid = mask.numpy().astype(bool)
    # embeddings
    x0, _ = engine._embeddings(ids.numpy(), types.numpy())
    np.testing.assert_allclose(x0, res.hidden_states[0].reshape(B * L, H).numpy(), rtol=1e-4, atol=1e-4)
    for n, layer in enumerate(engine._layers):
        x = res.hidden_states[n].reshape(B * L, H).numpy()
        q, k, v = (t.transpose(1, 2).reshape(B, L, H) for t in res.qkv[n])
        # Q, K, V bits from the student's input
        qkv = layer.qkv(kernels.sign_pack(x), out_bits=True)
        qkv_all = kernels.unpack_bool(qkv, 3 * H)
        for i, t in enumerate((q, k, v)):
            assert_bits_equal(kernels.pack_bool(qkv_all[:, i * H:(i + 1) * H]), t)
        # Bi-Attention from the student's Q, K, V signs: integer counts identical
        student_qkv = pack_bool(torch.cat([q, k, v], dim=2).reshape(B * L, 3 * H).numpy() < 0)
        ctx_bits, counts = kernels.biattention(student_qkv, (0, H, 2 * H), B, L, engine.heads, engine.head_size,
                                               valid, counts=True)
        ctx_student = seen[f"ctx{n}"][0].reshape(B * L, H).numpy()
        np.testing.assert_array_equal(counts, ctx_student.astype(np.int32))
        np.testing.assert_array_equal(ctx_bits, pack_bool(ctx_student < 0))
        # attention output: Linear on the context bits, + residual, LayerNorm
        a, _ = kernels.layernorm(layer.attn_out(ctx_bits, residual=x), *layer.ln1, engine._eps, with_bits=True)
        a_student = seen[f"attn{n}"][1].reshape(B * L, H)
        np.testing.assert_allclose(a, a_student.numpy(), rtol=1e-4, atol=1e-4)
        # FFN in -> bits of the pre-GELU value
        f = layer.ffn_in(sign_bits(a_student), out_bits=True)
        assert_bits_equal(f, seen[f"pre{n}"][1])
        # FFN out on the student's pre-GELU signs, + residual, LayerNorm
        out_n = kernels.layernorm(layer.ffn_out(sign_bits(seen[f"pre{n}"][1]), residual=a_student.numpy()),
                                  *layer.ln2, engine._eps)
        np.testing.assert_allclose(out_n, res.hidden_states[n + 1].reshape(B * L, H).numpy(), rtol=1e-4, atol=1e-4)
    logits = engine._head(res.hidden_states[-1][:, 0].numpy())
    np.testing.assert_allclose(logits, res.logits.numpy(), rtol=1e-4, atol=1e-4)


def test_numpy_reference_matches_student(exported):
    """The float64 NumPy reference of docs/method.md agrees with the student class (an independent check)."""
    student, folder, _, _ = exported
    ids, mask, types = batch(student.config.vocab_size)
    weights = {k: v.numpy() for k, v in student.state_dict().items()}
    ref = reference.student_forward(weights, student.config.to_dict(), ids.numpy(), mask.numpy(), types.numpy())
    res, seen = capture(student, ids, mask, types)
    np.testing.assert_allclose(ref["hidden"][0], res.hidden_states[0].numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(ref["context"][0], seen["ctx0"][0].numpy())


def test_end_to_end_agrees_with_student(exported, path):
    student, _, out, _ = exported
    engine = load_packed(out)
    ids, mask, types = batch(student.config.vocab_size, B=16, T=20, seed=3)
    mask[5:, 10:] = 0
    with torch.no_grad():
        expected = student(ids, mask, types).logits.numpy()
    got, hidden = engine.forward(ids.numpy(), mask.numpy(), types.numpy(), output_hidden_states=True)
    assert len(hidden) == student.config.num_hidden_layers + 1
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.9
    assert np.median(np.abs(got - expected)) < 1e-3


def test_dispatch_paths_identical(exported):
    if len(PATHS) < 2:
        pytest.skip("this CPU has only the portable path")
    student, _, out, _ = exported
    ids, mask, types = batch(student.config.vocab_size)
    results = []
    for name in PATHS:
        engine = load_packed(out, kernel=name)
        results.append(engine.forward(ids.numpy(), mask.numpy(), types.numpy(), output_hidden_states=True))
    kernels.set_kernel("auto")
    assert_same_outputs(results)


def test_padded_rows_are_skipped_and_change_nothing(exported):
    """forward computes only the tokens and each [CLS]: masks with padding, holes, an invalid
    first position or no token at all give the logits of the whole-rows step-by-step path."""
    student, _, out, _ = exported
    engine = load_packed(out)
    ids, _, types = batch(student.config.vocab_size, B=6, T=14, seed=5)
    mask = np.ones((6, 14), np.int64)
    mask[1, 9:] = 0          # right padding
    mask[2, 3:] = 0
    mask[3, [2, 5, 6, 11]] = 0  # holes
    mask[4, 0] = 0           # the first position not a token: computed, but never a key
    mask[5, :] = 0           # no token at all
    logits, hidden = engine.forward(ids.numpy(), mask, types.numpy(), output_hidden_states=True)
    x, xb = engine._embeddings(ids.numpy(), types.numpy())
    for n in range(engine.num_layers):
        x, xb = engine._encoder_layer(n, x, xb, mask.astype(bool))
    np.testing.assert_array_equal(logits, engine._head(x.reshape(6, 14, -1)[:, 0]))
    computed = mask.astype(bool)
    computed[:, 0] = True
    np.testing.assert_array_equal(hidden[-1][computed], x.reshape(6, 14, -1)[computed])
    assert not hidden[-1][~computed].any()
    with torch.no_grad():
        expected = student(ids, torch.from_numpy(mask), types).logits.numpy()
    assert (logits.argmax(1) == expected.argmax(1))[:5].all()


def test_forward_without_hidden_states_computes_the_last_layer_for_the_first_rows(exported):
    """Without hidden states only the pooler reads the last layer, which then computes each
    sequence's first row alone past its keys and values: the logits are the full forward's, bit
    for bit, padded or not, with every kernel family, 1 to 3 threads and any encoder blocking
    (several groups of sequences, one row a chunk)."""
    student, _, out, _ = exported
    ids, _, types = batch(student.config.vocab_size, B=6, T=14, seed=6)
    mask = np.ones((6, 14), np.int64)
    mask[1, 9:] = 0
    mask[3, [2, 5, 6, 11]] = 0
    mask[4, 0] = 0
    mask[5, 1:] = 0
    saved = kernels.get_encoder_tuning()
    try:
        for encoder_tuning in ((16, 512), (1, 1), (3, 40)):
            kernels.set_encoder_tuning(*encoder_tuning)
            for family in PATHS:
                for threads in (1, 2, 3):
                    engine = load_packed(out, kernel=family, threads=threads)
                    for m in (mask, np.ones_like(mask)):
                        full, _ = engine.forward(ids.numpy(), m, types.numpy(), output_hidden_states=True)
                        np.testing.assert_array_equal(engine.forward(ids.numpy(), m, types.numpy()), full)
    finally:
        kernels.set_encoder_tuning(*saved)
        kernels.set_kernel("auto")
        kernels.set_threads(kernels.default_threads())


def test_tuning_does_not_change_results(exported):
    """Every per-host tuning (tile walk, micro-tile rows, row chunks, encoder blocking) of every
    kernel family gives the same bits and floats."""
    student, _, out, _ = exported
    ids, mask, types = batch(student.config.vocab_size, B=7, T=20, seed=4)
    mask[3:, 12:] = 0
    saved = {f: kernels.get_tuning(f) for f in PATHS}, kernels.get_encoder_tuning()
    results = []
    try:
        for family in PATHS:
            for tuning, encoder_tuning in (((6, 16384, 0), (16, 512)), ((1, 64, 1), (1, 1)), ((4, 4096, 1), (3, 40)),
                                           ((5, 1 << 20, 0), (4096, 1 << 20))):
                kernels.set_tuning(family, *tuning)
                kernels.set_encoder_tuning(*encoder_tuning)
                for threads in (1, 2):
                    engine = load_packed(out, kernel=family, threads=threads)
                    results.append(engine.forward(ids.numpy(), mask.numpy(), types.numpy(), output_hidden_states=True))
    finally:
        for family, tuning in saved[0].items():
            kernels.set_tuning(family, *tuning)
        kernels.set_encoder_tuning(*saved[1])
        kernels.set_kernel("auto")
        kernels.set_threads(kernels.default_threads())
    assert_same_outputs(results)
    with pytest.raises(BibertError):
        kernels.set_tuning("avx512", 0, 16384, 0)
    with pytest.raises(BibertError):
        kernels.set_encoder_tuning(0, 512)


def test_threads_do_not_change_results(exported):
    student, _, out, _ = exported
    ids, mask, types = batch(student.config.vocab_size)
    one = load_packed(out, threads=1).forward(ids.numpy(), mask.numpy(), types.numpy())
    two = load_packed(out, threads=2).forward(ids.numpy(), mask.numpy(), types.numpy())
    np.testing.assert_array_equal(one, two)


def test_predict_texts_and_pairs(exported):
    student, _, out, _ = exported
    engine = load_packed(out)
    texts = ["the movie was good", "a very dull plot and a bad ending", "fun"]
    pred = engine.predict(texts)
    assert len(pred.labels) == 3 and pred.scores.shape == (3, 3)
    np.testing.assert_allclose(pred.scores.sum(1), 1.0, rtol=1e-5)
    enc = engine.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = student(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]).logits.numpy()
    np.testing.assert_allclose(pred.logits, expected, rtol=1e-3, atol=1e-3)
    paired = engine.predict(texts, pairs=["it is great", "not fun", "boring"], batch_size=2)
    assert paired.scores.shape == (3, 3)
    with pytest.raises(BibertError):
        engine.predict(texts, pairs=["one"])


def test_bad_files(exported, tmp_path):
    _, folder, out, _ = exported
    raw = out.read_bytes()
    truncated = tmp_path / "truncated.bibert"
    truncated.write_bytes(raw[: len(raw) // 2])
    corrupted = tmp_path / "corrupted.bibert"
    flipped = bytearray(raw)
    flipped[len(raw) // 2] ^= 0x10
    corrupted.write_bytes(bytes(flipped))
    newer = tmp_path / "newer.bibert"
    newer.write_bytes(raw[:8] + struct.pack("<I", PACKED_FORMAT_VERSION + 1) + raw[12:])
    garbage = tmp_path / "garbage.bibert"
    garbage.write_bytes(b"not a model")
    os.mkfifo(tmp_path / "fifo.bibert")
    for bad, message in ((truncated, "checksum"), (corrupted, "checksum"), (newer, "version"), (garbage, "magic"),
                         (tmp_path / "missing.bibert", "does not exist$"),
                         (folder, "is a folder, not a file; a packed model is one file: write it from a student "
                                  "folder with `bibert export --model DIR --out model.bibert`$"),
                         (tmp_path / "fifo.bibert", r"is a named pipe \(FIFO\), not a file"),
                         ("/dev/zero", "is a character device, not a file")):
        with pytest.raises(BibertError, match=message):
            load_packed(bad)


def test_refuses_non_binary_students(exported, tmp_path):
    _, folder, _, _ = exported
    other = tmp_path / "w1a4"
    shutil.copytree(folder, other)
    config = json.loads((other / "config.json").read_text())
    config["quantization"]["activation_bits"] = 8
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(BibertError, match="1-1-1, 1-1-2, 1-1-4"):
        export_packed(other, tmp_path / "x.bibert")


def test_bad_inputs(exported):
    _, _, out, _ = exported
    engine = load_packed(out)
    V, P = engine.vocab_size, engine.max_positions
    with pytest.raises(BibertError, match="token ids"):
        engine.forward(np.array([[2, V]]))
    with pytest.raises(BibertError, match="token ids"):
        engine.forward(np.array([[-1, 5]]))
    with pytest.raises(BibertError, match="positions"):
        engine.forward(np.full((1, P + 1), 5))
    with pytest.raises(BibertError, match="token_type_ids"):
        engine.forward(np.array([[2, 5]]), token_type_ids=np.array([[0, 7]]))
    with pytest.raises(BibertError, match="shape"):
        engine.forward(np.array([[2, 5]]), attention_mask=np.array([[1, 1, 1]]))


def test_exported_files_get_the_usual_permissions(exported, tmp_path):
    """0666 less the umask (0644 under the usual 022), not the private 0600 of a temporary file."""
    import os
    import stat

    _, folder, _, _ = exported
    previous = os.umask(0o022)
    try:
        export_packed(folder, tmp_path / "a.bibert")
        os.umask(0o027)
        export_packed(folder, tmp_path / "b.bibert")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "a.bibert").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "b.bibert").stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bibert", "b.bibert"]  # no temporary file left


def test_reading_and_running_needs_numpy_only(exported, tmp_path):
    """A process where PyTorch and transformers cannot be imported reads the file, builds the
    engine and runs it: the same logits as here."""
    import subprocess
    import sys

    _, _, out, _ = exported
    ids = np.array([[2, 5, 6, 7, 3], [2, 8, 3, 0, 0]])
    mask = (ids != 0).astype(np.int64)
    np.save(tmp_path / "ids.npy", ids)
    np.save(tmp_path / "mask.npy", mask)
    code = f"""
import sys
for name in ("torch", "transformers", "safetensors"):
    sys.modules[name] = None  # importing any of them fails
import numpy as np
from bibert.packed import load_packed, read_packed
read_packed({str(out)!r})
model = load_packed({str(out)!r})
np.save({str(tmp_path / "logits.npy")!r}, model.forward(np.load({str(tmp_path / "ids.npy")!r}),
                                                      np.load({str(tmp_path / "mask.npy")!r})))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_array_equal(np.load(tmp_path / "logits.npy"), load_packed(out).forward(ids, mask))


def test_reader_knows_the_students_gelus():
    """The reader's list of activations that keep their input's sign is the student's."""
    from bibert.modeling import GELU_FAMILY
    from bibert.packed.format import GELU_ACTIVATIONS

    assert GELU_ACTIVATIONS == GELU_FAMILY


def test_cli_export_and_predict(exported, tmp_path, capsys):
    _, folder, _, _ = exported
    out = tmp_path / "cli.bibert"
    assert cli_main(["export", "--model", str(folder), "--out", str(out), "--side-dtype", "float16"]) == 0
    assert "smaller" in capsys.readouterr().out
    assert cli_main(["predict", "--model", str(out), "the movie was good", "--pair", "fun", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 1 and set(rows[0]) >= {"label", "scores"}
    assert cli_main(["predict", "--model", str(tmp_path / "nope.bibert"), "x"]) == 2


def test_native_encoder_matches_layer_by_layer_calls(exported):
    """forward (all layers in one native call) == the per-kernel steps of encoder_layer."""
    student, _, out, _ = exported
    engine = load_packed(out)
    ids, mask, types = batch(student.config.vocab_size)
    _, hidden = engine.forward(ids.numpy(), mask.numpy(), types.numpy(), output_hidden_states=True)
    x, xb = engine._embeddings(ids.numpy(), types.numpy())
    valid = mask.numpy().astype(bool)
    computed = valid.copy()
    computed[:, 0] = True  # forward computes the tokens and each [CLS]; padded rows are zeros
    for n in range(engine.num_layers):
        x, xb = engine._encoder_layer(n, x, xb, valid)
        got = hidden[n + 1].reshape(x.shape)
        np.testing.assert_array_equal(x[computed.reshape(-1)], got[computed.reshape(-1)])
        assert not got[~computed.reshape(-1)].any()


@pytest.mark.slow
def test_real_teacher_binarized_layer_by_layer_and_end_to_end(teacher_dir, tmp_path):
    """The binarized offline MiniLM (real weights; 6 x 384, 12 heads of 32): every layer exact
    against the student, and end to end on real sentences."""
    from bibert.modeling import binarize, load_hf_classifier

    torch.manual_seed(0)
    student = binarize(load_hf_classifier(teacher_dir, num_labels=2)).eval()
    folder = tmp_path / "minilm"
    student.save_pretrained(folder)
    export_packed(folder, tmp_path / "minilm.bibert", tokenizer_dir=teacher_dir)
    engine = load_packed(tmp_path / "minilm.bibert")
    texts = ["a gripping, beautifully acted film", "the plot is thin and the jokes fall flat",
             "not bad at all", "an utterly forgettable sequel that nobody asked for", "one of the year's best",
             "the cast does what it can with a script that goes nowhere", "funny, warm and smart", "meh"]
    enc = engine.tokenizer(texts, padding=True, return_tensors="pt")
    check_layer_by_layer(student, engine, enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    pred = engine.predict(texts)
    with torch.no_grad():
        expected = student(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]).logits.numpy()
    # chained end to end, a float tie flipping one sign can spread through later layers (rare)
    assert np.median(np.abs(pred.logits - expected)) < 1e-4


def test_a_texts_logits_do_not_depend_on_its_batch(exported):
    """Each sequence is computed alone and the classifier sums each row on its own, so a
    sequence's logits are bit for bit the same alone, in a batch of 2 or of 9."""
    _, _, path, _ = exported
    engine = load_packed(path)
    rng = np.random.default_rng(5)
    ids = rng.integers(5, engine.vocab_size, size=(9, 12))
    ids[:, 0] = 2
    mask = np.ones_like(ids)
    mask[3, 7:] = 0
    together = engine.forward(ids, mask)
    for b in range(9):
        np.testing.assert_array_equal(engine.forward(ids[b:b + 1], mask[b:b + 1])[0], together[b])
        np.testing.assert_array_equal(engine.forward(ids[[b, (b + 1) % 9]], mask[[b, (b + 1) % 9]])[0], together[b])
