"""Damaged model files raise a clear error naming what is damaged, never silent garbage.

NaN logits are no answer: greedy decoding would return the first id (often EOS, so '' with
finish reason "stop"), sampling a run of one token. So a non-finite norm is refused at load
(ValueError naming the tensor and the file), and non-finite logits raise RuntimeError naming the
first layer step whose output went non-finite. A header string that is not UTF-8 is a ValueError
naming the file and the key, not a UnicodeDecodeError about an error message.

The files are tiny random LLaMA checkpoints converted by prosparse-convert, then damaged in place
at the byte offsets gguf's GGUFReader reports.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

import prosparse_rt  # never skipped: without the runtime these tests must fail
from prosparse_rt import _core

import helpers_models as H

gguf = pytest.importorskip("gguf")
from prosparse_convert import convert  # noqa: E402


@pytest.fixture(scope="module")
def intact(tmp_path_factory):
    """{outtype: path} of one ReLU model, converted at f32 and f16."""
    d = tmp_path_factory.mktemp("damaged")
    _, hf = H.make_llama_dir(d / "hf", hidden_act="relu", seed=21)
    return {t: str(convert(hf, d / f"m_{t}.gguf", outtype=t, progress=False)) for t in ("f32", "f16")}


def _random_bytes(n: int) -> bytes:
    return np.random.default_rng(7).integers(0, 256, n, dtype=np.uint8).tobytes()


def _f32_fill(value):
    return lambda n: np.full(n // 4, value, np.float32).tobytes()


def _damage_tensor(src: str, dst: Path, name: str, fill) -> str:
    """A copy of src with tensor `name`'s data replaced by fill(n_bytes)."""
    tensor = {t.name: t for t in gguf.GGUFReader(src).tensors}[name]
    data = bytearray(Path(src).read_bytes())
    new = fill(int(tensor.n_bytes))
    assert len(new) == tensor.n_bytes
    data[tensor.data_offset:tensor.data_offset + tensor.n_bytes] = new
    dst.write_bytes(bytes(data))
    return str(dst)


def _damage_string(src: str, dst: Path, old: bytes, new: bytes) -> str:
    """A copy of src with the length-prefixed string `old` (a metadata key or string value)
    replaced by `new` of the same length."""
    assert len(old) == len(new)
    data = Path(src).read_bytes()
    needle = struct.pack("<Q", len(old)) + old
    assert data.count(needle) >= 1, old
    dst.write_bytes(data.replace(needle, struct.pack("<Q", len(new)) + new, 1))
    return str(dst)


def _string_value(src: str, dst: Path, key: str, value_bytes) -> str:
    """A copy of src with the string value of `key` replaced by value_bytes(old value)."""
    data = bytearray(Path(src).read_bytes())
    k = struct.pack("<Q", len(key)) + key.encode()
    at = data.index(k) + len(k)
    assert struct.unpack_from("<I", data, at)[0] == int(gguf.GGUFValueType.STRING)
    n = struct.unpack_from("<Q", data, at + 4)[0]
    start = at + 12
    new = value_bytes(bytes(data[start:start + n]))
    assert len(new) == n
    data[start:start + n] = new
    dst.write_bytes(bytes(data))
    return str(dst)


# ---------------------------------------------------------------------------------------------
# Control: the intact files run, so every error below comes from the damage.

@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_intact_file_generates_without_error(intact, outtype):
    with prosparse_rt.Model(intact[outtype], n_ctx=64) as m:
        assert np.isfinite(m.logits(m.tokenize("Hello world"))).all()
        m.generate("Hello world", max_tokens=4, temperature=0.0)


# ---------------------------------------------------------------------------------------------
# Non-finite norms: refused at load

@pytest.mark.parametrize("name, value", [
    ("blk.1.ffn_norm.weight", np.nan),
    ("blk.0.attn_norm.weight", np.inf),
    ("output_norm.weight", -np.inf),
])
def test_non_finite_norm_is_refused_at_load_naming_tensor_and_file(intact, tmp_path, name, value):
    path = _damage_tensor(intact["f32"], tmp_path / "bad_norm.gguf", name, _f32_fill(value))
    with pytest.raises(ValueError) as e:
        prosparse_rt.Model(path, n_ctx=64)
    msg = str(e.value)
    assert path in msg and f"'{name}'" in msg and "non-finite" in msg


