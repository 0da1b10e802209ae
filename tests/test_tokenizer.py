"""Tokenizers (cpp/src/tokenizer.cpp) and their export (convert/prosparse_convert/vocab.py).

References we did not write:
- SentencePiece: the `sentencepiece` package, on a BPE model trained here the way LLaMA's was
  (bpe, byte_fallback, identity normalization, whitespace kept, digits split), with BOS as LLaMA adds it.
- Byte-level BPE: SmolLM2's real tokenizer, as `transformers` builds it from the GGUF
  (AutoTokenizer.from_pretrained(dir, gguf_file=...)), and `tokenizers` BPE models trained here
  and exported through vocab.py.
"""

import io
import json
import random
import time
from pathlib import Path

import gguf
import numpy as np
import pytest

from prosparse_rt import _core
from prosparse_convert.vocab import VocabError, add_vocab

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "def f(x):\n\treturn x ** 2  # square\n\n\nclass A: pass\n",
    "    indented\twith\ttabs\n\n\n   \n",
    "  leading spaces and trailing   ",
    "12345678901234567890 and 3.14159, 2024-01-31, 1,000,000",
    "你好，世界！这是一个测试。",
    "emoji 😀👍🏽 family 👨\u200d👩\u200d👧 flags 🇫🇷",
    "café naïve résumé Ærøskøbing Ångström",
    "control \x00\x01\x07\x1b[31m red\x7f \x0b\x0c",
    "",
    " ",
    "\n",
    "it's we're I'LL they've DON'T",
    "\r\n\r\n  \n\t\t x",
    "\u00a0nbsp\u2003em\u3000ideographic\u2028line",
    "<s> </s> <unk> <|im_start|> not special here",
    "x" * 300,
    "Ελληνικά русский עברית العربية हिन्दी 한국어 日本語",
]


def _ids(text):
    return pytest.param(text, id=repr(text)[:30])


def _training_lines():
    from pydoc_data import topics

    text = "\n".join(topics.topics.values())
    return [line for line in text.splitlines() if line.strip()]


def _write_gguf(path: Path, fill) -> Path:
    """A GGUF with the metadata FILL writes and one tiny dummy tensor (the loader needs no weights)."""
    w = gguf.GGUFWriter(str(path), "llama")
    fill(w)
    w.add_tensor("dummy", np.zeros(1, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _export(model_dir: Path) -> Path:
    return _write_gguf(model_dir / "vocab.gguf", lambda w: add_vocab(w, model_dir))


def _best_ms(fn, n=5):
    best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


# --- SentencePiece ("llama") ------------------------------------------------------------------

CHAT_TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    """(sentencepiece processor, our tokenizer, gguf path) for a model trained like LLaMA's."""
    import sentencepiece

    d = tmp_path_factory.mktemp("spm")
    buf = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_training_lines()[:3000]), model_writer=buf,
        model_type="bpe", vocab_size=800, byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    (d / "tokenizer.model").write_bytes(buf.getvalue())
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "chat_template": CHAT_TEMPLATE}))
    path = _export(d)
    sp = sentencepiece.SentencePieceProcessor(model_proto=buf.getvalue())
    return sp, _core.Tokenizer(str(path)), path


@pytest.mark.parametrize("text", [_ids(t) for t in TEXTS])
def test_spm_ids_equal_sentencepiece_with_bos(spm, text):
    sp, tok, _ = spm
    assert tok.encode(text, True, False) == [sp.bos_id()] + sp.encode(text)


def test_spm_ids_equal_sentencepiece_on_a_long_document(spm):
    sp, tok, _ = spm
    doc = "\n".join(_training_lines()[5000:5200])  # text the model was not trained on
    assert tok.encode(doc, False, False) == sp.encode(doc)


def test_spm_unknown_characters_fall_back_to_byte_tokens(spm):
    sp, tok, _ = spm
    text = "\U0001D518\u0F00"  # characters the training text never had
    ids = tok.encode(text, False, False)
    assert ids == sp.encode(text)
    pieces = [sp.id_to_piece(i) for i in ids]
    assert sum(p.startswith("<0x") for p in pieces) == len(text.encode()), pieces


@pytest.mark.parametrize("text", [_ids(t) for t in TEXTS])
def test_spm_decode_round_trips_after_bos(spm, text):
    # llama-cpp-python's detokenize drops the space prefix when the ids start with BOS.
    _, tok, _ = spm
    ids = tok.encode(text, True, False)
    assert tok.decode(ids) == text.encode()
    assert b"".join(tok.token_to_piece(i) for i in ids[1:]) == (b" " + text.encode() if text else b"")


