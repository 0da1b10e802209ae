"""A Hugging Face tokenizer written as GGUF `tokenizer.ggml.*` metadata, the way llama.cpp's
convert_hf_to_gguf.py writes it, so that our runtime (cpp/src/tokenizer.cpp) and llama.cpp read it alike.

Two kinds are supported, the two the runtime implements:

- `tokenizer.model` (SentencePiece) -> `tokenizer.ggml.model = "llama"`: pieces, scores and token
  types (normal / unknown / control / unused / byte), `add_space_prefix` from the model's normalizer.
- `tokenizer.json` with a byte-level BPE -> `"gpt2"`: tokens, merges ("a b"), token types (added
  special tokens are control, other added tokens user-defined) and `tokenizer.ggml.pre`, the name of
  the pre-tokenizer, recognised from the tokenizer.json's pre_tokenizer structure.

Plus the special ids (bos/eos/unk/pad), `add_bos_token`/`add_eos_token`, and the chat template from
tokenizer_config.json (or chat_template.jinja). Anything else is refused by name.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .errors import ConvertError
from .hf_source import read_json_optional

log = logging.getLogger(__name__)

# llama.cpp's token types (gguf.TokenType).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# The split regexes of the pre-tokenizers we recognise in a tokenizer.json (as its Split
# pre-tokenizer spells them), and llama.cpp's tokenizer.ggml.pre name for each.
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLIT_REGEX_PRE = {_LLAMA3_REGEX: "llama-bpe", _QWEN2_REGEX: "qwen2"}


class VocabError(ConvertError):
    """A tokenizer we cannot export; the message names what is unsupported."""


def add_vocab(writer, model_dir: Path) -> None:
    """Writes the tokenizer of the Hugging Face directory MODEL_DIR into WRITER (a gguf.GGUFWriter)."""
    model_dir = Path(model_dir)
    cfg = read_json_optional(model_dir / "tokenizer_config.json") or {}
    if (model_dir / "tokenizer.model").is_file():
        v = _sentencepiece_vocab(model_dir, cfg)
    elif (model_dir / "tokenizer.json").is_file():
        v = _tokenizer_json_vocab(model_dir, cfg)
    else:
        # A checkpoint without tokenizer files still converts (its tensors are valid), but the
        # runtime cannot tokenize with it; say so rather than fail the conversion.
        log.warning("%s has no tokenizer.model or tokenizer.json: no tokenizer written", model_dir)
        return
    _pad_to_model_vocab(v, model_dir)
    _check_special_ids(v)
    v.write(writer, _chat_template(model_dir, cfg))


class _Vocab:
    def __init__(self, model: str, pre: Optional[str] = None):
        self.model = model
        self.pre = pre
        self.tokens: List[str] = []
        self.scores: Optional[List[float]] = None
        self.types: List[int] = []
        self.merges: Optional[List[str]] = None
        self.ids: Dict[str, int] = {}      # bos / eos / unk / pad
        self.add_bos: Optional[bool] = None
        self.add_eos: Optional[bool] = None
        self.add_space_prefix: Optional[bool] = None

    def write(self, w, chat_template) -> None:
        w.add_tokenizer_model(self.model)
        if self.pre is not None:
            w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        if self.scores is not None:
            w.add_token_scores(self.scores)
        w.add_token_types(self.types)
        if self.merges is not None:
            w.add_token_merges(self.merges)
        for name, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id),
                          ("unk", w.add_unk_token_id), ("pad", w.add_pad_token_id)):
            if self.ids.get(name) is not None:
                add(self.ids[name])
        if self.add_bos is not None:
            w.add_add_bos_token(self.add_bos)
        if self.add_eos is not None:
            w.add_add_eos_token(self.add_eos)
        if self.add_space_prefix is not None:
            w.add_add_space_prefix(self.add_space_prefix)
        if isinstance(chat_template, str):
            w.add_chat_template(chat_template)
        elif isinstance(chat_template, list):  # named templates, as gguf-py writes them
            w.add_chat_template(chat_template)


# --- SentencePiece ---------------------------------------------------------------------------

def _sentencepiece_vocab(model_dir: Path, cfg: dict) -> _Vocab:
    import sentencepiece as spm

    path = model_dir / "tokenizer.model"
    data = path.read_bytes()
    try:
        sp = spm.SentencePieceProcessor(model_proto=data)
    except Exception as e:  # sentencepiece raises RuntimeError/OSError for a corrupt model
        raise VocabError(f"{path}: not a SentencePiece model ({e})") from None
    model_type, add_dummy_prefix = _sentencepiece_spec(data)
    if model_type not in (None, 2):  # 2 = BPE; llama.cpp converts others but tokenizes them as BPE
        warnings.warn(f"{path}: SentencePiece model type {model_type} is not BPE; tokenization will "
                      f"follow BPE merge rules (as llama.cpp does) and may differ from sentencepiece")
    v = _Vocab("llama")
    v.scores = []
    for i in range(sp.get_piece_size()):
        v.tokens.append(sp.id_to_piece(i))
        v.scores.append(float(sp.get_score(i)))
        if sp.is_unknown(i):
            t = UNKNOWN
        elif sp.is_control(i):
            t = CONTROL
        elif sp.is_unused(i):
            t = UNUSED
        elif sp.is_byte(i):
            t = BYTE
        else:
            t = NORMAL
        v.types.append(t)

    # Tokens added on top of the SentencePiece model (added_tokens.json, or tokenizer_config's
    # added_tokens_decoder): appended past its pieces, or re-using an unused piece, as llama.cpp.
    added: Dict[int, Tuple[str, bool]] = {}
    for tok, i in (read_json_optional(model_dir / "added_tokens.json") or {}).items():
        added[int(i)] = (tok, False)
    for i, d in (cfg.get("added_tokens_decoder") or {}).items():
        if isinstance(d, dict) and "content" in d:
            added[int(i)] = (d["content"], bool(d.get("special")))
    for i in sorted(added):
        tok, special = added[i]
        if i < len(v.tokens):
            if v.types[i] == UNUSED:
                v.tokens[i], v.types[i], v.scores[i] = tok, CONTROL if special else USER_DEFINED, -1000.0
            continue
        while len(v.tokens) < i:
            _append_pad(v)
        v.tokens.append(tok)
        v.types.append(CONTROL if special else USER_DEFINED)
        v.scores.append(-1000.0)

    v.ids = {"bos": _nonneg(sp.bos_id()), "eos": _nonneg(sp.eos_id()),
             "unk": _nonneg(sp.unk_id()), "pad": _nonneg(sp.pad_id())}
    _ids_from_config(v, cfg)
    v.add_bos = bool(cfg.get("add_bos_token", True))
    v.add_eos = bool(cfg.get("add_eos_token", False))
    v.add_space_prefix = add_dummy_prefix
    return v


def _sentencepiece_spec(data: bytes) -> Tuple[Optional[int], bool]:
    """(trainer_spec.model_type, normalizer_spec.add_dummy_prefix) read from the ModelProto bytes.

    The protobuf package is not a dependency, and these two fields are all we need: a minimal
    reader of the wire format (field 2 trainer_spec / field 3 model_type; field 3 normalizer_spec /
    field 3 add_dummy_prefix, default true)."""
    def fields(buf: bytes):
        i = 0
        while i < len(buf):
            key, i = _varint(buf, i)
            num, wt = key >> 3, key & 7
            if wt == 0:
                val, i = _varint(buf, i)
            elif wt == 1:
                val, i = buf[i:i + 8], i + 8
            elif wt == 2:
                n, i = _varint(buf, i)
                val, i = buf[i:i + n], i + n
            elif wt == 5:
                val, i = buf[i:i + 4], i + 4
            else:
                raise VocabError(f"tokenizer.model: unsupported protobuf wire type {wt}")
            if i > len(buf):
                raise VocabError("tokenizer.model: truncated protobuf")
            yield num, wt, val

    model_type, add_dummy_prefix = None, True
    for num, wt, val in fields(data):
        if num == 2 and wt == 2:
            for n2, w2, v2 in fields(val):
                if n2 == 3 and w2 == 0:
                    model_type = v2
        elif num == 3 and wt == 2:
            for n2, w2, v2 in fields(val):
                if n2 == 3 and w2 == 0:
                    add_dummy_prefix = bool(v2)
    return model_type, add_dummy_prefix


def _varint(buf: bytes, i: int) -> Tuple[int, int]:
    v, shift = 0, 0
    while True:
        if i >= len(buf) or shift > 63:
            raise VocabError("tokenizer.model: truncated protobuf varint")
        b = buf[i]
        i += 1
        v |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return v, i


# --- tokenizer.json (byte-level BPE) ----------------------------------------------------------

def _tokenizer_json_vocab(model_dir: Path, cfg: dict) -> _Vocab:
    path = model_dir / "tokenizer.json"
    tj = read_json_optional(path)
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise VocabError(f"{path}: unsupported tokenizer model {model.get('type')!r} (supported: byte-level BPE; "
                         f"SentencePiece models need tokenizer.model)")
    pre = _pre_tokenizer_name(tj.get("pre_tokenizer"), path)

    vocab: Dict[str, int] = model.get("vocab") or {}
    added = [a for a in (tj.get("added_tokens") or []) if isinstance(a, dict)]
    n = max([*vocab.values(), *(a["id"] for a in added)], default=-1) + 1
    tokens: List[Optional[str]] = [None] * n
    types = [NORMAL] * n
    for tok, i in vocab.items():
        tokens[i] = tok
    for a in added:
        tokens[a["id"]] = a["content"]
        types[a["id"]] = CONTROL if a.get("special") else USER_DEFINED
    v = _Vocab("gpt2", pre)
    for i, tok in enumerate(tokens):
        if tok is None:  # a hole in the ids: llama.cpp fills it with an unused placeholder
            tokens[i], types[i] = f"[PAD{i}]", UNUSED
    v.tokens, v.types = tokens, types

    merges = model.get("merges") or []
    v.merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    for k, m in enumerate(v.merges):
        if len(m.split(" ")) != 2:
            raise VocabError(f"{path}: merge {k} {m!r} is not two symbols")

    v.ids = {}
    _ids_from_config(v, cfg)
    tpl_bos, tpl_eos = _template_adds(tj.get("post_processor"), v)
    v.add_bos = bool(cfg["add_bos_token"]) if "add_bos_token" in cfg else tpl_bos
    v.add_eos = bool(cfg["add_eos_token"]) if "add_eos_token" in cfg else tpl_eos
    return v


def _pre_tokenizer_name(pt, path: Path) -> str:
    """llama.cpp's tokenizer.ggml.pre for a tokenizer.json pre_tokenizer, by its structure."""
    def is_byte_level(p, use_regex):
        return isinstance(p, dict) and p.get("type") == "ByteLevel" and bool(p.get("use_regex", True)) == use_regex

    steps = pt.get("pretokenizers") if isinstance(pt, dict) and pt.get("type") == "Sequence" else [pt]
    if len(steps) == 1 and is_byte_level(steps[0], True):
        return "gpt-2"
    if (len(steps) == 2 and isinstance(steps[0], dict) and steps[0].get("type") == "Digits"
            and steps[0].get("individual_digits") and is_byte_level(steps[1], True)):
        return "smollm"
    if (len(steps) == 2 and isinstance(steps[0], dict) and steps[0].get("type") == "Split"
            and is_byte_level(steps[1], False)):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        if regex in _SPLIT_REGEX_PRE and str(steps[0].get("behavior", "")).lower() == "isolated":
            return _SPLIT_REGEX_PRE[regex]
    raise VocabError(f"{path}: unsupported pre-tokenizer {json.dumps(pt)[:300]} (supported: ByteLevel (gpt-2), "
                     f"Digits+ByteLevel (smollm), the Llama-3 and Qwen2 Split regexes + ByteLevel)")


