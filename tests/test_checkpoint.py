"""The files bibert writes: whole or not at all, with the usual permissions, with a manifest of
checksums that resume, export and loading check; model folders read back."""
import json
import os

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from bibert.checkpoint import (CONFIG_NAME, MANIFEST_NAME, MODEL_FORMAT_KEY, MODEL_FORMAT_VERSION, STATE_FILE,
                               WEIGHTS_NAME, atomic_write, check_finite, model_labels, read_config,
                               split_student_config, student_config, verify_folder, write_folder_atomically,
                               write_json, write_jsonl, write_manifest)
from bibert.cli import main as cli_main
from bibert.errors import BibertError
from bibert.packed import export_packed


def test_atomic_write_replaces_whole_files_or_leaves_the_old_one(tmp_path):
    path = tmp_path / "results.json"
    write_json(path, {"a": 1})
    assert path.read_text() == '{\n  "a": 1\n}\n'
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # not a private temp-file mode

    def broken(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, broken)
    assert json.loads(path.read_text()) == {"a": 1} and os.listdir(tmp_path) == ["results.json"]  # no leftovers
    atomic_write(tmp_path / "f.npz", lambda tmp: np.savez(tmp, x=np.arange(3)))  # savez keeps the suffix
    assert np.load(tmp_path / "f.npz")["x"].tolist() == [0, 1, 2]
    atomic_write(tmp_path / "w.safetensors", lambda tmp: save_file({"w": torch.zeros(2)}, tmp))
    assert oct((tmp_path / "w.safetensors").stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # save_file's is 0600
    write_jsonl(tmp_path / "m.jsonl", [{"step": 1}, {"step": 2}])
    assert (tmp_path / "m.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_model_folders(tmp_path):
    with pytest.raises(BibertError, match="does not exist"):
        read_config(tmp_path / "nowhere")
    with pytest.raises(BibertError, match="no model here"):
        read_config(tmp_path)
    config = student_config({"model_type": "bert", "id2label": {"0": "neg", "1": "pos"}}, {"weight_bits": 1})
    assert config[MODEL_FORMAT_KEY] == MODEL_FORMAT_VERSION
    assert split_student_config(config, "x") == ({"model_type": "bert", "id2label": {"0": "neg", "1": "pos"}},
                                                 {"weight_bits": 1})
    with pytest.raises(BibertError, match="format version 99; this bibert reads up to 1"):
        split_student_config({**config, MODEL_FORMAT_KEY: 99}, "x")
    write_json(tmp_path / "config.json", config)
    assert model_labels(tmp_path) == (["neg", "pos"], None)
    write_json(tmp_path / "config.json", {"id2label": {"0": "LABEL_0", "1": "LABEL_1"}})
    assert model_labels(tmp_path) == (None, None)
    write_json(tmp_path / "config.json", {"id2label": {"0": "LABEL_0"}})
    assert model_labels(tmp_path) == (None, True)
    assert model_labels("bert-base-uncased") == (None, None)


# ------------------------------------------------------------------- integrity (manifests)

def test_folders_written_whole_carry_a_manifest_that_loading_checks(tmp_path):
    target = tmp_path / "best"
    write_folder_atomically(target, lambda d: ((d / "a.bin").write_bytes(b"x" * 100),
                                               (d / "sub").mkdir(), (d / "sub" / "b.txt").write_text("two")))
    manifest = json.loads((target / MANIFEST_NAME).read_text())
    assert sorted(manifest["files"]) == ["a.bin", "sub/b.txt"] and manifest["files"]["a.bin"]["bytes"] == 100
    assert verify_folder(target, "ADVICE") is True
    (target / "eval_sst2_dev.json").write_text("{}")  # written later (bibert evaluate): not listed, not checked
    assert verify_folder(target, "ADVICE") is True
    with open(target / "a.bin", "r+b") as f:  # same size, one byte changed
        f.seek(50)
        f.write(b"y")
    with pytest.raises(BibertError) as err:
        verify_folder(target, "ADVICE")
    assert str(err.value) == (f"{target / 'a.bin'} is damaged: its SHA-256 differs from the one written with it in "
                              "manifest.json; ADVICE")
    (target / "sub" / "b.txt").unlink()
    write_manifest(target)  # a.bin accepted as it is now; b.txt then goes missing
    (target / "a.bin").unlink()
    with pytest.raises(BibertError, match=r"a\.bin is missing \(the folder's manifest lists it\); ADVICE$"):
        verify_folder(target, "ADVICE")
    (target / MANIFEST_NAME).write_text('{"files": [1')
    with pytest.raises(BibertError, match=r"manifest\.json is damaged .*; ADVICE$"):
        verify_folder(target, "ADVICE")
    (target / MANIFEST_NAME).unlink()  # a folder of an older bibert: read unchecked
    assert verify_folder(target, "ADVICE") is False


def test_check_finite_names_the_tensor():
    check_finite({"w": torch.ones(3), "ids": torch.arange(3)}, "m.safetensors", "ADVICE")
    with pytest.raises(BibertError, match=r"^m\.safetensors: tensor b holds 2 NaN and 1 infinite value\(s\); ADVICE$"):
        check_finite({"a": torch.ones(2), "b": torch.tensor([float("nan"), float("nan"), float("inf"), 1.0])},
                     "m.safetensors", "ADVICE")


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, teacher_dir):
    """A tiny distillation run that stopped after 4 of 8 steps, with its checkpoint."""
    from test_train import SLICE, make_tiny_teacher

    root = tmp_path_factory.mktemp("stopped")
    teacher = make_tiny_teacher(root / "teacher", teacher_dir)
    args = ["distill", "--teacher", teacher, "--task", "rotten_tomatoes", "--max-steps", "4", "--eval-every", "4",
            "--save-every", "2", "--max-train-examples", str(SLICE["max_train_examples"]),
            "--max-eval-examples", str(SLICE["max_eval_examples"]), "--batch-size", str(SLICE["batch_size"]),
            "--max-length", str(SLICE["max_length"])]
    assert cli_main([*args, "--out", str(root / "run")]) == 0
    return root / "run", args


def _overwrite(path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _error(capsys) -> str:
    """The one line of stderr that the CLI's error is (loading progress bars come before it)."""
    lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(lines) == 1, lines
    return lines[0]


def _resume(run, args, capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = cli_main([*args, "--out", str(run), "--resume"])
    return code, _error(capsys) if code else ""


def test_resume_refuses_a_checkpoint_with_overwritten_bytes(stopped_run, tmp_path, capsys):
    """The attack of issue 28: 64 bytes of 0xff (16 NaNs) inside checkpoint/model.safetensors."""
    run, args = stopped_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    weights = copy / "checkpoint" / WEIGHTS_NAME
    _overwrite(weights, weights.stat().st_size // 2, b"\xff" * 64)
    code, err = _resume(copy, args, capsys)
    assert code == 2
    assert err == (f"bibert distill: error: {weights} is damaged: its SHA-256 differs from the one written with it "
                   f"in manifest.json; the checkpoint cannot be resumed: resume from an earlier copy of {copy} if you "
                   "have one, or start the run again in a new --out (without --resume)")
    # a checkpoint of an older bibert (no manifest): the NaNs are found, the tensor named
    (copy / "checkpoint" / MANIFEST_NAME).unlink()
    code, err = _resume(copy, args, capsys)
    assert code == 2
    assert f"error: {weights}: tensor " in err and " holds 16 NaN value(s); the checkpoint cannot be resumed" in err
    # random bytes for the training state: one line, no torch lecture
    (copy / "checkpoint" / STATE_FILE).write_bytes(os.urandom(4096))
    code, err = _resume(copy, args, capsys)
    assert code == 2 and f"{copy / 'checkpoint' / STATE_FILE} is damaged (" in err
    assert "start the run again in a new --out" in err


def test_resume_of_an_older_checkpoint_without_manifest_still_works(stopped_run, tmp_path, capsys):
    run, args = stopped_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    for folder in ("checkpoint", "best", "last"):
        (copy / folder / MANIFEST_NAME).unlink()
    code, err = _resume(copy, args, capsys)
    assert code == 0, err
    assert (copy / "last" / MANIFEST_NAME).is_file()  # written again, with its manifest


def test_export_and_load_refuse_damaged_or_non_finite_model_folders(stopped_run, tmp_path, capsys):
    from bibert.modeling import BiBertForSequenceClassification

    run, _ = stopped_run
    best = tmp_path / "best"
    shutil.copytree(run / "best", best)
    config = (best / CONFIG_NAME).read_bytes()
    message = (rf"^{best / CONFIG_NAME} is damaged: .*use another copy of the model \(a run's best/ or last/, a "
               rf"backup\) or train it again; if you changed the file on purpose, delete {best / MANIFEST_NAME} to "
               "accept the folder as it is$")
    for damaged in (config.replace(b'"hidden_size": 32', b'"hidden_size": 31'), b"#" + config[1:]):  # JSON or not
        assert damaged != config
        (best / CONFIG_NAME).write_bytes(damaged)
        with pytest.raises(BibertError, match=message):
            export_packed(best, tmp_path / "m.bibert")
        with pytest.raises(BibertError, match=message):
            BiBertForSequenceClassification.from_pretrained(best)
    # a NaN the student trained into its weights (the manifest matches them): export names the tensor
    shutil.rmtree(best)
    shutil.copytree(run / "best", best)
    state = load_file(str(best / WEIGHTS_NAME))
    name = "bert.encoder.layer.1.attention.self.query.weight"
    state[name][0, 0] = float("inf")
    save_file(state, str(best / WEIGHTS_NAME), metadata={"format": "pt"})
    write_manifest(best)
    capsys.readouterr()
    code = cli_main(["export", "--model", str(best), "--out", str(tmp_path / "m.bibert")])
    assert code == 2 and not (tmp_path / "m.bibert").exists()
    assert _error(capsys) == (f"bibert export: error: {best / WEIGHTS_NAME}: tensor {name} holds 1 infinite "
                                       "value(s); a packed model of it would predict garbage: export a student that "
                                       "trained without diverging (another checkpoint, or train again)")
