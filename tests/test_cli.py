"""The training commands' options come from TrainConfig: every flag parses to its field, the
help shows the real defaults, and the older flag names keep working."""
from dataclasses import fields

import pytest

from bibert.cli import build_parser
from bibert.commands.train import _options, student_quant
from bibert.config import FINETUNE_RECIPE, QuantConfig, TrainConfig, budget_epochs, option_fields, resolve_config
from bibert.tasks import TASKS


def parse(*argv):
    return build_parser().parse_args(list(argv))


def test_every_option_field_is_a_flag_of_its_commands():
    for mode in ("finetune", "distill"):
        args = parse(mode, "--model" if mode == "finetune" else "--teacher", "m", "--out", "o")
        assert {f.name for f in option_fields(mode)} <= set(vars(args))
        assert _options(args, mode) == {}  # nothing given: every default comes from resolve_config
    names = {f.name for f in fields(TrainConfig)} - {f.name for f in option_fields()}
    assert names == {"mode", "task", "model", "out", "quant"}  # given by --model/--teacher, --task, --out, --bits...


def test_existing_flag_names_keep_working():
    args = parse("distill", "--teacher", "t", "--task", "sst2", "--out", "o", "--activations", "elastic",
                 "--quantizer-lr", "3e-4", "--via", "1-1-4", "--via-share", "0.25", "--init-from", "x",
                 "--evals-per-epoch", "2", "--precision", "bf16", "--dmd-mask-padding", "--group-by-length",
                 "--train-file", "a.jsonl", "--data-dir", "g", "--max-train-examples", "5", "--eval-test",
                 "--student-layers", "3", "--distill", "standard", "--bits", "1-1-2", "--attention", "softmax",
                 "--pair-column", "p", "--resume", "--json")
    options = _options(args, "distill")
    assert options == {"quantizer_lr": 3e-4, "init_from": "x", "evals_per_epoch": 2, "precision": "bf16",
                       "dmd_mask_padding": True, "group_by_length": True, "train_file": "a.jsonl", "data_dir": "g",
                       "max_train_examples": 5, "eval_test": True, "student_layers": 3, "distill": "standard",
                       "text_pair_column": "p"}
    assert (args.via, args.via_share, args.activations, args.bits, args.attention) == \
        ("1-1-4", 0.25, "elastic", "1-1-2", "softmax")
    assert parse("finetune", "--model", "m", "--out", "o", "--file", "d.csv").train_file == "d.csv"
    with pytest.raises(SystemExit):  # student options belong to distill
        parse("finetune", "--model", "m", "--out", "o", "--init-from", "x")


def test_help_states_the_real_defaults(capsys):
    for mode in ("finetune", "distill"):
        with pytest.raises(SystemExit):
            parse(mode, "--help")
        text = " ".join(capsys.readouterr().out.split())
        assert "preset" not in text
        if mode == "finetune":
            assert f"(default: {FINETUNE_RECIPE['lr']:g}, the usual BERT fine-tuning recipe)" in text
        else:
            assert f"sst2 {TASKS['sst2'].lr:g}, mnli {TASKS['mnli'].lr:g}" in text
            assert "(default: dmd)" in text and "(default: 1-1-1)" in text and "(default: 0.5)" in text
        assert "(default: 42)" in text and "(default: off)" in text
    paper = resolve_config("distill", "m", "mnli", "o", paper=True)
    assert (paper.lr, paper.epochs, paper.max_length, paper.batch_size, paper.seed) == (5e-5, 5.0, 128, 16, 42)
    assert (paper.quant, paper.pred_weight, paper.precision, paper.group_by_length) == (QuantConfig(), 1.0, "fp32", False)
    # the default: Elastic BiBERT's schedule, its epochs chosen from the data once it is loaded
    elastic = resolve_config("distill", "m", "mnli", "o")
    assert (elastic.lr, elastic.epochs, elastic.max_length, elastic.batch_size) == (5e-4, None, 128, 32)
    assert elastic.quant == QuantConfig(activations="elastic", attention="bi-max")
    assert (elastic.pred_weight, elastic.precision, elastic.group_by_length) == (5.0, "auto", True)
    assert resolve_config("distill", "m", "mnli", "o", epochs=2.0, group_by_length=False).group_by_length is False


def test_default_budget_follows_the_data_size():
    assert budget_epochs(94_772) == pytest.approx(80_000 / 94_772)  # snli: 2,500 steps of 32
    assert budget_epochs(10_613) == pytest.approx(80_000 / 10_613)
    assert budget_epochs(400) == 10.0  # a small file: 10 epochs, not 200


def test_student_flags_fill_in_from_the_recipe():
    assert student_quant(None, None, None) is None
    assert student_quant("1-1-1", None, None) == QuantConfig(activations="elastic", attention="bi-max")
    assert student_quant(None, None, None, paper=True) is None
    assert student_quant("1-1-1", None, None, paper=True) == QuantConfig()
    assert student_quant(None, None, "sign") == QuantConfig()  # sign activations: Bi-Attention, not bi-max
    assert student_quant("1-1-4", None, None) == QuantConfig(activation_bits=4)
    assert student_quant(None, "softmax", None, paper=True) == QuantConfig(attention="softmax")
