"""The typed description of a packed model's quantization (`bibert.packed.format.PackedQuant`):
made from every quantization object the format accepts and back, the flags the engine reads,
the format version each needs, what it refuses, and the engine and the reader using it."""
from __future__ import annotations

import itertools
import json

import pytest
import torch
from transformers import BertConfig

from bibert import BibertError, QuantConfig
from bibert.modeling import BiBertForSequenceClassification
from bibert.packed import PackedFormatError, PackedQuant, export_packed, load_packed, read_packed
from bibert.packed.format import PACKED_FORMAT_VERSION, PREAMBLE, QUANT_VERSIONS, expected_tensors
from packed_util import VOCAB, randomize, save_with_tokenizer, with_header_version

# every quantization the format holds: (student's QuantConfig, description, name, format version)
ACCEPTED = [
    (QuantConfig(), PackedQuant(1, "sign", "bi"), "sign", 1),
    (QuantConfig(activations="elastic"), PackedQuant(1, "elastic", "bi"), "elastic", 2),
    (QuantConfig(1, 1, 2), PackedQuant(2, "sign", "bi"), "2-bit", 3),
    (QuantConfig(1, 1, 4), PackedQuant(4, "sign", "bi"), "4-bit", 3),
    (QuantConfig(activations="elastic", attention="bi-max"), PackedQuant(1, "elastic", "bi-max"), "elastic-bi-max", 4),
    (QuantConfig(1, 1, 2, "softmax"), PackedQuant(2, "sign", "softmax"), "2-bit-softmax", 5),
    (QuantConfig(1, 1, 4, "softmax"), PackedQuant(4, "sign", "softmax"), "4-bit-softmax", 5),
]
IDS = [name for _, _, name, _ in ACCEPTED]


def v1(bits: int) -> dict:
    """A quantization object of config version 1, which has no "activations" (sign)."""
    return {"weight_bits": 1, "embedding_bits": 1, "activation_bits": bits, "attention": "bi", "version": 1}


@pytest.mark.parametrize("config,quant,name,version", ACCEPTED, ids=IDS)
def test_round_trip_of_each_accepted_quantization(config, quant, name, version):
    d = config.to_dict()
    made = PackedQuant.from_dict(d)
    assert made == quant and made.name == str(made) == name and made.format_version == version
    assert made.to_dict() == d and PackedQuant.from_dict(made.to_dict()) == made
    assert QuantConfig.from_dict(made.to_dict()) == config
    assert QUANT_VERSIONS[made] == version
    hash(made)  # frozen: usable as a key
    with pytest.raises(AttributeError):
        made.activation_bits = 2


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_version_1_objects_are_sign_activations(bits):
    quant = PackedQuant.from_dict(v1(bits))
    assert quant == PackedQuant(bits) and quant.activations == "sign" and quant.attention == "bi"
    assert PackedQuant.from_dict(quant.to_dict()) == quant  # written back as the current version


@pytest.mark.parametrize("config,quant,name,version", ACCEPTED, ids=IDS)
def test_flags_the_engine_reads(config, quant, name, version):
    bits = config.activation_bits
    assert quant.is_kbit == (bits > 1) and quant.kbits == (bits if bits > 1 else 0)
    assert quant.elastic == (config.activations == "elastic")
    assert quant.relative_attention == (config.attention == "bi-max")


def test_every_description_that_can_be_made_has_a_format_version():
    made = set()
    for bits, activations, attention in itertools.product((1, 2, 4), ("sign", "elastic"), ("bi", "bi-max", "softmax")):
        try:
            made.add(PackedQuant(bits, activations, attention))
        except PackedFormatError:
            pass
    assert made == set(QUANT_VERSIONS) == {quant for _, quant, _, _ in ACCEPTED}
    assert max(QUANT_VERSIONS.values()) <= PACKED_FORMAT_VERSION  # every one readable by this bibert
    assert PackedQuant() == PackedQuant(1, "sign", "bi")


