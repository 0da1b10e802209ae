"""The sparse FFN strategies (docs/design.md "The FFN strategies"): `exact` computes the same
model as `dense`; `predict` with a predictor that is exact by construction equals `exact`; a bad
predictor changes the output and the recall diagnostic says so. References: the dense strategy on
the same file, and transformers (via test_logits.py) for dense itself."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import helpers_models as H
from prosparse_convert import convert
from prosparse_rt import Model, SamplingParams

TYPES = ["f32", "f16", "bf16", "q8_0", "q4_0"]
# exact and dense read the same weights with the same kernels and convert activations the same
# way; they differ only in skipping zero terms and in the summation order of the down projection.
EXACT_TOL = 1e-5


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("sparse")
    relu_model, relu_dir = H.make_llama_dir(root / "relu", hidden_act="relu", n_head=4, n_head_kv=2, seed=21)
    fat_model, fat_dir = H.make_fatrelu_dir(root / "fat", 0.3, seed=22)
    silu_model, silu_dir = H.make_llama_dir(root / "silu-hf", hidden_act="silu", n_head=4, n_head_kv=2, seed=23)
    return {"relu": (relu_model, relu_dir), "fatrelu": (fat_model, fat_dir), "silu": (silu_model, silu_dir),
            "root": root}


def _gguf(checkpoints, kind, outtype, **kw):
    root = checkpoints["root"]
    tag = "-".join(f"{k}={getattr(v, 'name', v)}" for k, v in sorted(kw.items())) or "plain"
    name = f"{kind}-{outtype}-{tag}.gguf"
    out = root / name
    if not out.exists():
        convert(checkpoints[kind][1], out, outtype=outtype, progress=False, **kw)
    return out


def _logits(path, sparsity, n_threads=2, **kw):
    kw.setdefault("kv_type", "f32")  # some of these are compared with transformers at 1e-5
    with Model(path, n_ctx=128, n_threads=n_threads, sparsity=sparsity, **kw) as m:
        return m.logits(H.prompt_ids(20)), m.stats


@pytest.mark.parametrize("kind", ["relu", "fatrelu"])
@pytest.mark.parametrize("outtype", TYPES)
def test_exact_equals_dense(checkpoints, kind, outtype):
    path = _gguf(checkpoints, kind, outtype)
    dense, _ = _logits(path, "dense")
    exact, stats = _logits(path, "exact")
    assert H.rel_error(exact, dense) < EXACT_TOL
    # and it really skipped neurons: random ReLU gates leave about half of them at zero
    frac = np.array(stats["active_fraction"])
    assert np.all(frac < 0.8) and np.all(frac > 0.05), frac


@pytest.mark.parametrize("outtype", ["f32", "q4_0"])
def test_exact_and_dense_generate_the_same_64_greedy_tokens(checkpoints, outtype):
    path = _gguf(checkpoints, "fatrelu", outtype)
    outs = []
    for sparsity in ("dense", "exact"):
        with Model(path, n_ctx=128, sparsity=sparsity) as m:
            it = m._generate(H.prompt_ids(8), 64, SamplingParams(temperature=0.0, seed=0))
            for _ in it:
                pass
            outs.append(list(m._cache))
    assert outs[0] == outs[1]
    assert len(outs[0]) >= 8 + 32  # tiny random models rarely hit EOS; most steps were compared


@pytest.mark.parametrize("outtype", ["f32", "q8_0", "q4_0"])
def test_exact_is_bitwise_reproducible_across_runs_and_thread_counts(checkpoints, outtype):
    path = _gguf(checkpoints, "relu", outtype)
    a, _ = _logits(path, "exact", n_threads=1)
    b, _ = _logits(path, "exact", n_threads=2)
    c, _ = _logits(path, "exact", n_threads=2)
    d, _ = _logits(path, "exact", n_threads=3)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(b, c)
    np.testing.assert_array_equal(b, d)


def test_auto_picks_exact_for_relu_and_dense_for_silu(checkpoints, tmp_path):
    with Model(_gguf(checkpoints, "relu", "f32"), n_ctx=32) as m:
        assert m.strategy == "exact"
    _, silu_dir = H.make_llama_dir(tmp_path / "silu", hidden_act="silu", seed=1)
    silu = convert(silu_dir, tmp_path / "silu.gguf", outtype="f32", progress=False)
    with Model(silu, n_ctx=32) as m:
        assert m.strategy == "dense"
    with pytest.raises(ValueError, match="sparse activation"):
        Model(silu, sparsity="exact")


def test_exact_reads_fewer_bytes_than_dense(checkpoints):
    path = _gguf(checkpoints, "relu", "q8_0")
    per = {}
    for sparsity in ("dense", "exact"):
        with Model(path, n_ctx=64, sparsity=sparsity) as m:
            m.generate(H.prompt_ids(4), max_tokens=4, temperature=0.0)
            per[sparsity] = m.stats["weight_bytes_per_token"]
    assert 0 < per["exact"] < per["dense"]


# --- predict -------------------------------------------------------------------------------------

def _random_predictor_dir(model, d, rank=8, seed=0):
    d.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    for i, layer in enumerate(model.model.layers):
        n_ff, e = layer.mlp.gate_proj.weight.shape
        torch.save({"fc1.weight": torch.randn(rank, e, generator=gen),
                    "fc2.weight": torch.randn(n_ff, rank, generator=gen)}, d / f"model_{i}.pt")
    return d


@pytest.mark.parametrize("kind", ["relu", "fatrelu"])
def test_predict_with_an_exact_predictor_equals_exact(checkpoints, kind):
    model = checkpoints[kind][0]
    pred = H.exact_predictor_dir(model, checkpoints["root"] / f"pred-exact-{kind}")
    path = _gguf(checkpoints, kind, "f32", predictor=pred, predictor_type="f32")
    exact, _ = _logits(path, "exact")
    # a slightly negative cut-off: every neuron with gate >= 0 is predicted, so none is missed
    predict, stats = _logits(path, "predict", predictor_threshold=-1e-6, diag_recall=True)
    assert H.rel_error(predict, exact) < EXACT_TOL
    assert np.allclose(stats["recall"], 1.0)
    assert np.all(np.array(stats["predicted_fraction"]) < 0.9)


def test_a_bad_predictor_changes_the_output_and_recall_says_so(checkpoints):
    model = checkpoints["relu"][0]
    pred = _random_predictor_dir(model, checkpoints["root"] / "pred-random")
    path = _gguf(checkpoints, "relu", "f32", predictor=pred, predictor_type="f32")
    exact, _ = _logits(path, "exact")
    predict, stats = _logits(path, "predict", diag_recall=True)
    assert H.rel_error(predict, exact) > 1e-2
    recall = np.array(stats["recall"])
    assert np.all(recall < 0.9) and np.all(recall > 0.0), recall


def test_predict_without_predictors_is_a_clear_error(checkpoints):
    with pytest.raises(ValueError, match="predictor"):
        Model(_gguf(checkpoints, "relu", "f32"), sparsity="predict")


def test_powerinfer_file_loads_as_relu_and_matches_ours(checkpoints):
    """A PWRI file (PowerInfer's magic and tensors, no prosparse keys) runs as ReLU with t = 0,
    sparsely, with powerinfer.sparse_threshold as the predictor cut-off."""
    model = checkpoints["relu"][0]
    pred = H.exact_predictor_dir(model, checkpoints["root"] / "pred-exact-relu")
    ours = _gguf(checkpoints, "relu", "f32", predictor=pred, predictor_type="f32")
    pwri = H.powerinfer_file(ours, checkpoints["root"] / "pwri.gguf", -1e-6)
    with Model(pwri, n_ctx=64) as m:
        assert m.hparams["activation"] == "relu" and m.strategy == "exact"
        assert m.metadata.get("prosparse.activation") is None
    ref, _ = _logits(ours, "exact")
    np.testing.assert_array_equal(_logits(pwri, "exact")[0], ref)
    assert H.rel_error(_logits(pwri, "predict")[0], ref) < EXACT_TOL


# --- bad sparsity settings ---------------------------------------------------------------------

def _with_key(src, dest, key, value, vtype):
    """A copy of the GGUF src with one metadata key added (the runtime must validate it)."""
    import gguf

    sub = gguf.GGUFValueType.FLOAT32 if vtype == gguf.GGUFValueType.ARRAY else None
    return H.edited_gguf(src, dest, keys={key: (value, vtype, sub)})


@pytest.fixture(scope="module")
def silu_gguf(checkpoints):
    _, d = H.make_llama_dir(checkpoints["root"] / "silu", hidden_act="silu", seed=4)
    return convert(d, checkpoints["root"] / "silu.gguf", outtype="f32", progress=False)


def test_layer_thresholds_in_a_plain_file_get_ffn_down_t_built_and_run_exact(silu_gguf, checkpoints):
    """Thresholds make a SiLU model sparse; a plain file (llama.cpp's ffn_down only) gets the
    neuron-major copy built at load, so auto runs exact, and dense computes the same model."""
    import gguf

    path = _with_key(silu_gguf, checkpoints["root"] / "silu-thr.gguf", "prosparse.layer_thresholds",
                     [0.05, 0.05], gguf.GGUFValueType.ARRAY)
    with Model(path, n_ctx=64) as m:
        assert m.strategy == "exact" and m.hparams["activation"] == "silu"
        assert m.stats["n_down_t_built"] == 2
    exact, stats = _logits(path, "exact")
    dense, _ = _logits(path, "dense")
    assert H.rel_error(exact, dense) < EXACT_TOL
    assert 0.05 < np.mean(stats["active_fraction"]) < 0.95


# Thresholds given at load (Model(layer_thresholds=...)): the runtime's way to run shipped thresholds
# without writing a calibrated copy. The reference is that copy, as prosparse-calibrate writes it.
LOAD_THRESHOLDS = [0.05, 0.08]


@pytest.mark.parametrize("outtype", ["f32", "q8_0", "q4_0"])
def test_thresholds_at_load_exact_equals_dense_with_the_same_thresholds(checkpoints, outtype):
    path = _gguf(checkpoints, "silu", outtype)
    exact, stats = _logits(path, "exact", layer_thresholds=LOAD_THRESHOLDS)
    dense, dstats = _logits(path, "dense", layer_thresholds=LOAD_THRESHOLDS)
    plain, _ = _logits(path, "dense")
    assert stats["n_down_t_built"] == dstats["n_down_t_built"] == 2
    assert H.rel_error(exact, dense) < EXACT_TOL
    frac = np.array(stats["active_fraction"])
    assert np.all(frac < 0.95) and np.all(frac > 0.05), frac  # the thresholds zero neurons
    assert H.rel_error(exact, plain) > 1e-3  # and change the model


@pytest.mark.parametrize("outtype", ["f32", "q4_0"])
def test_thresholds_at_load_equal_the_file_prosparse_calibrate_writes(checkpoints, outtype, tmp_path):
    """Same thresholds, same F16 ffn_down_t (the tool's numpy rounding): the same logits, bit for bit."""
    from prosparse_convert.calibrate import write_preset

    path = _gguf(checkpoints, "silu", outtype)
    written = tmp_path / "calibrated.gguf"
    write_preset(path, written, {"thresholds": LOAD_THRESHOLDS, "down_type": "f16"})
    ref, ref_stats = _logits(written, "exact")
    ours, stats = _logits(path, "exact", layer_thresholds=LOAD_THRESHOLDS)
    assert ref_stats["n_down_t_built"] == 0 and stats["n_down_t_built"] == 2
    np.testing.assert_array_equal(ours, ref)


def test_exact_on_a_relu_file_without_ffn_down_t_builds_it_and_auto_stays_dense(checkpoints):
    """auto keeps a ReLU file in llama.cpp's layout dense (an F16 copy of a quantized ffn_down is
    several times its size); exact asked for builds the copy and skips neurons. Reference:
    transformers with ReLU on the same f32 weights."""
    import gguf

    root = checkpoints["root"]
    model, d = H.make_llama_dir(root / "relu-plain-hf", hidden_act="silu", seed=24)
    silu = convert(d, root / "relu-plain-silu.gguf", outtype="f32", format="llama.cpp", progress=False)
    path = _with_key(silu, root / "relu-plain.gguf", "prosparse.activation", "relu", gguf.GGUFValueType.STRING)
    with Model(path, n_ctx=64) as m:
        assert m.strategy == "dense" and m.stats["n_down_t_built"] == 0
    exact, stats = _logits(path, "exact")
    assert stats["n_down_t_built"] == 2 and np.mean(stats["active_fraction"]) < 0.8
    dense, _ = _logits(path, "dense")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.act_fn = torch.nn.ReLU()
        ref_f32 = H.hf_logits(model, H.prompt_ids(20))
        for layer in model.model.layers:  # the built copy is F16
            layer.mlp.down_proj.weight.copy_(layer.mlp.down_proj.weight.half().float())
        ref_f16_down = H.hf_logits(model, H.prompt_ids(20))
    assert H.rel_error(dense, ref_f32) < 1e-5
    assert H.rel_error(exact, ref_f16_down) < 1e-5


@pytest.mark.parametrize("thresholds, match", [
    ([0.05], "layer_thresholds has 1 entries for 2 layers"),
    ([0.05, -1.0], r"layer_thresholds\[1\] must be a finite number >= 0"),
    ([0.05, float("inf")], r"layer_thresholds\[1\] must be a finite number >= 0"),
    ([], "layer_thresholds is empty"),
])
def test_bad_thresholds_at_load_are_refused(checkpoints, thresholds, match):
    with pytest.raises(ValueError, match=match):
        Model(_gguf(checkpoints, "silu", "f32"), layer_thresholds=thresholds)


def test_thresholds_at_load_on_a_relu_model_are_refused(checkpoints):
    with pytest.raises(ValueError, match="layer_thresholds is for SiLU models, this one is relu"):
        Model(_gguf(checkpoints, "relu", "f32"), layer_thresholds=[0.1, 0.1])


def test_layer_thresholds_of_the_wrong_length_are_refused(silu_gguf, checkpoints):
    import gguf

    path = _with_key(silu_gguf, checkpoints["root"] / "silu-bad.gguf", "prosparse.layer_thresholds",
                     [0.05, 0.05, 0.05], gguf.GGUFValueType.ARRAY)
    with pytest.raises(ValueError, match="layer_thresholds has 3 entries for 2 layers"):
        Model(path)


def test_an_activation_threshold_on_a_silu_model_is_refused(silu_gguf):
    with pytest.raises(ValueError, match="applies to relu/fatrelu"):
        Model(silu_gguf, activation_threshold=0.01)


@pytest.mark.parametrize("kw", [dict(activation_threshold=float("nan")), dict(predictor_threshold=float("inf"))])
def test_non_finite_thresholds_are_refused(checkpoints, kw):
    with pytest.raises(ValueError, match="finite"):
        Model(_gguf(checkpoints, "relu", "f32"), **kw)
