"""The student: fp32 equivalence with Hugging Face, what 1-1-1 quantizes, save/load, errors."""
import json

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2ForSequenceClassification

import bibert.modeling as modeling
from bibert import BibertError, BiBertForSequenceClassification, QuantConfig, binarize
from bibert.modeling import load_hf_classifier
from bibert.quantizers import binary_linear


def _batch(vocab=50, B=3, T=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (B, T), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    types = torch.zeros_like(ids)
    types[:, T // 2:] = 1
    return ids, mask, types


@pytest.mark.parametrize("num_labels", [2, 1])
def test_full_precision_matches_hugging_face_on_real_teacher(teacher_dir, num_labels):
    torch.manual_seed(0)
    hf = load_hf_classifier(teacher_dir, num_labels=num_labels).eval()
    student = binarize(hf, QuantConfig.full_precision()).eval()
    ids, mask, types = _batch(vocab=30000, B=4, T=40)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        out = student(ids, mask, types).logits
    assert (ref - out).abs().max().item() < 1e-5


class _Recorder:
    """Stands in for bibert.modeling.binary_linear and records each call."""

    def __init__(self):
        self.linears = []

    def __call__(self, x, w, b, act_scale=None, integer_input=False):
        y = binary_linear(x, w, b, act_scale, integer_input=integer_input)
        self.linears.append((x.detach().clone(), w.detach().clone(), b.detach().clone(), y.detach().clone()))
        return y


def test_one_bit_student_quantizes_exactly_what_the_method_says(tiny_config, monkeypatch):
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(tiny_config).eval()
    student = binarize(teacher).eval()
    rec = _Recorder()
    monkeypatch.setattr(modeling, "binary_linear", rec)
    attention = []
    real_bool = modeling.bool_ste
    monkeypatch.setattr(modeling, "bool_ste", lambda x: attention.append(real_bool(x)) or attention[-1])
    ids, mask, types = _batch()
    with torch.no_grad():
        out = student(ids, mask, types, output_hidden_states=True)
    L = tiny_config.num_hidden_layers
    assert len(rec.linears) == 6 * L + 1  # q, k, v, attn-out, ffn-in, ffn-out per layer + pooler
    latent = [m.weight for m in student.modules() if isinstance(m, modeling.QuantLinear)]
    assert len(latent) == len(rec.linears)
    for (x, w, b, y), w_latent in zip(rec.linears, latent):
        assert w is not None and torch.equal(w, w_latent)
        assert set(x.unique().tolist()) <= {-1.0, 1.0}
        # the weight used is exactly +-alpha_o per row: y = x (alpha_o sign(Wc_o))^T + b, in float64
        alpha = w_latent.double().abs().mean(dim=1, keepdim=True)
        centred = w_latent.double() - w_latent.double().mean(dim=1, keepdim=True)
        used = alpha * torch.where(centred >= 0, 1.0, -1.0)
        assert torch.allclose(y.double(), x.double() @ used.T + b.double(), atol=1e-5)
    assert len(attention) == L
    for a in attention:
        assert set(a.unique().tolist()) <= {0.0, 1.0}
        padded = (mask == 0)[:, None, None, :].expand_as(a)
        assert torch.all(a[padded] == 0)
    # embeddings: word rows binarized per row; position, token-type and LayerNorm in fp32
    emb = student.bert.embeddings
    E = emb.word_embeddings.weight[ids]
    word = E.abs().mean(-1, keepdim=True) * torch.where(E - E.mean(-1, keepdim=True) >= 0, 1.0, -1.0)
    expected = emb.LayerNorm(word + emb.position_embeddings.weight[: ids.shape[1]] + emb.token_type_embeddings(types))
    assert torch.allclose(out.hidden_states[0], expected, atol=1e-6)
    # the classifier sees the pooled output in full precision
    pooled = torch.tanh(rec.linears[-1][3])
    assert torch.allclose(out.logits, student.classifier(pooled), atol=1e-6)
    # every full-precision parameter is the teacher's own
    t = teacher.state_dict()
    for name, p in student.state_dict().items():
        assert torch.equal(p, t[name]), name


def test_outputs_for_distillation_and_gradients_reach_every_weight(tiny_config):
    torch.manual_seed(1)
    student = binarize(BertForSequenceClassification(tiny_config), QuantConfig(attention="softmax"))
    student.train()
    ids, mask, types = _batch()
    out = student(ids, mask, types, labels=torch.tensor([0, 2, 1]), output_hidden_states=True,
                  output_qkv=True, output_attention_scores=True)
    L, H, T = tiny_config.num_hidden_layers, tiny_config.num_attention_heads, ids.shape[1]
    assert len(out.hidden_states) == L + 1 and out.hidden_states[0].shape == (3, T, 24)
    assert len(out.qkv) == L and all(t.shape == (3, H, T, 8) for qkv in out.qkv for t in qkv)
    assert out.attention_scores[0].shape == (3, H, T, T)
    # Q/K/V are real-valued projections, not signs
    assert len(out.qkv[0][0].unique()) > 2
    out.loss.backward()
    for name, p in student.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("bits,attention", [("1-1-1", "bi"), ("1-1-2", "softmax"), ("1-1-4", "softmax"), ("32-32-32", "bi")])
def test_every_configuration_runs_and_round_trips(tiny_config, tmp_path, bits, attention):
    torch.manual_seed(2)
    student = binarize(BertForSequenceClassification(tiny_config), QuantConfig.from_bits(bits, attention)).eval()
    ids, mask, types = _batch()
    student.save_pretrained(tmp_path)
    loaded = BiBertForSequenceClassification.from_pretrained(tmp_path).eval()
    assert loaded.quant == student.quant
    with torch.no_grad():
        assert torch.equal(student(ids, mask, types).logits, loaded(ids, mask, types).logits)
    assert binarize(str(tmp_path)).quant == QuantConfig()  # a BiBERT folder can be re-binarized


def test_loading_refuses_other_folders(tiny_config, tmp_path):
    hf_dir = tmp_path / "hf"
    BertForSequenceClassification(tiny_config).save_pretrained(hf_dir)
    with pytest.raises(BibertError, match="Hugging Face model, not a BiBERT"):
        BiBertForSequenceClassification.from_pretrained(hf_dir)
    with pytest.raises(BibertError, match="does not exist"):
        BiBertForSequenceClassification.from_pretrained(tmp_path / "nothing")
    student_dir = tmp_path / "student"
    binarize(BertForSequenceClassification(tiny_config)).save_pretrained(student_dir)
    cfg = json.loads((student_dir / "config.json").read_text())
    cfg["bibert_format_version"] = 99
    (student_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BibertError, match="format version 99"):
        BiBertForSequenceClassification.from_pretrained(student_dir)
    cfg["bibert_format_version"] = 1
    (student_dir / "config.json").write_text(json.dumps(cfg))
    (student_dir / "model.safetensors").unlink()
    with pytest.raises(BibertError, match="no model.safetensors"):
        BiBertForSequenceClassification.from_pretrained(student_dir)


def test_clear_errors_on_bad_input(tiny_config):
    gpt = GPT2ForSequenceClassification(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=20))
    with pytest.raises(BibertError, match="model_type 'bert'"):
        binarize(gpt)
    with pytest.raises(BibertError, match="unsupported weight_bits=3"):
        QuantConfig(weight_bits=3)
    with pytest.raises(BibertError, match="W-E-A"):
        QuantConfig.from_bits("1-1")
    with pytest.raises(BibertError, match="unknown attention"):
        QuantConfig(attention="linear")
    student = binarize(BertForSequenceClassification(tiny_config))
    ids, mask, _ = _batch()
    with pytest.raises(BibertError, match="longer than the model's 32 positions"):
        student(torch.ones(1, 40, dtype=torch.long))
    with pytest.raises(BibertError, match="attention_mask has shape"):
        student(ids, mask[:, :5])
    with pytest.raises(BibertError, match="integer token ids"):
        student(ids.float())
    with pytest.raises(BibertError, match="token ids must lie"):
        student(ids + 100)
    with pytest.raises(BibertError, match="2 labels"):
        binarize(BertForSequenceClassification(BertConfig(**{**tiny_config.to_dict(), "num_labels": 2})), num_labels=3)


def test_quant_config_round_trip_and_version_check():
    q = QuantConfig(1, 1, 4, "softmax")
    assert QuantConfig.from_dict(q.to_dict()) == q
    assert q.bits == "1-1-4"
    with pytest.raises(BibertError, match="newer"):
        QuantConfig.from_dict({**q.to_dict(), "version": QuantConfig.VERSION + 1})
