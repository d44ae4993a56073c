"""The tokenizer of a packed model, built from its stored files with the `tokenizers`
library alone: running a packed model needs no transformers (nor torch).

A packed file stores its teacher's tokenizer files (tokenizer.json, tokenizer_config.json,
vocab.txt, special_tokens_map.json, added_tokens.json; `format.TOKENIZER_FILES`). For the
BERT WordPiece tokenizer classes (BertTokenizer and the classes that are BertTokenizer in
transformers: DistilBert, ConvBert, MobileBert, SqueezeBert) `build_tokenizer` assembles
the same pipeline that transformers 5 assembles when it loads those files: the WordPiece
vocabulary (of tokenizer.json, else vocab.txt), a BertNormalizer and BertPreTokenizer from
the settings (do_lower_case, tokenize_chinese_chars, strip_accents), the added and special
tokens of the settings (or, in older folders, of special_tokens_map.json, added_tokens.json
and tokenizer.json), and the [CLS] A [SEP] (B [SEP]) template; each call truncates (longest
first) and pads as transformers' `tokenizer(texts, pairs, truncation=True,
max_length=..., padding=True)` does, so the token ids, attention masks and token types are
the same (tests/test_packed_tokenizer.py compares both). Nothing is written to disk, no file
named in the settings is read and no code from the file is run.

Another tokenizer class falls back to transformers' AutoTokenizer where transformers is
installed (`bibert[train]`) and is refused otherwise.
"""
from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np

# tokenizer classes that are transformers' BertTokenizer (some without token types)
BERT_CLASSES = {"BertTokenizer": True, "ConvBertTokenizer": True, "MobileBertTokenizer": True,
                "SqueezeBertTokenizer": True, "DistilBertTokenizer": False}  # name -> gives token_type_ids
NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
BERT_DEFAULTS = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
                 "mask_token": "[MASK]"}
# Rust's char::is_whitespace (what `tokenizers` strips from the end of each vocab.txt line)
_RUST_WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009" \
                   "\u200a\u2028\u2029\u202f\u205f\u3000"


class UnsupportedTokenizer(ValueError):
    """A tokenizer class this module does not build (transformers may)."""


class PackedTokenizer:
    """A BERT tokenizer over a `tokenizers.Tokenizer`, called like transformers' tokenizer:
    `tok(texts, pairs, truncation=True, max_length=128, padding=True, return_tensors="np")`
    gives input_ids, token_type_ids (for classes that have them) and attention_mask."""

    def __init__(self, backend, model_input_names: Sequence[str], pad_token: str, pad_token_id: int | None,
                 padding_side: str = "right", truncation_side: str = "right", tokenizer_class: str = "BertTokenizer"):
        self.backend = backend
        self.model_input_names = list(model_input_names)
        self.pad_token, self.pad_token_id = pad_token, pad_token_id
        self.padding_side, self.truncation_side = padding_side, truncation_side
        self.tokenizer_class = tokenizer_class

    def __repr__(self) -> str:
        return (f"PackedTokenizer({self.tokenizer_class}, vocabulary {self.backend.get_vocab_size()}, "
                f"inputs {', '.join(self.model_input_names)})")

    def __len__(self) -> int:
        return self.backend.get_vocab_size()

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return self.backend.num_special_tokens_to_add(pair)

    def __call__(self, texts, pairs=None, truncation: bool = False, max_length: int | None = None,
                 padding: bool = False, return_tensors: str | None = None) -> dict:
        single = isinstance(texts, str)
        if single:
            texts, pairs = [texts], None if pairs is None else [pairs]
        backend = self.backend
        if truncation and max_length is not None:
            backend.enable_truncation(max_length, stride=0, strategy="longest_first", direction=self.truncation_side)
        else:
            backend.no_truncation()
        if padding:
            backend.enable_padding(direction=self.padding_side, pad_id=self.pad_token_id, pad_type_id=0,
                                   pad_token=self.pad_token)
        else:
            backend.no_padding()
        inputs = list(texts) if pairs is None else list(zip(texts, pairs))
        encodings = backend.encode_batch(inputs, add_special_tokens=True)
        out = {"input_ids": [e.ids for e in encodings]}
        if "token_type_ids" in self.model_input_names:
            out["token_type_ids"] = [e.type_ids for e in encodings]
        if "attention_mask" in self.model_input_names:
            out["attention_mask"] = [e.attention_mask for e in encodings]
        if return_tensors == "np":
            return {k: np.asarray(v, dtype=np.int64) for k, v in out.items()}
        if return_tensors == "pt":
            import torch

            return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}
        if return_tensors is not None:
            raise ValueError(f"return_tensors={return_tensors!r}: give 'np', 'pt' or None")
        return {k: v[0] for k, v in out.items()} if single else out


