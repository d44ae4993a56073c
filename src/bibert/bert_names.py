"""BERT's parameter names, as the student keeps them (Hugging Face's
BertForSequenceClassification state-dict names), listed once for every module that
walks a model by name (the cost table, calibration, the packed format).

The classifier holds the BertModel under BODY and the head under CLASSIFIER. Inside
the BertModel, encoder layer N is ENCODER_LAYER.format(N) followed by one of the names
below; in the classifier, LAYER_PREFIX.format(N), e.g.
"bert.encoder.layer.3." + "attention.self.query" (+ ".weight" / ".bias").
"""

BODY = "bert"  # the BertModel inside the classifier
CLASSIFIER = "classifier"  # the head (H -> labels), full precision
WORD_EMBEDDINGS = "embeddings.word_embeddings"  # in BODY; binarized
POOLER = "pooler.dense"  # in BODY; binarized
ENCODER_LAYER = "encoder.layer.{}."  # layer N of BODY
LAYER_PREFIX = f"{BODY}.{ENCODER_LAYER}"  # layer N of the classifier
SELF_ATTENTION = "attention.self"  # in a layer: holds Q, K, V (and, elastic, their one input quantizer)
QKV = ("attention.self.query", "attention.self.key", "attention.self.value")
# every binarized Linear of a layer, in the order of the forward
BINARY_LINEARS = QKV + ("attention.output.dense", "intermediate.dense", "output.dense")
ATTENTION_OUTPUT, FFN_IN, FFN_OUT = BINARY_LINEARS[3:]
LAYER_NORMS = ("attention.output.LayerNorm", "output.LayerNorm")  # after attention, after the FFN


def layer_of(name: str) -> int | None:
    """The encoder layer a classifier's parameter or module name lies in (None: outside the encoder)."""
    head = LAYER_PREFIX.split("{")[0]
    return int(name[len(head):].split(".")[0]) if name.startswith(head) else None