def _template_adds(post, v: _Vocab) -> Tuple[bool, bool]:
    """Whether the post-processor puts a special token before / after a single sequence (BOS / EOS);
    those tokens become the BOS / EOS ids when tokenizer_config.json names none."""
    procs = post.get("processors", []) if isinstance(post, dict) and post.get("type") == "Sequence" else [post]
    for p in procs:
        if not (isinstance(p, dict) and p.get("type") == "TemplateProcessing"):
            continue
        single = p.get("single") or []

        def special(item) -> Optional[int]:
            if isinstance(item, dict) and "SpecialToken" in item:
                name = item["SpecialToken"].get("id")
                return v.tokens.index(name) if name in v.tokens else None
            return None

        first = special(single[0]) if single else None
        last = special(single[-1]) if len(single) > 1 else None
        if first is not None and v.ids.get("bos") is None:
            v.ids["bos"] = first
        if last is not None and v.ids.get("eos") is None:
            v.ids["eos"] = last
        return first is not None, last is not None
    return False, False


# --- shared ------------------------------------------------------------------------------------

def _ids_from_config(v: _Vocab, cfg: dict) -> None:
    """bos/eos/unk/pad named in tokenizer_config.json override the model's own ids."""
    index = None
    for name in ("bos", "eos", "unk", "pad"):
        tok = cfg.get(f"{name}_token")
        if isinstance(tok, dict):
            tok = tok.get("content")
        if not isinstance(tok, str):
            continue
        if index is None:
            index = {t: i for i, t in enumerate(v.tokens)}
        if tok in index:
            v.ids[name] = index[tok]
        else:
            log.warning("tokenizer_config.json: %s_token %r is not in the vocabulary; ignored", name, tok)