def test_spm_decode_keeps_the_space_prefix_without_bos(spm):
    _, tok, _ = spm
    assert tok.decode(tok.encode("Hello", False, False)) == b" Hello"


def test_spm_metadata_from_vocab_py(spm):
    sp, tok, path = spm
    assert (tok.n_vocab, tok.bos, tok.eos, tok.add_bos_default) == (sp.get_piece_size(), 1, 2, True)
    assert tok.is_eog(tok.eos) and not tok.is_eog(tok.bos)
    r = gguf.GGUFReader(str(path))
    f = {k: v.contents() for k, v in r.fields.items() if k.startswith("tokenizer.") and k != "tokenizer.ggml.tokens"}
    assert f["tokenizer.ggml.model"] == "llama"
    assert f["tokenizer.chat_template"] == CHAT_TEMPLATE
    assert f["tokenizer.ggml.add_space_prefix"] is True
    assert f["tokenizer.ggml.unknown_token_id"] == 0
    types = f["tokenizer.ggml.token_type"]
    assert types[:3] == [2, 3, 3]  # <unk> unknown, <s> </s> control
    assert sum(t == 6 for t in types) == 256  # the byte-fallback tokens
    np.testing.assert_allclose(f["tokenizer.ggml.scores"], [sp.get_score(i) for i in range(sp.get_piece_size())])


def test_spm_control_tokens_parse_only_when_asked(spm):
    # llama.cpp: control tokens in the text are cut out when parse_special; the text after one
    # gets the space prefix again, like text at the start.
    sp, tok, _ = spm
    assert tok.encode("<s>hi</s>", False, True) == [1] + sp.encode("hi") + [2]
    assert tok.encode("<s>hi</s>", False, False) == sp.encode("<s>hi</s>")


def test_spm_invalid_utf8_round_trips_through_byte_fallback(spm):
    _, tok, _ = spm
    rng = random.Random(0)
    for _ in range(2000):
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 24)))
        ids = _core._testing.encode_bytes(tok, data, True, False)
        assert all(0 <= i < tok.n_vocab for i in ids)
        assert tok.decode(ids) == data


def test_spm_speed_a_few_kb_well_under_a_few_ms(spm):
    _, tok, _ = spm
    doc = "\n".join(_training_lines()[4000:4100])
    assert len(doc) > 5000
    assert _best_ms(lambda: tok.encode(doc, True, False)) < 10.0


# --- SmolLM2 ("gpt2", pre "smollm") -----------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    """(our tokenizer, transformers' tokenizer built from the same GGUF)."""
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    p = Path(smollm2_path)
    hf = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    # transformers' GGUF loader ignores tokenizer.ggml.pre = "smollm" and gives a plain GPT-2
    # ByteLevel pre-tokenizer; SmolLM2's own tokenizer.json (and llama.cpp's "smollm" regexes)
    # isolate every digit first. We restore that step so the reference is SmolLM2's tokenizer. (On
    # this vocabulary both give the same ids, since no merge joins a digit to anything, but the
    # reference should not rely on that.)
    assert "ByteLevel" in repr(hf.backend_tokenizer.pre_tokenizer)
    hf.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return _core.Tokenizer(str(p)), hf