def test_one_nan_in_a_norm_is_enough(intact, tmp_path):
    def one_nan(n):
        v = np.ones(n // 4, np.float32)
        v[17] = np.nan
        return v.tobytes()

    path = _damage_tensor(intact["f32"], tmp_path / "one_nan.gguf", "blk.0.ffn_norm.weight", one_nan)
    with pytest.raises(ValueError, match=r"'blk\.0\.ffn_norm\.weight'.*element 17"):
        prosparse_rt.Model(path, n_ctx=64)


# ---------------------------------------------------------------------------------------------
# Random bytes in a weight matrix: non-finite logits raise RuntimeError naming the layer step

@pytest.mark.parametrize("outtype, name, where", [
    ("f32", "blk.1.attn_q.weight", r"layer 1's attention output is non-finite.*blk\.1\.attn_"),
    ("f16", "blk.0.ffn_up.weight", r"layer 0's feed-forward output is non-finite.*blk\.0\.ffn_"),
    ("f32", "token_embd.weight", r"token embedding \(token_embd\.weight\)"),
    ("f32", "output.weight", r"output head \(output_norm\.weight, output\.weight\)"),
])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_random_bytes_in_a_weight_raise_runtime_error_naming_the_step(intact, tmp_path, outtype, name,
                                                                      where, temperature):
    path = _damage_tensor(intact[outtype], tmp_path / "bad_weight.gguf", name, _random_bytes)
    with prosparse_rt.Model(path, n_ctx=64) as m:
        with pytest.raises(RuntimeError, match=where) as e:
            m.generate("Hello world", max_tokens=8, temperature=temperature, seed=1)
    assert path in str(e.value)


def test_logits_of_a_damaged_file_raise_instead_of_returning_nan(intact, tmp_path):
    path = _damage_tensor(intact["f32"], tmp_path / "bad_weight.gguf", "blk.0.ffn_up.weight",
                          _f32_fill(np.nan))
    with prosparse_rt.Model(path, n_ctx=64, sparsity="dense") as m:
        with pytest.raises(RuntimeError, match=r"layer 0's feed-forward"):
            m.logits(m.tokenize("Hello world"))


def test_failed_eval_leaves_the_cache_as_it_was(intact, tmp_path):
    path = _damage_tensor(intact["f32"], tmp_path / "bad_weight.gguf", "blk.1.attn_v.weight",
                          _f32_fill(np.nan))
    core = _core.Model(path, n_ctx=64)
    with pytest.raises(RuntimeError, match="layer 1's attention"):
        core.eval([1, 5, 6])
    assert core.n_past == 0  # no NaN positions left for the next eval to attend to
    with pytest.raises(RuntimeError, match="layer 1's attention"):  # and the next one fails alike
        core.eval([1])
    assert core.n_past == 0


# ---------------------------------------------------------------------------------------------
# Header strings that are not UTF-8

@pytest.mark.parametrize("key", ["general.architecture", "tokenizer.ggml.model", "prosparse.activation"])
def test_header_string_not_utf8_names_file_and_key(intact, tmp_path, key):
    path = _string_value(intact["f32"], tmp_path / "bad_utf8.gguf", key, lambda v: b"\xff" + v[1:])
    with pytest.raises(ValueError) as e:
        _core.Model(path)
    assert not isinstance(e.value, UnicodeDecodeError)
    msg = str(e.value)
    assert path in msg and f"'{key}'" in msg and "not valid UTF-8" in msg


def test_unused_header_string_not_utf8_still_loads(intact, tmp_path):
    path = _string_value(intact["f32"], tmp_path / "bad_name.gguf", "general.name", lambda v: b"\xff" + v[1:])
    with prosparse_rt.Model(path, n_ctx=64) as m:
        assert "\ufffd" in m.metadata["general.name"]


def test_error_quoting_non_utf8_bytes_from_the_file_is_still_a_value_error(intact, tmp_path):
    # A byte token whose text is not <0xNN> is refused with its text quoted; text that is not
    # UTF-8 must come through escaped, not as a UnicodeDecodeError about the message.
    path = _damage_string(intact["f32"], tmp_path / "bad_token.gguf", b"<0x41>", b"<0x\xff\xfe>")
    with pytest.raises(ValueError) as e:
        _core.Model(path)
    assert not isinstance(e.value, UnicodeDecodeError)
    assert path in str(e.value) and r"<0x\xff\xfe>" in str(e.value)


# ---------------------------------------------------------------------------------------------
# Vocabulary

def test_nan_token_score_is_refused_naming_the_token(intact, tmp_path):
    # SentencePiece merges highest score first; NaN has no order, which would break the queue.
    src = intact["f32"]
    field = gguf.GGUFReader(src).fields["tokenizer.ggml.scores"]
    i = 300
    at = field.offset + sum(int(part.nbytes) for part in field.parts[:field.data[i]])
    data = bytearray(Path(src).read_bytes())
    assert struct.unpack_from("<f", data, at)[0] == pytest.approx(float(field.parts[field.data[i]][0]))
    struct.pack_into("<f", data, at, np.nan)
    path = tmp_path / "nan_score.gguf"
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"tokenizer\.ggml\.scores\[{i}\] is NaN") as e:
        _core.Tokenizer(str(path))
    assert str(path) in str(e.value)
