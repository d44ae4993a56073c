"""The files bibert writes: whole or not at all, with the usual permissions; model folders read back."""
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from bibert.checkpoint import (MODEL_FORMAT_KEY, MODEL_FORMAT_VERSION, atomic_write, model_labels, read_config,
                               split_student_config, student_config, write_json, write_jsonl)
from bibert.errors import BibertError


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