GOOD = QuantConfig().to_dict()
REFUSED = [
    (None, "quantization is None; it must be a JSON object"),
    ([], "quantization is []; it must be a JSON object"),
    ({}, "quantization lacks the field 'activation_bits'"),
    ({k: v for k, v in GOOD.items() if k != "version"}, "quantization lacks the field 'version'"),
    ({**GOOD, "extra": 1}, "quantization has an unknown field 'extra'"),
    ({**GOOD, "weight_bits": 2}, "quantization.weight_bits is 2; it must be an integer in [1, 1]"),
    ({**GOOD, "embedding_bits": 32}, "quantization.embedding_bits is 32; it must be an integer in [1, 1]"),
    ({**GOOD, "activation_bits": 3}, "quantization.activation_bits is 3; it must be 1, 2 or 4"),
    ({**GOOD, "activation_bits": 8}, "quantization.activation_bits is 8; it must be 1, 2 or 4"),
    ({**GOOD, "activation_bits": True}, "quantization.activation_bits is True; it must be 1, 2 or 4"),
    ({**GOOD, "activation_bits": 1.0}, "quantization.activation_bits is 1.0; it must be 1, 2 or 4"),
    ({**GOOD, "attention": "softmax"},
     "quantization.attention is 'softmax' with 1-bit activations; softmax attention is packed with 2- or 4-bit"),
    ({**GOOD, "attention": "bi-softmax"},
     "quantization.attention is 'bi-softmax'; it must be one of 'bi', 'bi-max', 'softmax'"),
    ({**GOOD, "version": QuantConfig.VERSION + 1}, f"quantization.version is {QuantConfig.VERSION + 1}"),
    ({**GOOD, "activations": "x"}, "quantization.activations is 'x'; it must be one of 'sign', 'elastic'"),
    ({**GOOD, "activation_bits": 2, "activations": "elastic"},
     "quantization.activations is 'elastic' with 2-bit activations; it must be 'sign'"),
    ({**GOOD, "activation_bits": 4, "attention": "bi-max"},
     "quantization.attention is 'bi-max' with 4-bit activations; it must be 'bi' or 'softmax'"),
    ({**GOOD, "attention": "bi-max"}, "quantization.attention is 'bi-max' with activations 'sign'; it needs 'elastic'"),
    ({**v1(1), "attention": "bi-max"},
     "quantization.attention is 'bi-max' with activations 'sign'; it needs 'elastic'"),
]


@pytest.mark.parametrize("quantization,message", REFUSED, ids=[m[:40] for _, m in REFUSED])
def test_refuses_a_quantization_the_engine_does_not_compute(quantization, message):
    with pytest.raises(PackedFormatError) as refused:
        PackedQuant.from_dict(quantization)
    assert str(refused.value).startswith(message)


@pytest.mark.parametrize("args,message", [
    ((3,), "quantization.activation_bits is 3"),
    ((1, "elastic", "softmax"), "quantization.attention is 'softmax'"),
    ((1, "binary"), "quantization.activations is 'binary'"),
    ((2, "elastic"), "quantization.activations is 'elastic' with 2-bit activations"),
    ((1, "sign", "bi-max"), "quantization.attention is 'bi-max' with activations 'sign'"),
])
def test_refuses_to_describe_what_the_format_does_not_hold(args, message):
    with pytest.raises(PackedFormatError, match=message):
        PackedQuant(*args)


def test_format_error_is_a_bibert_error():
    assert issubclass(PackedFormatError, BibertError)


def test_expected_tensors_takes_a_description_not_a_name():
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=24, max_position_embeddings=16, num_labels=2)
    config = json.loads(json.dumps(config.to_dict()))  # as a file holds it: label ids are strings
    with pytest.raises(TypeError, match="PackedQuant"):
        expected_tensors(config, "float32", "elastic")
    sign, elastic = expected_tensors(config, "float32"), expected_tensors(config, "float32", PackedQuant(1, "elastic"))
    assert set(sign) < set(elastic)


@pytest.fixture(scope="module", params=ACCEPTED, ids=IDS)
def exported(request, tmp_path_factory):
    config, quant, name, version = request.param
    tmp = tmp_path_factory.mktemp(name)
    bert = BertConfig(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=24, max_position_embeddings=16, num_labels=2)
    torch.manual_seed(0)
    student = BiBertForSequenceClassification(bert, config).eval()
    randomize(student, 0.5, keep=("LayerNorm.weight", "quantizer"))
    out = tmp / "model.bibert"
    export_packed(save_with_tokenizer(student, tmp / "student", VOCAB), out)
    return quant, out


def test_the_engine_and_the_file_use_the_description(exported, tmp_path):
    quant, out = exported
    raw = out.read_bytes()
    assert PREAMBLE.unpack_from(raw)[1] == quant.format_version  # written with the lowest version that holds it
    head_len = PREAMBLE.unpack_from(raw)[3]
    assert PackedQuant.from_dict(json.loads(raw[PREAMBLE.size:PREAMBLE.size + head_len])["quantization"]) == quant
    assert PackedQuant.from_dict(read_packed(out).quantization) == quant
    assert load_packed(out, threads=1).quant == quant
    if quant.format_version > 1:  # a file claiming an older version is refused, naming the quantization
        older = with_header_version(out, quant.format_version - 1, tmp_path / "older.bibert")
        with pytest.raises(BibertError, match=f"quantization '{quant.name}' needs format version "
                                              f"{quant.format_version}; the file has version "
                                              f"{quant.format_version - 1}"):
            read_packed(older)