def _json_object(files: dict[str, bytes], name: str) -> dict | None:
    if name not in files:
        return None
    value = json.loads(files[name])
    if not isinstance(value, dict):
        raise ValueError(f"{name} is not a JSON object")
    return value


def _vocab_lines(raw: bytes) -> dict[str, int]:
    """vocab.txt as `tokenizers` reads it (WordPiece.read_file): one token a line, trailing
    white space removed, a later duplicate taking the later index."""
    lines = raw.decode("utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return {line.rstrip(_RUST_WHITESPACE): i for i, line in enumerate(lines)}


def _added_token(value):
    """A token value of the settings: a string, or an AddedToken in its saved form."""
    from tokenizers import AddedToken

    if isinstance(value, str):
        return value
    if isinstance(value, dict) and value.get("__type") == "AddedToken":
        return AddedToken(**{k: v for k, v in value.items() if k != "__type"})
    raise ValueError(f"a special token is {type(value).__name__} {value!r}, not a string")


def _side(settings: dict, key: str) -> str:
    side = settings.get(key, "right")
    if side not in ("right", "left"):
        raise ValueError(f"{key} is {side!r}, not 'right' or 'left'")
    return side


def _flag(settings: dict, key: str, default):
    value = settings.get(key, default)
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"{key} is {value!r}, not true or false")
    return value


def tokenizer_class(files: dict[str, bytes], config: dict) -> str:
    """The tokenizer class a packed model's files name (tokenizer_config.json, else the
    model config's tokenizer_class, else BertTokenizer as for model_type bert)."""
    settings = _json_object(files, "tokenizer_config.json") or {}
    name = settings.get("tokenizer_class") or config.get("tokenizer_class") or "BertTokenizer"
    if not isinstance(name, str):
        raise ValueError(f"tokenizer_class is {name!r}, not a class name")
    return name