def _pad_to_model_vocab(v: _Vocab, model_dir: Path) -> None:
    """The embedding may have more rows than the tokenizer has tokens; llama.cpp pads the vocabulary
    with unused "[PAD{i}]" tokens so that token ids and rows agree."""
    n = (read_json_optional(model_dir / "config.json") or {}).get("vocab_size")
    if not isinstance(n, int):
        return
    if n < len(v.tokens):
        raise VocabError(f"{model_dir}: the tokenizer has {len(v.tokens)} tokens but config.json's vocab_size is {n}")
    while len(v.tokens) < n:
        _append_pad(v)


def _append_pad(v: _Vocab) -> None:
    v.tokens.append(f"[PAD{len(v.tokens)}]")
    v.types.append(UNUSED)
    if v.scores is not None:
        v.scores.append(-1000.0)


def _check_special_ids(v: _Vocab) -> None:
    if len(set(v.tokens)) != len(v.tokens):
        seen = set()
        dup = next(t for t in v.tokens if t in seen or seen.add(t))
        raise VocabError(f"duplicate token {dup!r} in the vocabulary")
    for name, i in v.ids.items():
        if i is not None and not 0 <= i < len(v.tokens):
            raise VocabError(f"{name} token id {i} is outside the vocabulary of {len(v.tokens)} tokens")
    if v.add_bos and v.ids.get("bos") is None:
        raise VocabError("add_bos_token is true but the tokenizer has no BOS token")
    if v.add_eos and v.ids.get("eos") is None:
        raise VocabError("add_eos_token is true but the tokenizer has no EOS token")


def _chat_template(model_dir: Path, cfg: dict):
    tmpl = cfg.get("chat_template")
    if isinstance(tmpl, list):  # [{"name": ..., "template": ...}]: gguf-py writes default + named ones
        tmpl = [t for t in tmpl if isinstance(t, dict) and "name" in t and "template" in t] or None
    if tmpl is None and (model_dir / "chat_template.jinja").is_file():
        tmpl = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    if tmpl is None:
        tmpl = (read_json_optional(model_dir / "chat_template.json") or {}).get("chat_template")
    return tmpl


def _nonneg(i: int) -> Optional[int]:
    return i if i >= 0 else None
