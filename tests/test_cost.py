"""The cost summary lands on the paper's BERT-base figures and on hand counts."""
import json

import pytest
from transformers import BertConfig

from bibert import QuantConfig
from bibert.cli import main
from bibert.cost import summarize


def test_bert_base_matches_paper_figures():
    base = BertConfig(num_labels=2)  # BERT-base defaults
    fp = summarize(base, QuantConfig.full_precision(), 128).totals
    bi = summarize(base, QuantConfig(), 128).totals
    assert fp["gflops"] == pytest.approx(22.5, rel=0.01)
    assert fp["size_mib"] == pytest.approx(418, rel=0.002)
    assert bi["gflops"] == pytest.approx(0.4, rel=0.08)
    assert bi["size_paper_mib"] == pytest.approx(13.4, rel=0.01)
    assert fp["gflops"] / bi["gflops"] == pytest.approx(56.3, rel=0.08)
    # 1-1-4 and 1-1-2 rows of the paper: 1.5 and 0.8 GFLOPs
    assert summarize(base, QuantConfig(1, 1, 4, "softmax")).totals["gflops"] == pytest.approx(1.5, rel=0.08)
    assert summarize(base, QuantConfig(1, 1, 2, "softmax")).totals["gflops"] == pytest.approx(0.8, rel=0.08)


def test_hand_count_of_a_tiny_model(tiny_config):
    s = summarize(tiny_config, QuantConfig(), seq_len=7)
    h, i, L, V = 24, 40, 2, 50
    linear_weights = L * (4 * h * h + 2 * h * i) + h * h  # encoder + pooler
    assert s.totals["params_1bit"] == linear_weights + V * h
    macs_linear = L * 7 * (4 * h * h + 2 * h * i) + h * h
    macs_attention = L * 2 * 3 * 7 * 7 * 8
    assert s.totals["binary_macs"] == macs_linear + macs_attention
    assert s.totals["fp_macs"] == h * 3  # the classifier only
    scales = L * (4 * h + i + h) + h + V
    # position+type, embedding LN, per layer (q,k,v,out biases; FFN biases; two LNs), pooler bias, classifier
    fp = (32 + 2) * h + 2 * h + L * (4 * h + (i + h) + 4 * h) + h + (3 * h + 3)
    assert s.totals["params_32bit"] == fp + scales


def test_summary_cli_on_a_checkpoint(tiny_config, tmp_path, capsys):
    from transformers import BertForSequenceClassification

    from bibert import binarize

    binarize(BertForSequenceClassification(tiny_config)).save_pretrained(tmp_path)
    assert main(["summary", str(tmp_path), "--seq-len", "16", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["bits"] == "1-1-1" and data["seq_len"] == 16
    assert main(["summary", str(tmp_path)]) == 0
    assert "GFLOPs" in capsys.readouterr().out
    assert main(["summary", str(tmp_path / "missing")]) == 2
    assert "no such model folder" in capsys.readouterr().err