def build_tokenizer(files: dict[str, bytes], config: dict) -> PackedTokenizer:
    """The packed model's tokenizer (see the module's text). Raises UnsupportedTokenizer for
    a class other than BERT's, ValueError (or the tokenizers library's error) for files
    that do not make a tokenizer."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece

    cls = tokenizer_class(files, config)
    base = cls[:-4] if cls.endswith("Fast") else cls
    if base not in BERT_CLASSES:
        raise UnsupportedTokenizer(f"tokenizer class {cls}")
    settings = _json_object(files, "tokenizer_config.json") or {}
    tokenizer_json = _json_object(files, "tokenizer.json")
    if "additional_special_tokens" in settings and not settings.get("extra_special_tokens"):
        settings["extra_special_tokens"] = settings.pop("additional_special_tokens")

    # the added tokens by index, and the special tokens' values (from_pretrained's rules)
    added: dict[int, AddedToken] = {}
    if "added_tokens_decoder" in settings:
        decoder = settings["added_tokens_decoder"]
        if not isinstance(decoder, dict):
            raise ValueError("added_tokens_decoder is not a JSON object")
        for idx, token in decoder.items():
            if not isinstance(token, dict):
                raise ValueError(f"added token {idx} is {token!r}")
            added[int(idx)] = AddedToken(**{k: v for k, v in token.items() if k != "__type"})
    else:
        special_map = _json_object(files, "special_tokens_map.json") or {}
        for key, value in special_map.items():
            if isinstance(value, dict) and key != "extra_special_tokens":
                value = AddedToken(**{k: v for k, v in value.items() if k not in ("special", "__type")},
                                   special=True)
            elif key == "extra_special_tokens" and isinstance(value, list):
                existing = list(settings.get("extra_special_tokens") or [])
                for tok in value:
                    tok = AddedToken(**tok, special=True) if isinstance(tok, dict) else tok
                    if tok not in existing:
                        existing.append(tok)
                value = existing
            settings[key] = value
        legacy = _json_object(files, "added_tokens.json")
        if legacy is not None:
            special = {str(settings[k]) for k in NAMED_TOKENS if settings.get(k)}
            special.update(str(t) for t in (settings.get("extra_special_tokens") or []))
            for content, index in legacy.items():
                is_special = content in special
                added[int(index)] = AddedToken(content, rstrip=False, lstrip=False, normalized=not is_special,
                                               special=is_special)
        if tokenizer_json is not None:
            for token in tokenizer_json.get("added_tokens") or []:
                token = dict(token)
                index = int(token.pop("id"))
                added[index] = AddedToken(**token)
    by_content = {str(t): t for t in added.values()}

    named, extra = {}, []
    model_specific_str, model_specific_obj = {}, {}
    for key, value in list(settings.items()):
        if key in NAMED_TOKENS:
            if value is None:
                continue
            named[key] = _added_token(value)
        elif key == "extra_special_tokens":
            if isinstance(value, dict):
                model_specific_str.update({k: _added_token(v) for k, v in value.items()})
            elif isinstance(value, (list, tuple)):
                extra = [_added_token(v) if not isinstance(v, AddedToken) else v for v in value]
            elif value is not None:
                raise ValueError("extra_special_tokens is neither a list nor an object")
        elif key.endswith("_token") and isinstance(value, (str, AddedToken)):
            model_specific_str[key] = value
        elif key.endswith("_token") and isinstance(value, dict) and value.get("__type") == "AddedToken":
            model_specific_obj[key] = _added_token(value)
    for key, default in BERT_DEFAULTS.items():
        if key not in settings:
            named[key] = default
    special_map = {k: named.get(k) for k in NAMED_TOKENS}
    special_map.update({**model_specific_obj, **model_specific_str})
    for key, value in special_map.items():
        if value is not None and added:
            special_map[key] = by_content.get(str(value), value)

    # the WordPiece model, normalizer and pre-tokenizer of BertTokenizer
    if tokenizer_json is not None:
        vocab = (tokenizer_json.get("model") or {}).get("vocab")
        if isinstance(vocab, list):
            vocab = {token[0] if isinstance(token, list) else token: i for i, token in enumerate(vocab)}
    elif "vocab.txt" in files:
        vocab = _vocab_lines(files["vocab.txt"])
    else:
        raise ValueError("there is neither tokenizer.json nor vocab.txt")
    if not isinstance(vocab, dict):
        raise ValueError("tokenizer.json holds no WordPiece vocabulary")
    unk = settings.get("unk_token", "[UNK]")
    backend = Tokenizer(WordPiece(vocab, unk_token=str(_token_text(unk))))
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=_flag(settings, "tokenize_chinese_chars", True),
        strip_accents=_flag(settings, "strip_accents", None), lowercase=_flag(settings, "do_lower_case", True))
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    split = _flag(settings, "split_special_tokens", False)
    backend.encode_special_tokens = bool(split)

    # the added tokens, then the special tokens not among them (TokenizersBackend.__init__)
    to_add = [token for _, token in sorted(added.items(), key=lambda x: x[0])]
    encoder = [str(t) for t in to_add]
    for value in special_map.values():
        if value is not None and str(value) not in encoder and value not in to_add:
            to_add.append(value)
    for value in extra:
        if str(value) not in encoder and value not in to_add:
            to_add.append(value)
    names = [str(t) for t in special_map.values() if t]
    tokens = []
    for token in to_add:
        if isinstance(token, str):
            token = AddedToken(token, special=True)
        elif not token.special and str(token) in names:
            token.special = True
        tokens.append(token)
    if tokens:
        backend.add_tokens(tokens)

    def token_id(value, fallback):
        found = None if value is None else backend.token_to_id(str(value))
        return fallback if found is None else found

    cls_token = _token_text(settings.get("cls_token", "[CLS]"))
    sep_token = _token_text(settings.get("sep_token", "[SEP]"))
    backend.post_processor = processors.TemplateProcessing(
        single=f"{cls_token}:0 $A:0 {sep_token}:0",
        pair=f"{cls_token}:0 $A:0 {sep_token}:0 $B:1 {sep_token}:1",
        special_tokens=[(str(cls_token), token_id(special_map.get("cls_token"), 2)),
                        (str(sep_token), token_id(special_map.get("sep_token"), 3))])
    pad = special_map.get("pad_token")
    inputs = settings.get("model_input_names")
    if inputs is None:
        inputs = ["input_ids", "token_type_ids", "attention_mask"] if BERT_CLASSES[base] else \
            ["input_ids", "attention_mask"]
    if not isinstance(inputs, list) or not all(isinstance(x, str) for x in inputs):
        raise ValueError(f"model_input_names is {inputs!r}")
    return PackedTokenizer(backend, inputs, str(pad), token_id(pad, None), _side(settings, "padding_side"),
                           _side(settings, "truncation_side"), cls)


def _token_text(value) -> str:
    """The text of a token value of the settings (a string or a saved AddedToken)."""
    if isinstance(value, dict) and value.get("__type") == "AddedToken":
        return str(value.get("content"))
    return str(value)