@pytest.mark.parametrize("text", [_ids(t) for t in TEXTS])
def test_smollm2_ids_equal_transformers(smollm2, text):
    # Plain text on both sides: transformers cuts special tokens out unless split_special_tokens.
    tok, hf = smollm2
    ref = hf(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert tok.encode(text, False, False) == ref


def test_smollm2_ids_equal_transformers_on_a_long_document(smollm2):
    tok, hf = smollm2
    doc = "\n".join(_training_lines()[5000:5200])
    assert tok.encode(doc, False, False) == hf.encode(doc, add_special_tokens=False)


def test_smollm2_special_tokens_parse_to_their_ids(smollm2):
    tok, hf = smollm2
    text = "<|im_start|>user\nHi<|im_end|>"
    ids = tok.encode(text, False, True)
    assert ids == hf.encode(text, add_special_tokens=False)
    assert ids[0] == 1 and ids[-1] == 2 and ids[1:-1] == hf.encode("user\nHi", add_special_tokens=False)


def test_smollm2_special_tokens_are_plain_text_unless_parsed(smollm2):
    tok, hf = smollm2
    text = "<|im_start|>user\nHi<|im_end|>"
    ids = tok.encode(text, False, False)
    assert ids == hf(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert 1 not in ids and 2 not in ids


@pytest.mark.parametrize("text", [_ids(t) for t in TEXTS])
def test_smollm2_decode_round_trips(smollm2, text):
    tok, _ = smollm2
    ids = tok.encode(text, False, False)
    assert tok.decode(ids) == text.encode()
    assert b"".join(tok.token_to_piece(i) for i in ids) == text.encode()


def test_smollm2_pieces_may_be_partial_utf8(smollm2):
    tok, _ = smollm2
    ids = tok.encode("😀", False, False)
    assert len(ids) > 1  # the emoji's 4 bytes span several tokens
    assert b"".join(tok.token_to_piece(i) for i in ids) == "😀".encode()


def test_smollm2_special_ids_and_end_of_generation(smollm2):
    tok, _ = smollm2
    assert (tok.n_vocab, tok.bos, tok.eos, tok.add_bos_default) == (49152, 1, 2, False)
    # llama.cpp's EOG set: EOS <|im_end|>, <|endoftext|>, and the FIM repo token <reponame>.
    assert [i for i in range(17) if tok.is_eog(i)] == [0, 2, 4]
    assert tok.decode([1, 2]) == b"" and tok.decode([1, 2], render_special=True) == b"<|im_start|><|im_end|>"


def test_smollm2_add_bos_prepends_bos(smollm2):
    tok, _ = smollm2
    assert tok.encode("Hi", True, False) == [1] + tok.encode("Hi", False, False)


def test_smollm2_invalid_utf8_never_crashes(smollm2, smollm2_path):
    # Bytes outside the vocabulary's alphabet (SmolLM2 has no token for 0xFF, which valid UTF-8
    # never contains) are dropped, as llama.cpp and `tokenizers` do; everything else survives.
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tok, _ = smollm2
    vocab = set(gguf.GGUFReader(smollm2_path).fields["tokenizer.ggml.tokens"].contents())
    missing = {b for b, ch in bytes_to_unicode().items() if ch not in vocab}
    assert 0xFF in missing
    rng = random.Random(1)
    for _ in range(2000):
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 24)))
        ids = _core._testing.encode_bytes(tok, data, False, rng.random() < 0.5)
        assert all(0 <= i < tok.n_vocab for i in ids)
        assert tok.decode(ids) == bytes(b for b in data if b not in missing)


def test_smollm2_speed_a_few_kb_well_under_a_few_ms(smollm2):
    tok, _ = smollm2
    doc = "\n".join(_training_lines()[4000:4100])
    assert _best_ms(lambda: tok.encode(doc, False, False)) < 10.0


# --- vocab.py round trip through `tokenizers` ---------------------------------------------------

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_tokenizer(kind):
    from tokenizers import Regex, pre_tokenizers as pt

    if kind == "gpt-2":
        return pt.ByteLevel(add_prefix_space=False, use_regex=True)
    if kind == "smollm":
        return pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False, use_regex=True)])
    regex = {"llama-bpe": LLAMA3_SPLIT, "qwen2": QWEN2_SPLIT}[kind]
    return pt.Sequence([pt.Split(Regex(regex), behavior="isolated"),
                        pt.ByteLevel(add_prefix_space=False, use_regex=False)])


