"""The training loop: outputs, resume equality, NaN stop, ablation variants, errors, CLI."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from bibert import BiBertForSequenceClassification, QuantConfig
from bibert.checkpoint import recover_folder, write_folder_atomically
from bibert.cli import main as cli_main
from bibert.errors import BibertError
from bibert.config import TrainConfig, resolve_config
from bibert.data import group_by_length
from bibert.train import distill, finetune, finetune_and_distill

# a few dozen real Rotten Tomatoes snippets, short sequences: seconds per run
SLICE = dict(max_train_examples=48, max_eval_examples=16, batch_size=8, max_length=24, log_every=1)


def make_tiny_teacher(folder: Path, tokenizer_dir: str, num_labels: int = 2, layers: int = 2) -> str:
    """A random 2-layer BERT classifier (hidden 32) with the real tokenizer."""
    torch.manual_seed(0)
    names = {2: ["rotten", "fresh"], 3: ["entailment", "neutral", "contradiction"]}.get(num_labels)
    extra = {"id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}} if names else {}
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=num_labels, **extra)
    BertForSequenceClassification(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory, teacher_dir):
    return make_tiny_teacher(tmp_path_factory.mktemp("tiny") / "teacher", teacher_dir)


def weights(folder) -> dict:
    return load_file(str(Path(folder) / "model.safetensors"))


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_distill_writes_every_output(tiny_teacher, tmp_path):
    out = tmp_path / "run"
    res = distill(tiny_teacher, "rotten_tomatoes", out, max_steps=6, eval_every=3, **SLICE)
    for name in ("config.json", "metrics.jsonl", "results.json", "training_curves.png"):
        assert (out / name).is_file(), name
    student = BiBertForSequenceClassification.from_pretrained(out / "best")
    assert student.quant == QuantConfig(activations="elastic", attention="bi-max")  # the default: Elastic BiBERT
    assert AutoTokenizer.from_pretrained(out / "last").vocab_size == 30522
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in lines] == [3, 6]
    assert {"loss", "pred", "q", "k", "v", "hid", "flip"} <= set(lines[-1]["train"])
    assert res["best"]["score"] == max(e["dev"]["accuracy"] for e in lines)
    assert json.loads((out / "results.json").read_text())["steps"] == 6
    config = TrainConfig.from_dict(json.loads((out / "config.json").read_text()))
    # Elastic BiBERT's schedule; the epochs of its budget (80,000 examples, at most 10 epochs) for 48 examples
    assert (config.lr, config.epochs, config.distill, config.pred_weight) == (5e-4, 10.0, "dmd", 5.0)
    assert config.group_by_length and config.precision == "auto"


def test_paper_recipe_and_the_budget_from_the_data(tiny_teacher, tmp_path, capsys):
    res = distill(tiny_teacher, "rotten_tomatoes", tmp_path / "paper", paper=True, max_steps=2, **SLICE)
    config = TrainConfig.from_dict(json.loads((tmp_path / "paper" / "config.json").read_text()))
    assert (config.quant, config.lr, config.epochs, config.pred_weight) == (QuantConfig(), 1e-4, 10.0, 1.0)
    assert (config.precision, config.group_by_length, res["steps"]) == ("fp32", False, 2)
    # without --epochs: 80,000 / 2,000 = 40 epochs, capped at 10: 10 x ceil(2000 / 8) steps, stated at the start
    opts = {**SLICE, "max_train_examples": 2000, "max_steps": None}
    trainer_config = resolve_config("distill", tiny_teacher, "rotten_tomatoes", tmp_path / "budget", **opts)
    assert trainer_config.epochs is None
    from bibert.train import Trainer

    class Stop(Exception):
        pass

    def stop_at_once(trainer):
        raise Stop(trainer.total_steps)

    with pytest.raises(Stop) as stopped:
        Trainer(trainer_config, hooks=[stop_at_once]).run()
    assert stopped.value.args == (10 * 250,)
    assert "2,500 steps of 8 examples (10.00 epochs of 2,000)" in capsys.readouterr().out


def test_standard_softmax_baseline_and_shallow_student(tiny_teacher, tmp_path):
    res = distill(tiny_teacher, "rotten_tomatoes", tmp_path / "base", quant=QuantConfig.from_bits("1-1-1", "softmax"),
                  distill="standard", student_layers=1, max_steps=3, **SLICE)
    student = BiBertForSequenceClassification.from_pretrained(tmp_path / "base" / "last")
    assert student.config.num_hidden_layers == 1 and student.quant.attention == "softmax"
    line = json.loads((tmp_path / "base" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"att", "hid", "pred"} <= set(line["train"])
    assert res["steps"] == 3


def test_finetune_then_distill_pipeline(tiny_teacher, tmp_path):
    from transformers import AutoModelForSequenceClassification

    res = finetune_and_distill(tiny_teacher, "rotten_tomatoes", tmp_path / "p",
                               teacher_options={"max_steps": 4, "batch_size": 8, "max_length": 24},
                               max_steps=2, **SLICE)
    teacher = AutoModelForSequenceClassification.from_pretrained(tmp_path / "p" / "teacher" / "best")
    assert teacher.config.id2label == {0: "rotten", 1: "fresh"}  # a standard Hugging Face folder
    assert res["teacher"]["mode"] == "finetune" and res["teacher"]["teacher"] is None
    cfg = json.loads((tmp_path / "p" / "teacher" / "config.json").read_text())
    assert cfg["lr"] == 5e-5 and cfg["epochs"] == 3.0 and cfg["max_train_examples"] == 48  # fine-tuning recipe
    assert res["student"]["teacher"]["dev"] == res["teacher"]["best"]["metrics"]["dev"]
    assert BiBertForSequenceClassification.from_pretrained(tmp_path / "p" / "student" / "best").quant.bits == "1-1-1"


class Crash(Exception):
    pass


def crash_at(step):
    def hook(trainer):
        if trainer.step == step:
            raise Crash(step)
    return hook


@pytest.mark.parametrize("grouped", [False, True])
def test_interrupted_and_resumed_run_equals_uninterrupted(tiny_teacher, tmp_path, grouped):
    opts = dict(**{**SLICE, "log_every": 3}, max_steps=10, eval_every=4, save_every=3, group_by_length=grouped)
    distill(tiny_teacher, "rotten_tomatoes", tmp_path / "a", **opts)
    with pytest.raises(Crash):  # dies after step 7: the last state is step 6, steps 7.. are redone
        distill(tiny_teacher, "rotten_tomatoes", tmp_path / "b", hooks=[crash_at(7)], **opts)
    assert json.loads((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 4
    distill(tiny_teacher, "rotten_tomatoes", tmp_path / "b", resume=True, **opts)
    assert_same_weights(tmp_path / "a" / "last", tmp_path / "b" / "last")
    assert_same_weights(tmp_path / "a" / "best", tmp_path / "b" / "best")
    a, b = ((tmp_path / r / "metrics.jsonl").read_text() for r in "ab")
    assert a == b  # dev metrics and the training-loss averages (log windows cut by the crash included)
    assert "train" in json.loads(a.splitlines()[-1])
    # resuming a finished run only rewrites the final outputs
    res = distill(tiny_teacher, "rotten_tomatoes", tmp_path / "b", resume=True, **opts)
    assert res["steps"] == 10


def test_killed_process_resumes_to_the_same_weights(tiny_teacher, tmp_path):
    """SIGKILL at an arbitrary moment (here: as soon as a checkpoint exists, so mid-run),
    then --resume: same final weights as the uninterrupted run."""
    args = ["distill", "--teacher", tiny_teacher, "--task", "rotten_tomatoes", "--max-steps", "30",
            "--eval-every", "10", "--save-every", "2", "--log-every", "3", "--max-train-examples", "48",
            "--max-eval-examples", "16",
            "--batch-size", "8", "--max-length", "24"]
    cmd = [sys.executable, "-m", "bibert.cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # as in this process: same sums
    proc = subprocess.Popen([*cmd, "--out", str(tmp_path / "k")], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (tmp_path / "k" / "checkpoint").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "k" / "last").exists(), "the run finished before it could be killed"
    assert cli_main([*args, "--out", str(tmp_path / "k"), "--resume"]) == 0
    assert cli_main([*args, "--out", str(tmp_path / "u")]) == 0
    assert_same_weights(tmp_path / "u" / "last", tmp_path / "k" / "last")
    for name in ("metrics.jsonl",):  # the logs too, loss averages included
        assert (tmp_path / "u" / name).read_text() == (tmp_path / "k" / name).read_text()
    u, k = (json.loads((tmp_path / r / "results.json").read_text()) for r in "uk")
    assert u["best"] == k["best"] and u["last"] == k["last"]


def test_resume_of_a_missing_run_says_it_starts_afresh(tiny_teacher, tmp_path, capsys):
    distill(tiny_teacher, "rotten_tomatoes", tmp_path / "fresh", resume=True, max_steps=2, **SLICE)
    assert "holds no run yet, so this starts a new one" in capsys.readouterr().out
    distill(tiny_teacher, "rotten_tomatoes", tmp_path / "fresh", resume=True, max_steps=2, **SLICE)
    assert "resuming" in capsys.readouterr().out


def test_non_finite_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(tiny_teacher, tmp_path):
    def poison(trainer):
        if trainer.step == 4:
            with torch.no_grad():
                trainer.model.bert.embeddings.LayerNorm.weight.fill_(float("nan"))

    with pytest.raises(BibertError, match=r"loss became nan at step 5.*checkpoint \(step 4\)"):
        distill(tiny_teacher, "rotten_tomatoes", tmp_path / "n", max_steps=10, save_every=2, hooks=[poison], **SLICE)
    state = torch.load(tmp_path / "n" / "checkpoint" / "training_state.pt", weights_only=True)
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in weights(tmp_path / "n" / "checkpoint").values() if v.is_floating_point())


def test_atomic_folder_write_survives_failures(tmp_path):
    target = tmp_path / "best"
    write_folder_atomically(target, lambda d: (d / "a.txt").write_text("one"))

    def broken(d):
        (d / "a.txt").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_folder_atomically(target, broken)
    assert (target / "a.txt").read_text() == "one"
    os.rename(target, tmp_path / ".best.old")  # a kill between the two renames
    recover_folder(target)
    assert (target / "a.txt").read_text() == "one" and not (tmp_path / ".best.tmp").exists()


def test_bad_options_give_clear_errors(tiny_teacher, teacher_dir, tmp_path):
    with pytest.raises(BibertError, match="unknown task"):
        resolve_config("distill", tiny_teacher, "sst-5", tmp_path)
    with pytest.raises(BibertError, match="bits"):
        QuantConfig.from_bits("1-1-3")
    with pytest.raises(BibertError, match="unknown training options: lerning_rate"):
        distill(tiny_teacher, "rotten_tomatoes", tmp_path / "x", lerning_rate=1)
    with pytest.raises(BibertError, match="has 2 labels, but snli needs 3"):
        distill(tiny_teacher, "snli", tmp_path / "y", max_steps=1, **SLICE)
    with pytest.raises(BibertError, match="no classification head"):
        distill(teacher_dir, "rotten_tomatoes", tmp_path / "z", max_steps=1, **SLICE)
    with pytest.raises(BibertError, match="batch-size must be a positive integer"):
        distill(tiny_teacher, "rotten_tomatoes", tmp_path / "w", batch_size=0)
    with pytest.raises(BibertError, match="--pred-weight must be a finite number >= 0"):
        distill(tiny_teacher, "rotten_tomatoes", tmp_path / "p", pred_weight=-1.0)
    with pytest.raises(BibertError, match="--pred-weight applies to distillation only"):
        resolve_config("finetune", tiny_teacher, "rotten_tomatoes", tmp_path / "f", pred_weight=2.0)


def test_an_existing_run_needs_resume_with_the_same_options(tiny_teacher, tmp_path):
    distill(tiny_teacher, "rotten_tomatoes", tmp_path / "r", max_steps=2, **SLICE)
    with pytest.raises(BibertError, match="already holds a run"):
        distill(tiny_teacher, "rotten_tomatoes", tmp_path / "r", max_steps=2, **SLICE)
    with pytest.raises(BibertError, match=r"different options \(lr"):
        distill(tiny_teacher, "rotten_tomatoes", tmp_path / "r", resume=True, lr=1e-3, max_steps=2, **SLICE)


def test_cli_reports_errors_with_status_2(tiny_teacher, tmp_path, capsys):
    code = cli_main(["distill", "--teacher", tiny_teacher, "--task", "rotten_tomatoes", "--out", str(tmp_path / "c"),
                     "--bits", "1-1-7"])
    assert code == 2 and "unsupported activation_bits=7" in capsys.readouterr().err
    code = cli_main(["finetune", "--model", tiny_teacher, "--task", "nope", "--out", str(tmp_path / "c")])
    assert code == 2 and "unknown task 'nope'" in capsys.readouterr().err


def test_group_by_length_keeps_every_example_and_cuts_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 64, size=1003)
    order = [int(i) for i in rng.permutation(1003)]
    grouped = group_by_length(order, lengths, 16, seed=5)
    assert sorted(grouped) == list(range(1003))  # a permutation: each example once per epoch
    assert grouped == group_by_length(order, lengths, 16, seed=5)  # deterministic (resume)
    assert grouped != group_by_length(order, lengths, 16, seed=6)  # reshuffled each epoch
    batches = [grouped[b:b + 16] for b in range(0, 1003, 16)]
    assert [len(b) for b in batches[:-1]] == [16] * 62 and len(batches[-1]) == 1003 % 16  # the short batch last
    assert max(lengths[batches[0]]) == lengths.max()  # peak memory at the first step
    padded = lambda o: sum(16 * int(max(lengths[o[b:b + 16]])) for b in range(0, 992, 16))  # noqa: E731
    assert padded(grouped) < 0.75 * padded(order)  # random batches pad to ~the max, grouped ones close to each length
    # windows of 50 batches: the order across windows stays random
    firsts = [min(grouped[b:b + 16]) for b in range(0, 992, 16)]
    assert firsts != sorted(firsts)
    assert group_by_length([], lengths, 16, seed=0) == []


def test_cli_group_by_length_reaches_the_run(tiny_teacher, tmp_path):
    out = tmp_path / "g"
    code = cli_main(["distill", "--teacher", tiny_teacher, "--task", "rotten_tomatoes", "--out", str(out),
                     "--max-steps", "2", "--max-train-examples", "32", "--max-eval-examples", "8",
                     "--batch-size", "8", "--max-length", "24", "--group-by-length"])
    assert code == 0
    assert json.loads((out / "config.json").read_text())["group_by_length"] is True


def test_precision_auto_is_bf16_only_where_the_device_has_it(tiny_teacher, tmp_path, monkeypatch):
    from bibert import distributed

    cpu = torch.device("cpu")
    assert distributed.resolve_precision("fp32", cpu) == "fp32" and distributed.resolve_precision("bf16", cpu) == "bf16"
    for native, expected in ((False, "fp32"), (True, "bf16")):
        monkeypatch.setattr(distributed, "has_native_bf16", lambda device, native=native: native)
        out = tmp_path / expected
        res = distill(tiny_teacher, "rotten_tomatoes", out, max_steps=2, precision="auto", eval_test=True,
                      quant=QuantConfig(activations="elastic", attention="bi-max"), **SLICE)
        assert res["precision"] == expected
        assert json.loads((out / "config.json").read_text())["precision"] == "auto"  # a resume decides again
        logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert logged and all("train" in r for r in logged)
        assert all(math.isfinite(v) for r in logged for v in r["train"].values())


def test_dmd_mask_padding_option(tiny_teacher, tmp_path):
    res = distill(tiny_teacher, "rotten_tomatoes", tmp_path / "m", max_steps=2, dmd_mask_padding=True, **SLICE)
    assert res["steps"] == 2
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dmd_mask_padding"] is True
    with pytest.raises(BibertError, match="--distill dmd only"):
        distill(tiny_teacher, "rotten_tomatoes", tmp_path / "s", distill="standard", dmd_mask_padding=True, **SLICE)


@pytest.mark.slow
def test_short_distillation_on_real_data_lowers_the_loss(teacher_dir, tmp_path):
    """The offline MiniLM teacher, fine-tuned briefly on a Rotten Tomatoes slice, then a
    short BiBERT distillation: the DMD loss goes down."""
    data = dict(max_train_examples=96, max_eval_examples=32, batch_size=16, max_length=32)
    finetune(teacher_dir, "rotten_tomatoes", tmp_path / "t", max_steps=6, **data)
    res = distill(str(tmp_path / "t" / "best"), "rotten_tomatoes", tmp_path / "s", max_steps=24, log_every=4,
                  eval_every=24, lr=5e-4, **data)
    history = json.loads((tmp_path / "s" / "metrics.jsonl").read_text().splitlines()[-1])["train"]
    state = torch.load(tmp_path / "s" / "checkpoint" / "training_state.pt", weights_only=True)
    losses = [h["loss"] for h in state["history"]]
    assert losses[-1] < losses[0] - 0.05, losses
    assert 0 < history["flip"] < 0.5
    assert res["teacher"]["dev"]["accuracy"] > 0


@pytest.mark.parametrize("activations", ["sign", "elastic"])
def test_integer_counts_train_exactly_like_float_counts(tiny_teacher, tmp_path, monkeypatch, activations):
    """The int8 matmul is a faster way to the same integer counts: a run with it and one with
    float matmuls end with identical weights and logs."""
    from bibert import quantizers

    if not quantizers._INT_MM:
        pytest.skip("no int8 matmul in this torch build")
    quant = QuantConfig(activations=activations)
    distill(tiny_teacher, "rotten_tomatoes", tmp_path / "int8", quant=quant, max_steps=4, **SLICE)
    monkeypatch.setattr(quantizers, "_INT_MM", False)
    distill(tiny_teacher, "rotten_tomatoes", tmp_path / "float", quant=quant, max_steps=4, **SLICE)
    assert_same_weights(tmp_path / "int8" / "last", tmp_path / "float" / "last")
    assert (tmp_path / "int8" / "metrics.jsonl").read_text() == (tmp_path / "float" / "metrics.jsonl").read_text()


def test_via_runs_two_stages_with_the_budget_split(tiny_teacher, tmp_path):
    res = distill(tiny_teacher, "rotten_tomatoes", tmp_path / "v", quant=QuantConfig(activations="elastic"),
                  via="1-1-4", epochs=2, **SLICE)
    first = json.loads((tmp_path / "v" / "via-1-1-4" / "results.json").read_text())
    assert res["via"]["steps"] == first["steps"] == 6 and res["steps"] == 6  # 2 epochs of 6 steps, split in halves
    config = json.loads((tmp_path / "v" / "config.json").read_text())
    assert config["init_from"] == str(tmp_path / "v" / "via-1-1-4" / "best")
    middle = BiBertForSequenceClassification.from_pretrained(tmp_path / "v" / "via-1-1-4" / "best")
    assert (middle.quant.bits, middle.quant.attention) == ("1-1-4", "softmax")  # the k-bit recipe
    assert (tmp_path / "v" / "calibration.json").is_file()  # the final student's quantizers start from data
    again = distill(tiny_teacher, "rotten_tomatoes", tmp_path / "v", quant=QuantConfig(activations="elastic"),
                    via="1-1-4", epochs=2, resume=True, **SLICE)  # both stages finished: nothing retrained
    assert again["best"] == res["best"]


def test_via_splits_the_default_budget_and_trains_the_kbit_recipe_first(tiny_teacher, tmp_path):
    """Without --epochs each stage takes its share of the default budget (48 examples: 10
    epochs of 6 steps, config.budget_epochs); the 1-1-4 stage trains the k-bit recipe, the
    final one Elastic BiBERT; with --paper both keep the paper's objective."""
    res = distill(tiny_teacher, "rotten_tomatoes", tmp_path / "b", via="1-1-4", via_share=0.25, **SLICE)
    first = json.loads((tmp_path / "b" / "via-1-1-4" / "config.json").read_text())
    final = json.loads((tmp_path / "b" / "config.json").read_text())
    assert (res["via"]["steps"], res["steps"]) == (15, 45)
    assert (first["epochs"], final["epochs"]) == (2.5, 7.5)
    assert (first["quant"]["activation_bits"], first["quant"]["attention"], first["distill"], first["pred_weight"]) \
        == (4, "softmax", "standard", 1.0)
    assert (final["quant"]["activations"], final["quant"]["attention"], final["distill"], final["pred_weight"]) \
        == ("elastic", "bi-max", "dmd", 5.0)
    paper = distill(tiny_teacher, "rotten_tomatoes", tmp_path / "p", via="1-1-4", paper=True, epochs=1, **SLICE)
    first = json.loads((tmp_path / "p" / "via-1-1-4" / "config.json").read_text())
    assert (first["quant"]["attention"], first["distill"], paper["via"]["steps"], paper["steps"]) == ("bi", "dmd", 3, 3)
    steps = distill(tiny_teacher, "rotten_tomatoes", tmp_path / "s", via="1-1-2", via_share=0.4, max_steps=10,
                    **SLICE)
    assert (steps["via"]["steps"], steps["steps"]) == (4, 6)
    with pytest.raises(BibertError, match="wider activations"):
        distill(tiny_teacher, "rotten_tomatoes", tmp_path / "w", via="1-1-1", epochs=1, **SLICE)
    with pytest.raises(BibertError, match="leave out --init-from"):
        distill(tiny_teacher, "rotten_tomatoes", tmp_path / "i", via="1-1-4", init_from=str(tmp_path), **SLICE)


