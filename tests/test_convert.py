"""prosparse-convert: files read back with the gguf package's own GGUFReader and dequantizer, compared
with the Hugging Face weights they came from (docs/design.md "The GGUF contract"; llama.cpp's key/tensor names
and its Q/K permutation)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

import helpers_models as H
from prosparse_convert import ConvertError, convert
from prosparse_convert.cli import main as cli_main


# ---------------------------------------------------------------- helpers

def read(path):
    r = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in r.fields.items()}
    tensors = {t.name: t for t in r.tensors}
    return fields, tensors


def as_f32(t) -> np.ndarray:
    """A GGUF tensor as float32 in numpy order, dequantized by the gguf package."""
    return dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)]).astype(np.float32)


def hf(model, name) -> np.ndarray:
    return model.state_dict()[name].detach().float().numpy()


def unpermute_llamacpp(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convention stated directly: within each head, stored rows 2j and 2j+1 are HF rows
    j and j + head_dim/2 (HF rotates halves, llama.cpp rotates adjacent pairs)."""
    hd = w.shape[0] // n_head
    out = np.empty_like(w)
    for h in range(n_head):
        for j in range(hd // 2):
            out[h * hd + j] = w[h * hd + 2 * j]
            out[h * hd + j + hd // 2] = w[h * hd + 2 * j + 1]
    return out


def conv(src, out, **kw):
    kw.setdefault("progress", False)
    return convert(src, out, **kw)


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def relu_gqa(tmp_path_factory):
    d = tmp_path_factory.mktemp("relu_gqa")
    model, path = H.make_llama_dir(d / "hf", hidden_act="relu", n_head=4, n_head_kv=2, seed=1)
    out = conv(path, d / "f32.gguf", outtype="f32")
    return model, path, out


@pytest.fixture(scope="module")
def silu_tied(tmp_path_factory):
    d = tmp_path_factory.mktemp("silu_tied")
    model, path = H.make_llama_dir(d / "hf", hidden_act="silu", tied=True, seed=2)
    out = conv(path, d / "f32.gguf", outtype="f32")
    return model, path, out


# ---------------------------------------------------------------- metadata

def test_llama_keys_follow_llama_cpp_names_and_config(relu_gqa):
    model, path, out = relu_gqa
    f, _ = read(out)
    c = model.config
    assert f["general.architecture"] == "llama"
    assert f["general.name"] == "hf"
    assert f["general.file_type"] == int(gguf.LlamaFileType.ALL_F32)
    assert f["llama.context_length"] == c.max_position_embeddings
    assert f["llama.embedding_length"] == c.hidden_size
    assert f["llama.block_count"] == c.num_hidden_layers
    assert f["llama.feed_forward_length"] == c.intermediate_size
    assert f["llama.attention.head_count"] == c.num_attention_heads
    assert f["llama.attention.head_count_kv"] == c.num_key_value_heads
    assert f["llama.rope.dimension_count"] == c.hidden_size // c.num_attention_heads
    assert f["llama.rope.freq_base"] == pytest.approx(10000.0)
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(c.rms_norm_eps)
    assert f["llama.vocab_size"] == H.N_VOCAB
    assert "llama.rope.scaling.type" not in f
    assert f["prosparse.activation"] == "relu"
    assert f["prosparse.activation_threshold"] == 0.0


def test_silu_model_says_silu_and_has_no_threshold(silu_tied):
    f, _ = read(silu_tied[2])
    assert f["prosparse.activation"] == "silu"
    assert "prosparse.activation_threshold" not in f


def test_fatrelu_threshold_comes_from_hidden_act_param(tmp_path):
    _, path = H.make_fatrelu_dir(tmp_path / "hf", 0.05)
    f, t = read(conv(path, tmp_path / "o.gguf", outtype="f32"))
    assert f["prosparse.activation"] == "fatrelu"
    assert f["prosparse.activation_threshold"] == pytest.approx(0.05)
    assert "blk.0.ffn_down_t.weight" in t


def test_linear_rope_scaling_is_written(tmp_path):
    _, path = H.make_llama_dir(tmp_path / "hf", rope_scaling={"rope_type": "linear", "factor": 4.0})
    f, _ = read(conv(path, tmp_path / "o.gguf", outtype="f32"))
    assert f["llama.rope.scaling.type"] == "linear"
    assert f["llama.rope.scaling.factor"] == pytest.approx(4.0)


def test_chat_template_comes_from_tokenizer_config(relu_gqa):
    f, _ = read(relu_gqa[2])
    assert f["tokenizer.chat_template"] == H.CHAT_TEMPLATE


# ---------------------------------------------------------------- tensors

def test_tensor_names_and_shapes(relu_gqa):
    model, _, out = relu_gqa
    _, t = read(out)
    c = model.config
    n, ff, kv = c.hidden_size, c.intermediate_size, c.num_key_value_heads * 16
    want = {"token_embd.weight": (H.N_VOCAB, n), "output_norm.weight": (n,), "output.weight": (H.N_VOCAB, n)}
    for i in range(c.num_hidden_layers):
        want.update({
            f"blk.{i}.attn_norm.weight": (n,), f"blk.{i}.attn_q.weight": (n, n),
            f"blk.{i}.attn_k.weight": (kv, n), f"blk.{i}.attn_v.weight": (kv, n),
            f"blk.{i}.attn_output.weight": (n, n), f"blk.{i}.ffn_norm.weight": (n,),
            f"blk.{i}.ffn_gate.weight": (ff, n), f"blk.{i}.ffn_up.weight": (ff, n),
            f"blk.{i}.ffn_down_t.weight": (ff, n),   # neuron-major, instead of ffn_down
        })
    assert {k: as_f32(v).shape for k, v in t.items()} == want


def test_q_and_k_are_permuted_like_llama_cpp(relu_gqa):
    model, _, out = relu_gqa
    _, t = read(out)
    for i in range(2):
        p = f"model.layers.{i}.self_attn."
        np.testing.assert_array_equal(unpermute_llamacpp(as_f32(t[f"blk.{i}.attn_q.weight"]), 4),
                                      hf(model, p + "q_proj.weight"))
        np.testing.assert_array_equal(unpermute_llamacpp(as_f32(t[f"blk.{i}.attn_k.weight"]), 2),
                                      hf(model, p + "k_proj.weight"))
        np.testing.assert_array_equal(as_f32(t[f"blk.{i}.attn_v.weight"]), hf(model, p + "v_proj.weight"))


def test_other_tensors_equal_hf_weights(relu_gqa):
    model, _, out = relu_gqa
    _, t = read(out)
    pairs = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    for i in range(2):
        p = f"model.layers.{i}."
        pairs.update({f"blk.{i}.attn_norm.weight": p + "input_layernorm.weight",
                      f"blk.{i}.attn_output.weight": p + "self_attn.o_proj.weight",
                      f"blk.{i}.ffn_norm.weight": p + "post_attention_layernorm.weight",
                      f"blk.{i}.ffn_gate.weight": p + "mlp.gate_proj.weight",
                      f"blk.{i}.ffn_up.weight": p + "mlp.up_proj.weight"})
    for g, h in pairs.items():
        np.testing.assert_array_equal(as_f32(t[g]), hf(model, h), err_msg=g)


def test_relu_down_projection_is_stored_transposed_as_ffn_down_t(relu_gqa):
    model, _, out = relu_gqa
    _, t = read(out)
    for i in range(2):
        assert f"blk.{i}.ffn_down.weight" not in t
        np.testing.assert_array_equal(as_f32(t[f"blk.{i}.ffn_down_t.weight"]),
                                      hf(model, f"model.layers.{i}.mlp.down_proj.weight").T)


def test_silu_keeps_ffn_down_and_tied_head_has_no_output(silu_tied):
    model, _, out = silu_tied
    _, t = read(out)
    assert "output.weight" not in t and "blk.0.ffn_down_t.weight" not in t
    np.testing.assert_array_equal(as_f32(t["blk.1.ffn_down.weight"]), hf(model, "model.layers.1.mlp.down_proj.weight"))
    np.testing.assert_array_equal(as_f32(t["token_embd.weight"]), hf(model, "model.embed_tokens.weight"))


@pytest.mark.parametrize("outtype,qtype", [("f16", T.F16), ("bf16", T.BF16), ("q8_0", T.Q8_0), ("q4_0", T.Q4_0)])
def test_outtype_matrices_are_quantized_by_the_gguf_package_norms_stay_f32(relu_gqa, tmp_path, outtype, qtype):
    model, path, _ = relu_gqa
    f, t = read(conv(path, tmp_path / "o.gguf", outtype=outtype))
    assert f["general.file_type"] == int({"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                                          "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[outtype])
    for name, ten in t.items():
        assert ten.tensor_type == (T.F32 if len(ten.shape) == 1 else qtype), name
    # Bytes identical to the reference quantizer on the same (un-transposed) weights.
    ref = quantize(hf(model, "model.layers.0.mlp.gate_proj.weight"), qtype)
    np.testing.assert_array_equal(np.asarray(t["blk.0.ffn_gate.weight"].data).reshape(ref.shape).view(ref.dtype), ref)


def test_rows_that_do_not_fill_quant_blocks_fall_back_to_f16(tmp_path):
    # hidden 48: every matrix row holds 48 weights, not a multiple of 32; n_ff 96 rows (ffn_down_t)
    # hold 48 too. token_embd [384, 48] likewise.
    _, path = H.make_llama_dir(tmp_path / "hf", hidden_act="relu", n_embd=48, n_ff=96, n_head=4, n_head_kv=4)
    _, t = read(conv(path, tmp_path / "o.gguf", outtype="q4_0"))
    assert t["blk.0.ffn_gate.weight"].tensor_type == T.F16
    assert t["blk.0.ffn_down_t.weight"].tensor_type == T.F16
    assert t["blk.0.attn_norm.weight"].tensor_type == T.F32


# ---------------------------------------------------------------- input forms

def _all_tensors_equal(a, b):
    _, ta = read(a)
    _, tb = read(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        np.testing.assert_array_equal(as_f32(ta[k]), as_f32(tb[k]), err_msg=k)


def test_sharded_safetensors_convert_like_a_single_file(relu_gqa, tmp_path):
    model, path, out = relu_gqa
    shard_dir = tmp_path / "hf"
    model.save_pretrained(shard_dir, max_shard_size="40KB")
    assert (shard_dir / "model.safetensors.index.json").is_file()
    for n in ("tokenizer.model", "tokenizer_config.json"):
        (shard_dir / n).write_bytes((path / n).read_bytes())
    _all_tensors_equal(conv(shard_dir, tmp_path / "o.gguf", outtype="f32"), out)


def test_pytorch_bin_checkpoint_converts_like_safetensors(relu_gqa, tmp_path):
    model, path, out = relu_gqa
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_bytes((path / "config.json").read_bytes())
    torch.save(model.state_dict(), d / "pytorch_model.bin")
    _all_tensors_equal(conv(d, tmp_path / "o.gguf", outtype="f32"), out)


def test_bf16_checkpoint_widens_exactly(tmp_path):
    # torch's own bf16 -> f32 conversion is the reference.
    model, path = H.make_llama_dir(tmp_path / "hf", seed=3)
    model16 = model.to(torch.bfloat16)
    model16.save_pretrained(tmp_path / "hf16")
    _, t = read(conv(tmp_path / "hf16", tmp_path / "o.gguf", outtype="f32"))
    np.testing.assert_array_equal(as_f32(t["blk.0.ffn_up.weight"]), hf(model16, "model.layers.0.mlp.up_proj.weight"))


def test_hub_id_is_fetched_with_huggingface_hub_and_named_after_the_repository(relu_gqa, tmp_path, monkeypatch):
    import huggingface_hub

    _, path, _ = relu_gqa
    asked = {}

    def snapshot(repo_id, **kw):
        asked["repo_id"] = repo_id
        return str(path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    f, _ = read(conv("someone/tiny-relu", tmp_path / "o.gguf", outtype="f32"))
    assert asked["repo_id"] == "someone/tiny-relu"
    assert f["general.name"] == "tiny-relu"


def test_hub_id_that_cannot_be_fetched_is_a_clear_error(tmp_path, monkeypatch):
    import huggingface_hub

    def offline(**kw):
        raise OSError("no network")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ConvertError, match="could not fetch 'someone/some-model'.*no network"):
        conv("someone/some-model", tmp_path / "o.gguf")


# ---------------------------------------------------------------- bad input

@pytest.fixture
def hf_dir(tmp_path):
    _, path = H.make_llama_dir(tmp_path / "hf", hidden_act="relu", seed=4)
    return path


@pytest.mark.parametrize("changes,message", [
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}}, "rope_scaling type 'yarn'"),
    ({"rope_parameters": None, "rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling type 'dynamic'"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"head_dim": 32}, "head_dim 32"),
    ({"hidden_act": "gelu"}, "activation: hidden_act 'gelu'"),
    ({"hidden_act": "fatrelu"}, "hidden_act_param"),
    ({"architectures": ["GPT2LMHeadModel"]}, "unsupported architecture: GPT2LMHeadModel"),
    ({"intermediate_size": 256}, r"shape \[128, 64\], but config.json implies \[256, 64\]"),
    ({"num_hidden_layers": 3}, "missing tensor 'model.layers.2"),
    ({"num_hidden_layers": 1}, "unexpected tensor 'model.layers.1"),
    ({"tie_word_embeddings": False, "vocab_size": 500}, "model.embed_tokens.weight"),
])
def test_unsupported_or_inconsistent_config_is_refused_by_name(hf_dir, tmp_path, changes, message):
    H.edit_config(hf_dir, **changes)
    out = tmp_path / "o.gguf"
    with pytest.raises(ConvertError, match=message):
        conv(hf_dir, out)
    assert not out.exists()
    assert not list(tmp_path.glob("o.gguf.tmp-*"))


def test_missing_config_json(hf_dir, tmp_path):
    (hf_dir / "config.json").unlink()
    with pytest.raises(ConvertError, match="missing file: .*config.json"):
        conv(hf_dir, tmp_path / "o.gguf")


@pytest.mark.parametrize("name", ["config.json", "tokenizer_config.json"])
def test_unreadable_json_is_refused_by_name(hf_dir, tmp_path, name):
    (hf_dir / name).write_text("{not json")
    with pytest.raises(ConvertError, match=f"cannot read .*{name}: Expecting property name"):
        conv(hf_dir, tmp_path / "o.gguf")
    assert not list(tmp_path.glob("o.gguf*"))


def test_missing_weights(hf_dir, tmp_path):
    (hf_dir / "model.safetensors").unlink()
    with pytest.raises(ConvertError, match="no \\*.safetensors or pytorch_model"):
        conv(hf_dir, tmp_path / "o.gguf")


def test_missing_input_path(tmp_path):
    with pytest.raises(ConvertError, match="input not found"):
        conv(str(tmp_path / "nope" / "x"), tmp_path / "o.gguf")


def test_untied_config_without_lm_head(tmp_path):
    model, path = H.make_llama_dir(tmp_path / "hf", tied=True)
    H.edit_config(path, tie_word_embeddings=False)
    with pytest.raises(ConvertError, match="missing tensor 'lm_head.weight'"):
        conv(path, tmp_path / "o.gguf")


def test_truncated_safetensors_is_refused(hf_dir, tmp_path):
    p = hf_dir / "model.safetensors"
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(ConvertError, match="offsets .* file size"):
        conv(hf_dir, tmp_path / "o.gguf")


def test_failure_while_writing_removes_the_temp_file_and_keeps_the_old_output(hf_dir, tmp_path):
    # A NaN in the last layer is found only after the header and earlier tensors are written.
    from safetensors.torch import load_file, save_file
    sd = load_file(str(hf_dir / "model.safetensors"))
    sd["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(sd, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "o.gguf"
    out.write_bytes(b"previous file")
    with pytest.raises(ConvertError, match="blk.1.ffn_up.weight: tensor contains NaN"):
        conv(hf_dir, out)
    assert out.read_bytes() == b"previous file"
    assert not list(tmp_path.glob("o.gguf.tmp-*"))


def test_interrupt_while_writing_removes_the_temp_file(hf_dir, tmp_path, monkeypatch):
    from prosparse_convert import quant
    calls = []
    real = quant.encode

    def interrupted(a, q):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(a, q)
    monkeypatch.setattr(quant, "encode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        conv(hf_dir, tmp_path / "o.gguf")
    assert os.listdir(tmp_path) == ["hf"]


# A prosparse-convert process that writes slowly (every tensor's encoding waits 0.3 s), so that it can
# be signalled while OUT.tmp-<pid> is half-written.
_SLOW_CONVERT = """
import sys, time
from prosparse_convert import cli, quant
encode = quant.encode
quant.encode = lambda a, q: (time.sleep(0.3), encode(a, q))[1]
sys.exit(cli.main(sys.argv[1:]))
"""


def _signal_while_writing(hf_dir, out, signum):
    """(exit code, stderr) of a conversion to `out` signalled once its temporary file exists."""
    import signal
    import subprocess
    import sys
    import time

    # a shell without job control starts background jobs with SIGINT ignored, and Python keeps an
    # ignored SIGINT ignored: give the child the default, as a terminal would
    p = subprocess.Popen([sys.executable, "-c", _SLOW_CONVERT, str(hf_dir), str(out), "--no-progress"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    tmp = out.with_name(f"{out.name}.tmp-{p.pid}")
    deadline = time.monotonic() + 60
    while not tmp.exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert tmp.exists(), "the conversion never started writing"
    p.send_signal(signum)
    _, err = p.communicate(timeout=60)
    return p.returncode, err


@pytest.mark.parametrize("signame,code,line", [("SIGTERM", 143, "prosparse-convert: terminated"),
                                               ("SIGINT", 130, "prosparse-convert: interrupted")])
def test_a_signalled_conversion_removes_its_temp_file_and_says_so_in_one_line(hf_dir, tmp_path, signame,
                                                                              code, line):
    import signal

    out = tmp_path / "o.gguf"
    rc, err = _signal_while_writing(hf_dir, out, getattr(signal, signame))
    assert rc == code
    assert err.strip() == line  # no traceback
    assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_next_run_removes_temp_files_of_dead_writers_and_keeps_live_ones(hf_dir, tmp_path):
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # reaped: its pid names no process now
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out = tmp_path / "o.gguf"
        stale, busy = (out.with_name(f"o.gguf.tmp-{p.pid}") for p in (dead, live))
        other = tmp_path / "other.gguf.tmp-1234567"  # another output's: not ours to touch
        for f in (stale, busy, other):
            f.write_bytes(b"half-written")
        assert cli_main([str(hf_dir), str(out), "--no-progress"]) == 0
        assert not stale.exists()
        assert busy.read_bytes() == b"half-written"
        assert other.exists()
        assert out.is_file()
    finally:
        live.kill()
        live.wait()


def test_cli_prints_the_error_and_exits_1(hf_dir, tmp_path, capsys):
    H.edit_config(hf_dir, hidden_act="gelu")
    assert cli_main([str(hf_dir), str(tmp_path / "o.gguf"), "--no-progress"]) == 1
    assert "error: unsupported activation: hidden_act 'gelu'" in capsys.readouterr().err


def test_cli_converts(hf_dir, tmp_path):
    assert cli_main([str(hf_dir), str(tmp_path / "o.gguf"), "--outtype", "q8_0", "--no-progress"]) == 0
    f, _ = read(tmp_path / "o.gguf")
    assert f["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q8_0)


# ---------------------------------------------------------------- sparse extras: predictors, neuron statistics

def _powerinfer_dirs(d: Path, n_layer=2, n_embd=64, n_ff=128, ranks=(32, 48), seed=5):
    """PowerInfer's layout: model_{i}.pt {fc1.weight [R, n_embd], fc2.weight [n_ff, R]} and
    activation_{i}.pt neuron counts."""
    g = torch.Generator().manual_seed(seed)
    (d / "pred").mkdir(parents=True)
    (d / "act").mkdir()
    for i in range(n_layer):
        torch.save({"fc1.weight": torch.randn(ranks[i], n_embd, generator=g),
                    "fc2.weight": torch.randn(n_ff, ranks[i], generator=g)}, d / "pred" / f"model_{i}.pt")
        torch.save(torch.randint(0, 1000, (n_ff,), generator=g), d / "act" / f"activation_{i}.pt")
    return d / "pred", d / "act"


def test_predictors_and_activation_counts_are_written(hf_dir, tmp_path):
    pred, act = _powerinfer_dirs(tmp_path)
    f, t = read(conv(hf_dir, tmp_path / "o.gguf", outtype="f32", predictor=pred, activation=act))
    for i, r in enumerate((32, 48)):
        sd = torch.load(pred / f"model_{i}.pt")
        fc1, fc2 = t[f"blk.{i}.fc1.weight"], t[f"blk.{i}.fc2.weight"]
        assert fc1.tensor_type == T.F16 and as_f32(fc1).shape == (r, 64) and as_f32(fc2).shape == (128, r)
        np.testing.assert_array_equal(as_f32(fc1), sd["fc1.weight"].half().float().numpy())
        np.testing.assert_array_equal(as_f32(fc2), sd["fc2.weight"].half().float().numpy())
        counts = torch.load(act / f"activation_{i}.pt").double().numpy()
        np.testing.assert_allclose(as_f32(t[f"blk.{i}.ffn_act_freq"]), counts / counts.max(), rtol=1e-6)
    assert f["prosparse.neuron_order"] == "original"
    assert f["prosparse.predictor.threshold"] == 0.0


def test_predictor_type_quantizes_predictors(hf_dir, tmp_path):
    pred, _ = _powerinfer_dirs(tmp_path)
    _, t = read(conv(hf_dir, tmp_path / "o.gguf", predictor=pred, predictor_type="q8_0"))
    assert t["blk.0.fc1.weight"].tensor_type == T.Q8_0
    assert t["blk.0.fc2.weight"].tensor_type == T.Q8_0      # rows of R=32
    assert t["blk.1.fc2.weight"].tensor_type == T.F16       # rows of R=48: not whole blocks


def test_frequency_order_moves_every_per_neuron_tensor_together(hf_dir, tmp_path):
    pred, act = _powerinfer_dirs(tmp_path)
    _, t0 = read(conv(hf_dir, tmp_path / "a.gguf", outtype="f32", predictor=pred, activation=act))
    f1, t1 = read(conv(hf_dir, tmp_path / "b.gguf", outtype="f32", predictor=pred, activation=act,
                       neuron_order="frequency"))
    assert f1["prosparse.neuron_order"] == "frequency"
    for i in range(2):
        freq0 = as_f32(t0[f"blk.{i}.ffn_act_freq"])
        perm = np.argsort(-freq0, kind="stable")
        assert np.all(np.diff(as_f32(t1[f"blk.{i}.ffn_act_freq"])) <= 0)   # hottest first
        for name in ("ffn_gate.weight", "ffn_up.weight", "ffn_down_t.weight", "fc2.weight", "ffn_act_freq"):
            np.testing.assert_array_equal(as_f32(t1[f"blk.{i}.{name}"]), as_f32(t0[f"blk.{i}.{name}"])[perm], err_msg=name)
        np.testing.assert_array_equal(as_f32(t1[f"blk.{i}.fc1.weight"]), as_f32(t0[f"blk.{i}.fc1.weight"]))


def test_frequency_order_needs_statistics(hf_dir, tmp_path):
    with pytest.raises(ConvertError, match="needs neuron statistics"):
        conv(hf_dir, tmp_path / "o.gguf", neuron_order="frequency")


@pytest.mark.parametrize("damage,message", [
    (lambda p, a: (p / "model_1.pt").unlink(), "missing file: .*model_1.pt"),
    (lambda p, a: (a / "activation_0.pt").unlink(), "missing file: .*activation_0.pt"),
    (lambda p, a: torch.save({"fc1.weight": torch.zeros(8, 64), "fc2.weight": torch.zeros(8, 128)}, p / "model_2.pt"),
     "model_2.pt is for layer 2, but the model has 2 layers"),
    (lambda p, a: torch.save({"fc1.weight": torch.zeros(8, 60), "fc2.weight": torch.zeros(128, 8)}, p / "model_0.pt"),
     r"fc1.weight has shape \[8, 60\], expected \[R, 64\]"),
    (lambda p, a: torch.save({"fc1.weight": torch.zeros(8, 64), "fc2.weight": torch.zeros(128, 16)}, p / "model_0.pt"),
     r"fc2.weight has shape \[128, 16\], expected \[128, 8\]"),
    (lambda p, a: torch.save({"fc1.weight": torch.zeros(8, 64)}, p / "model_0.pt"), "missing fc2.weight"),
    (lambda p, a: torch.save(torch.ones(100), a / "activation_1.pt"), r"counts have shape \[100\], expected \[128\]"),
])
def test_bad_powerinfer_directories_are_clear_errors(hf_dir, tmp_path, damage, message):
    pred, act = _powerinfer_dirs(tmp_path)
    damage(pred, act)
    with pytest.raises(ConvertError, match=message):
        conv(hf_dir, tmp_path / "o.gguf", predictor=pred, activation=act)
    assert not (tmp_path / "o.gguf").exists()


def test_predictors_on_a_silu_model_are_refused(tmp_path):
    _, path = H.make_llama_dir(tmp_path / "hf", hidden_act="silu")
    pred, _ = _powerinfer_dirs(tmp_path)
    with pytest.raises(ConvertError, match="predictors need a relu or fatrelu model"):
        conv(path, tmp_path / "o.gguf", predictor=pred)


def test_llama_cpp_format_is_plain(silu_tied, tmp_path):
    model, path, _ = silu_tied
    f, t = read(conv(path, tmp_path / "o.gguf", outtype="f32", format="llama.cpp"))
    assert not [k for k in f if k.startswith("prosparse.")]
    assert "blk.0.ffn_down.weight" in t
    assert not [k for k in t if "ffn_down_t" in k or "fc1" in k or "act_freq" in k]


def test_llama_cpp_format_refuses_what_llama_cpp_would_run_wrongly(hf_dir, tmp_path):
    with pytest.raises(ConvertError, match="relu model, but llama.cpp's llama computes SiLU"):
        conv(hf_dir, tmp_path / "o.gguf", format="llama.cpp")


def test_llama_cpp_format_refuses_extras(silu_tied, tmp_path):
    with pytest.raises(ConvertError, match="cannot take --activation"):
        conv(silu_tied[1], tmp_path / "o.gguf", format="llama.cpp", activation=tmp_path)


# ---------------------------------------------------------------- GGUF input

def test_gguf_input_round_trips_unchanged(relu_gqa, tmp_path):
    _, _, out = relu_gqa
    again = conv(out, tmp_path / "again.gguf", outtype="f32")
    _all_tensors_equal(again, out)
    fa, _ = read(out)
    fb, _ = read(again)
    assert fa == fb


def test_gguf_input_requantizes_like_a_direct_conversion(relu_gqa, tmp_path):
    _, path, out = relu_gqa
    direct = conv(path, tmp_path / "direct.gguf", outtype="q8_0")
    via = conv(out, tmp_path / "via.gguf", outtype="q8_0")
    _, td = read(direct)
    _, tv = read(via)
    assert td.keys() == tv.keys()
    for k in td:
        np.testing.assert_array_equal(np.asarray(td[k].data), np.asarray(tv[k].data), err_msg=k)


def test_gguf_input_relayout_to_llama_cpp_and_back(silu_tied, tmp_path):
    model, _, out = silu_tied
    plain = conv(out, tmp_path / "plain.gguf", outtype="f32", format="llama.cpp")
    f, t = read(plain)
    assert not [k for k in f if k.startswith("prosparse.")]
    np.testing.assert_array_equal(as_f32(t["blk.0.ffn_down.weight"]), hf(model, "model.layers.0.mlp.down_proj.weight"))
    # A llama.cpp file without prosparse keys is SiLU, as llama.cpp runs it.
    f2, _ = read(conv(plain, tmp_path / "ours.gguf", outtype="f32"))
    assert f2["prosparse.activation"] == "silu"


def test_gguf_input_gets_predictors_and_frequency_order(hf_dir, tmp_path):
    pred, act = _powerinfer_dirs(tmp_path)
    base = conv(hf_dir, tmp_path / "base.gguf", outtype="f32", activation=act)
    via = conv(base, tmp_path / "via.gguf", outtype="f32", predictor=pred, neuron_order="frequency")
    direct = conv(hf_dir, tmp_path / "direct.gguf", outtype="f32", predictor=pred, activation=act,
                  neuron_order="frequency")
    _all_tensors_equal(via, direct)
    assert read(via)[0]["prosparse.neuron_order"] == "frequency"


def test_reordered_gguf_refuses_original_order_activation_counts(hf_dir, tmp_path):
    _, act = _powerinfer_dirs(tmp_path)
    hot = conv(hf_dir, tmp_path / "hot.gguf", outtype="f32", activation=act, neuron_order="frequency")
    with pytest.raises(ConvertError, match="already reordered"):
        conv(hot, tmp_path / "o.gguf", activation=act)


def test_powerinfer_gguf_loads_as_relu_with_its_predictor_threshold(hf_dir, tmp_path):
    pred, _ = _powerinfer_dirs(tmp_path)
    ours = conv(hf_dir, tmp_path / "ours.gguf", outtype="f32", predictor=pred, predictor_type="f32")
    pwri = H.powerinfer_file(ours, tmp_path / "pwri.gguf", 0.25)
    f, _ = read(conv(pwri, tmp_path / "o.gguf", outtype="f32", predictor_type="f32"))
    assert f["prosparse.activation"] == "relu"
    assert f["prosparse.predictor.threshold"] == pytest.approx(0.25)
    _all_tensors_equal(tmp_path / "o.gguf", ours)


V = gguf.GGUFValueType


@pytest.mark.parametrize("edit,message", [
    (dict(keys={"general.architecture": ("gpt2", V.STRING)}), "unsupported architecture in bad.gguf: .*'gpt2'"),
    (dict(keys={"llama.block_count": None}), "bad.gguf: missing key llama.block_count"),
    (dict(keys={"prosparse.activation": ("gelu", V.STRING)}), "bad.gguf: unsupported activation 'gelu'"),
    (dict(keys={"prosparse.neuron_order": ("random", V.STRING)}), "unknown prosparse.neuron_order 'random'"),
    (dict(keys={"llama.rope.dimension_count": (8, V.UINT32)}), r"partial RoPE \(8 of 16 dimensions\)"),
    (dict(drop=("blk.1.ffn_up.weight",)), "bad.gguf: missing tensor blk.1.ffn_up.weight"),
    (dict(extra_tensor=("blk.2.attn_norm.weight", np.ones(64, np.float32))),
     "unexpected tensor 'blk.2.attn_norm.weight' .not part of a 2-layer llama model"),
])
def test_inconsistent_gguf_input_is_refused_by_name(relu_gqa, tmp_path, edit, message):
    bad = H.edited_gguf(relu_gqa[2], tmp_path / "bad.gguf", **edit)
    with pytest.raises(ConvertError, match=message):
        conv(bad, tmp_path / "o.gguf")


def test_damaged_gguf_header_is_a_clear_error(relu_gqa, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 20)
    with pytest.raises(ConvertError, match="cannot read GGUF file .*bad.gguf"):
        conv(bad, tmp_path / "o.gguf")


@pytest.mark.parametrize("keep", [lambda n: n - 100, lambda n: n // 2])
def test_truncated_gguf_input_names_the_file_the_tensor_and_the_sizes(relu_gqa, tmp_path, keep):
    data = relu_gqa[2].read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data[:keep(len(data))])
    # the first tensor cut off, with the bytes it needs, read from the intact file by the gguf package
    cut = next(t for t in gguf.GGUFReader(str(relu_gqa[2])).tensors if t.data_offset + t.n_bytes > bad.stat().st_size)
    message = (f"{bad} is truncated: tensor {cut.name} needs {cut.n_bytes} bytes up to byte "
               f"{cut.data_offset + cut.n_bytes}, the file has {bad.stat().st_size}")
    with pytest.raises(ConvertError) as e:
        conv(bad, tmp_path / "o.gguf")
    assert str(e.value) == message
    assert not list(tmp_path.glob("o.gguf*"))


def test_cli_names_a_truncated_gguf_input_in_one_line(relu_gqa, tmp_path, capsys):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(relu_gqa[2].read_bytes()[:-100])
    assert cli_main([str(bad), str(tmp_path / "o.gguf"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"prosparse-convert: error: {bad} is truncated: tensor output.weight needs ")
    assert err.count("\n") == 1


@pytest.mark.slow  # ~25 s on 2 cores: dequantizes and rewrites 135M weights as f32
def test_real_llama_cpp_gguf_converts_without_loss(smollm2_path, tmp_path):
    # SmolLM2-135M-Instruct as llama.cpp's tools wrote it (Q4_1/Q8_0, byte-level BPE tokenizer):
    # at f32 every tensor must equal the gguf package's dequantization of the original, and every
    # tokenizer key must be copied unchanged.
    out = conv(smollm2_path, tmp_path / "smol.gguf", outtype="f32")
    src = gguf.GGUFReader(str(smollm2_path))
    f, t = read(out)
    for k, fld in src.fields.items():
        if k.startswith("tokenizer."):
            assert f[k] == fld.contents(), k
    assert f["prosparse.activation"] == "silu"
    assert f["llama.block_count"] == src.fields["llama.block_count"].contents()
    assert len(t) == len(src.tensors)
    for ten in src.tensors:
        np.testing.assert_array_equal(as_f32(t[ten.name]), as_f32(ten), err_msg=ten.name)
