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
    # given by --model/--teacher, --task, --out, --bits...; budget_share by --via (each stage's share)
    assert names == {"mode", "task", "model", "out", "quant", "budget_share"}


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
            assert "(default: dmd; standard for a 1-1-2 / 1-1-4 student without --paper)" in text
            assert "(default: 1-1-1)" in text and "(default: 0.5)" in text
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
    # a 1-1-2 / 1-1-4 student: the k-bit recipe (softmax attention, standard objective, prediction weight 1)
    kbit = resolve_config("distill", "m", "mnli", "o", quant=QuantConfig(activation_bits=2, attention="softmax"))
    assert (kbit.distill, kbit.pred_weight, kbit.precision, kbit.lr) == ("standard", 1.0, "auto", 5e-4)
    paper_kbit = resolve_config("distill", "m", "mnli", "o", quant=QuantConfig(activation_bits=4), paper=True)
    assert (paper_kbit.distill, paper_kbit.pred_weight) == ("dmd", 1.0)
    mine = resolve_config("distill", "m", "mnli", "o", quant=QuantConfig(activation_bits=4), distill="dmd", pred_weight=3.0)
    assert (mine.distill, mine.pred_weight) == ("dmd", 3.0)


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
    assert student_quant("1-1-4", None, None) == QuantConfig(activation_bits=4, attention="softmax")  # the k-bit recipe
    assert student_quant("1-1-2", None, None, paper=True) == QuantConfig(activation_bits=2)  # the paper's: Bi-Attention
    assert student_quant("1-1-4", "bi", None) == QuantConfig(activation_bits=4)
    assert student_quant(None, "softmax", None, paper=True) == QuantConfig(attention="softmax")


def test_a_misspelt_flag_gets_its_commands_usage_and_a_suggestion(capsys):
    from bibert.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["predict", "--model", "m.bibert", "--flie", "in.csv"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: bibert predict [-h] --model PATH")
    assert err.endswith("bibert predict: error: unrecognized arguments: --flie (did you mean --file?)\n")
    with pytest.raises(SystemExit):
        main(["distill", "--teacher", "t", "--out", "o", "--max-step", "3", "--quantiser-lr", "1"])
    err = capsys.readouterr().err
    assert err.startswith("usage: bibert distill") and "(did you mean --quantizer-lr?)" in err
    # a misspelt required flag: the suggestion, not "the following arguments are required"
    with pytest.raises(SystemExit):
        main(["distill", "--teacher", "t", "--otu", "o"])
    err = capsys.readouterr().err
    assert err.startswith("usage: bibert distill") and err.endswith(
        "bibert distill: error: unrecognized arguments: --otu o (did you mean --out?)\n")
    with pytest.raises(SystemExit):  # and a required flag that is simply missing is still named
        main(["distill", "--teacher", "t"])
    assert capsys.readouterr().err.endswith("error: the following arguments are required: --out\n")


def test_help_says_what_each_command_takes(capsys):
    with pytest.raises(SystemExit):
        parse("evaluate", "--help")
    text = capsys.readouterr().out
    for training_only in ("--train-file", "--dev-file", "--test-file", "--lr", "--epochs", "--resume"):
        assert training_only not in text
    assert "column of --file holding the label" in text
    with pytest.raises(SystemExit):
        parse("export", "--help")
    text = " ".join(capsys.readouterr().out.split())
    assert "bits 1-1-1, or 1-1-2 / 1-1-4 with k-bit activations; attention bi, or bi-max" in text


def test_summary_takes_every_attention(tmp_path, capsys):
    import json

    from bibert.cli import main

    config = {"model_type": "bert", "vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 2,
              "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 64}
    (tmp_path / "config.json").write_text(json.dumps(config))
    tables = {}
    for attention in ("bi", "bi-max", "softmax"):
        assert main(["summary", str(tmp_path / "config.json"), "--bits", "1-1-1", "--attention", attention,
                     "--json"]) == 0
        tables[attention] = json.loads(capsys.readouterr().out)
    assert tables["bi-max"]["attention"] == "bi-max"
    assert tables["bi-max"]["totals"] == tables["bi"]["totals"]  # the same operations, margins learned


def test_ctrl_c_says_how_to_continue(monkeypatch, capsys):
    import bibert.commands.packed
    import bibert.commands.train
    from bibert.cli import main

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(bibert.commands.train, "run_distill", interrupted)
    assert main(["distill", "--teacher", "t", "--out", "runs/x"]) == 130
    assert capsys.readouterr().err == ("interrupted: runs/x keeps its last checkpoint; run the same command with "
                                       "--resume to continue from it\n")
    monkeypatch.setattr(bibert.commands.packed, "run_predict", interrupted)
    assert main(["predict", "--model", "m.bibert", "a text"]) == 130
    assert capsys.readouterr().err == "interrupted\n"