@pytest.fixture(scope="module", params=["gpt-2", "smollm", "llama-bpe", "qwen2"])
def trained_bpe(request, tmp_path_factory):
    """(kind, tokenizers.Tokenizer, our tokenizer, gguf path): a byte-level BPE trained here on offline
    text, saved as tokenizer.json and exported through vocab.py."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    kind = request.param
    bpe = Tokenizer(models.BPE(ignore_merges=(kind == "llama-bpe")))
    bpe.pre_tokenizer = _pre_tokenizer(kind)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1200, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(_training_lines()[:4000], trainer=trainer)
    bpe.add_tokens(["<think>"])  # user-defined: matched whole even when specials are not parsed
    d = tmp_path_factory.mktemp(kind)
    bpe.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "add_bos_token": False}))
    path = _export(d)
    return kind, bpe, _core.Tokenizer(str(path)), path


@pytest.mark.parametrize("text", [_ids(t) for t in TEXTS + ["<think>reason</think> <|im_end|>"]])
def test_exported_bpe_ids_equal_tokenizers(trained_bpe, text):
    _, bpe, tok, _ = trained_bpe
    # `tokenizers` always matches added tokens (special or not) whole; llama.cpp matches control
    # tokens only when asked, so compare with special parsing on.
    assert tok.encode(text, False, True) == bpe.encode(text, add_special_tokens=False).ids


def test_exported_bpe_ids_equal_tokenizers_on_a_long_document(trained_bpe):
    _, bpe, tok, _ = trained_bpe
    doc = "\n".join(_training_lines()[5000:5300])
    assert tok.encode(doc, False, False) == bpe.encode(doc, add_special_tokens=False).ids


def test_exported_bpe_decode_round_trips(trained_bpe):
    _, _, tok, _ = trained_bpe
    for text in TEXTS:
        assert tok.decode(tok.encode(text, False, False)) == text.encode()


def test_exported_bpe_metadata(trained_bpe):
    kind, bpe, tok, path = trained_bpe
    r = gguf.GGUFReader(str(path))
    f = {k: r.fields[k].contents() for k in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.eos_token_id")}
    assert f == {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": kind,
                 "tokenizer.ggml.eos_token_id": bpe.token_to_id("<|endoftext|>")}
    types = r.fields["tokenizer.ggml.token_type"].contents()
    assert types[bpe.token_to_id("<|im_start|>")] == 3 and types[bpe.token_to_id("<think>")] == 4
    assert tok.n_vocab == bpe.get_vocab_size() and not tok.add_bos_default
    assert tok.is_eog(bpe.token_to_id("<|im_end|>")) and tok.is_eog(bpe.token_to_id("<|endoftext|>"))


def test_user_defined_tokens_match_even_without_special_parsing(trained_bpe):
    _, bpe, tok, _ = trained_bpe
    expected = bpe.encode("a").ids + [bpe.token_to_id("<think>")] + bpe.encode("b").ids
    assert tok.encode("a<think>b", False, False) == expected


# --- refusals: clear errors, never a crash ------------------------------------------------------

def test_vocab_py_refuses_an_unknown_pre_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(VocabError, match="pre-tokenizer.*Whitespace"):
        add_vocab(gguf.GGUFWriter(str(tmp_path / "x.gguf"), "llama"), tmp_path)


def test_vocab_py_refuses_a_non_bpe_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordPiece({"[UNK]": 0}, unk_token="[UNK]")).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(VocabError, match="WordPiece"):
        add_vocab(gguf.GGUFWriter(str(tmp_path / "x.gguf"), "llama"), tmp_path)


def _gpt2_keys(pre="gpt-2", tokens=("a", "b", "ab"), merges=("a b",), types=None, **ids):
    def fill(w):
        w.add_tokenizer_model("gpt2")
        if pre is not None:
            w.add_tokenizer_pre(pre)
        w.add_token_list(list(tokens))
        w.add_token_types(list(types) if types is not None else [1] * len(tokens))
        w.add_token_merges(list(merges))
        for k, v in ids.items():
            w.add_uint32(f"tokenizer.ggml.{k}", v)
    return fill


def test_a_minimal_byte_level_vocabulary_works(tmp_path):
    tok = _core.Tokenizer(str(_write_gguf(tmp_path / "v.gguf", _gpt2_keys())))
    assert tok.encode("abba", False, False) == [2, 1, 0]  # "ab" "b" "a"
    assert tok.decode([2, 1, 0]) == b"abba"


@pytest.mark.parametrize("fill, message", [
    (_gpt2_keys(pre="no-such-pre"), "no-such-pre"),
    (_gpt2_keys(types=[1, 1]), "token_type"),
    (_gpt2_keys(tokens=("a", "b", "a")), "duplicate token"),
    (_gpt2_keys(merges=("ab",)), "merge 0"),
    (_gpt2_keys(eos_token_id=7), "eos_token_id"),
    (_gpt2_keys(types=[1, 1, 9]), "token type 9"),
    (lambda w: w.add_token_list(["a"]), "tokenizer.ggml.model"),
    (lambda w: w.add_tokenizer_model("t5"), "t5"),
], ids=["unknown-pre", "types-length", "duplicate", "bad-merge", "eos-range", "bad-type", "no-model", "unsupported-model"])
def test_inconsistent_tokenizer_metadata_is_a_clear_error(tmp_path, fill, message):
    with pytest.raises(ValueError, match=message):
        _core.Tokenizer(str(_write_gguf(tmp_path / "bad.gguf", fill)))