def test_phase_in_hardens_the_activations_and_evaluates_the_binary_model(tiny_teacher, tmp_path):
    from bibert.modeling import ActQuantizer, ScoreBinarizer

    seen, at_eval = [], []

    def record(trainer):
        qs = [m for m in trainer.unwrapped.modules() if isinstance(m, ActQuantizer) and not isinstance(m, ScoreBinarizer)]
        seen.append(qs[0].hardness)

    res = distill(tiny_teacher, "rotten_tomatoes", tmp_path / "p", phase_in=0.5, max_steps=8, eval_every=2,
                  hooks=[record], **SLICE)
    assert seen == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0])  # over the first half of the steps
    # the dev scores are those of the binary model: best/ reloaded (hardness 1) scores the same on dev
    assert res["steps"] == 8 and res["best"]["score"] >= 0
    config = TrainConfig.from_dict(json.loads((tmp_path / "p" / "config.json").read_text()))
    assert config.phase_in == 0.5
    with pytest.raises(BibertError, match="--phase-in hardens elastic activations"):
        distill(tiny_teacher, "rotten_tomatoes", tmp_path / "q", paper=True, phase_in=0.5, max_steps=1, **SLICE)
    with pytest.raises(BibertError, match=r"--phase-in is a share of the steps in \[0, 1\)"):
        distill(tiny_teacher, "rotten_tomatoes", tmp_path / "r", phase_in=1.0, max_steps=1, **SLICE)


def test_fused_adamw_makes_the_per_tensor_update():
    from bibert.train import _adamw

    torch.manual_seed(0)
    params = [torch.randn(8, 5), torch.randn(5)]
    grads = [torch.randn(8, 5), torch.randn(5)]
    results = []
    for make in (lambda g: _adamw(g, lr=1e-2, eps=1e-6), lambda g: torch.optim.AdamW(g, lr=1e-2, eps=1e-6)):
        ps = [torch.nn.Parameter(p.clone()) for p in params]
        opt = make([{"params": ps[:1], "weight_decay": 0.01}, {"params": ps[1:], "weight_decay": 0.0}])
        for _ in range(3):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            opt.step()
        results.append([p.detach() for p in ps])
    for fused, loop in zip(*results):
        assert torch.allclose(fused, loop, rtol=0, atol=1e-6)
    assert _adamw([{"params": [torch.nn.Parameter(torch.ones(2))]}], lr=1e-3).defaults.get("fused") is True
