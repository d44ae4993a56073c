"""`bibert summary`: per-layer bits, parameters, memory and operations of a model."""
from __future__ import annotations

import json

from ..config import ATTENTIONS


def register(sub) -> None:
    p = sub.add_parser(
        "summary",
        help="per-layer cost table: bits, 1-bit/32-bit parameters, memory, binary and float MACs",
        description="Print the cost of a BERT classifier, full precision or quantized, in the paper's "
        "accounting (a binary op = 1/64 FLOP; 1 bit per binarized entry, 32 per other parameter). "
        "MODEL is a model folder, a config.json or a packed model file (.bibert); a Hugging Face model is "
        "counted as full precision unless --bits is given.",
    )
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--bits", help="override W-E-A bits, e.g. 1-1-1, 1-1-4, 32-32-32")
    p.add_argument("--attention", choices=list(ATTENTIONS), default=None,
                   help="with --bits: attention kind: bi = Bi-Attention, bi-max = Elastic BiBERT's (with its elastic "
                   "activations), softmax = the baseline's (default bi)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..config import QuantConfig
    from ..cost import model_cost
    from ..errors import BibertError

    if args.seq_len < 1:
        raise BibertError("--seq-len must be a positive number of tokens")
    attention = args.attention or "bi"
    activations = "elastic" if attention == "bi-max" else "sign"  # bi-max exists only with elastic activations
    quant = QuantConfig.from_bits(args.bits, attention, activations) if args.bits else None
    if args.attention and not args.bits:
        raise BibertError("--attention needs --bits")
    s = model_cost(args.model, seq_len=args.seq_len, quant=quant)
    print(json.dumps(s.to_dict(), indent=2) if args.json else s.table())
    return 0
