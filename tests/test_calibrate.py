"""prosparse-calibrate: profiling, predictors, SiLU thresholds, the written file, bad input.

References: transformers (LlamaForCausalLM with FATReLU, docs/design.md) for which neurons fire; the gguf
package's reader and dequantizer for what the file holds; held-out text the calibration never saw for
recall, predicted sparsity and reached sparsity."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from helpers_models import make_fatrelu_dir, make_llama_dir, save_llama

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")

from prosparse_convert.calibrate import Options, calibrate, evaluate_file  # noqa: E402
from prosparse_convert.calibrate import profile as P, thresholds as TH, text as TX  # noqa: E402
from prosparse_convert.convert import convert  # noqa: E402
from prosparse_convert.errors import ConvertError  # noqa: E402
from prosparse_rt import Model, _core  # noqa: E402

FATRELU_T = 0.8  # the random model's gates: about 25% of neurons fire, as in a sparse model


def _topics():
    from pydoc_data import topics

    vals = list(topics.topics.values())
    return vals


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    d = tmp_path_factory.mktemp("text")
    vals = _topics()
    half = len(vals) // 2
    (d / "calib.txt").write_text("\n\n".join(vals[:half]))
    (d / "held.txt").write_text("\n\n".join(vals[half:])[:60_000])
    return d / "calib.txt", d / "held.txt"


@pytest.fixture(scope="module")
def fatrelu(tmp_path_factory):
    d = tmp_path_factory.mktemp("fatrelu")
    ref, hf = make_fatrelu_dir(d / "hf", FATRELU_T, n_layer=2)
    out = convert(hf, d / "model.gguf", outtype="f32", progress=False)
    return ref, out


@pytest.fixture(scope="module")
def silu(tmp_path_factory):
    d = tmp_path_factory.mktemp("silu")
    _, hf = make_llama_dir(d / "hf", n_layer=3)
    return convert(hf, d / "model.gguf", outtype="q8_0", format="llama.cpp", progress=False)


@pytest.fixture(scope="module")
def fatrelu_calibrated(fatrelu, texts, tmp_path_factory):
    _, path = fatrelu
    out = tmp_path_factory.mktemp("cal") / "pred.gguf"
    rep = calibrate(path, out, Options(text=[texts[0]], tokens=6000, ctx=64, epochs=12,
                                       predictor_type="f16", neuron_order="frequency",
                                       progress=False, n_threads=1, eval_text=texts[1], eval_tokens=2000))
    return rep, out


def _windows(model, text_path, ctx=64, tokens=3000):
    text = Path(text_path).read_text()
    return TX.make_windows(lambda s: model.tokenize(s, False, False), text, model.bos, ctx, tokens, 0).calib


# ---------------------------------------------------------------- profiling

def test_profile_counts_match_transformers_activations(fatrelu, texts):
    """Firing counts per neuron = tokens where FATReLU(gate) != 0 in transformers' forward on the
    same (f32) weights and the same token windows."""
    ref, path = fatrelu
    m = _core.Model(str(path), n_ctx=64, n_threads=1, sparsity="dense", kv_type="f32")
    win = _windows(m, texts[0], tokens=1500)
    prof = P.profile(m, win, "fatrelu", FATRELU_T, progress=False)
    fired = [np.zeros(128, np.int64) for _ in ref.model.layers]
    hooks = []
    for l, layer in enumerate(ref.model.layers):
        def hook(mod, inp, out, l=l):
            fired[l] += (out[0] != 0).sum(0).numpy()
        hooks.append(layer.mlp.act_fn.register_forward_hook(hook))
    with torch.no_grad():
        for w in win:
            ref(torch.tensor([w]))
    for h in hooks:
        h.remove()
    n = sum(len(w) for w in win)
    assert prof.n_tokens == n
    for l in range(len(fired)):
        # a gate within float rounding of t may fall either side; allow one in ten thousand
        assert np.abs(prof.counts[l] - fired[l]).sum() <= 1e-4 * n * 128 + 2, l
        assert prof.counts[l].sum() > 0.1 * n * 128  # the test means something: neurons do fire


def test_reservoir_keeps_every_token_with_equal_probability():
    """Algorithm R: after n tokens streamed in batches, each is kept with probability slots/n."""
    rng = np.random.default_rng(0)
    hits = np.zeros(100)
    for _ in range(2000):
        r = P.Reservoir(10, rng)
        kept = np.full(10, -1)
        base = 0
        for n in (7, 30, 13, 50):
            pos, slot = r.place(n)
            kept[slot] = base + pos
            base += n
        hits[kept] += 1
    p = hits / 2000
    assert np.all(np.abs(p - 0.1) < 0.035), p


def test_reservoir_memory_is_bounded():
    """The slots shrink to fit the memory budget however many tokens are asked for."""
    assert P.reservoir_slots(n_layer=32, bytes_per_token_layer=9000, max_samples=10**9, max_bytes=1 << 30) \
        == (1 << 30) // (32 * 9000)


# ---------------------------------------------------------------- predictors

def test_predictors_reach_recall_and_sparsity_on_held_out_tokens(fatrelu_calibrated):
    rep, _ = fatrelu_calibrated
    print("\n" + rep.table())
    assert rep.mean["recall"] >= 0.90
    assert rep.mean["predicted_sparsity"] >= 0.50
    assert rep.mean["actual_sparsity"] > rep.mean["predicted_sparsity"]  # selects for recall


def test_predict_stays_close_to_exact(fatrelu_calibrated):
    """Held-out perplexity of `predict` within 10% of `exact` (printed: the difference it costs)."""
    rep, _ = fatrelu_calibrated
    rows = {r["strategy"]: r for r in rep.eval if r["model"] == "calibrated"}
    assert set(rows) == {"exact", "predict"}
    diff = rows["predict"]["perplexity"] / rows["exact"]["perplexity"] - 1
    print(f"\nexact {rows['exact']['perplexity']:.3f}  predict {rows['predict']['perplexity']:.3f} "
          f"({100 * diff:+.2f}%), recall {rows['predict']['recall']:.3f}")
    assert abs(rows["exact"]["ppl_change"]) < 1e-3  # exact = the input model
    assert abs(diff) < 0.10
    assert rows["predict"]["recall"] >= 0.9


def test_frequency_order_writes_the_same_model_hottest_first(fatrelu, fatrelu_calibrated, texts):
    """Reordered neurons (gate/up/ffn_down_t/fc2/ffn_act_freq together) compute the same logits."""
    _, src = fatrelu
    _, out = fatrelu_calibrated
    a = _core.Model(str(src), n_ctx=64, n_threads=1, sparsity="dense")
    b = _core.Model(str(out), n_ctx=64, n_threads=1, sparsity="exact")
    w = _windows(a, texts[1], tokens=64)[0]
    la, lb = a.eval(w, all_logits=True), b.eval(w, all_logits=True)
    assert np.abs(la - lb).max() / np.abs(la).max() < 1e-4
    r = gguf.GGUFReader(str(out))
    assert r.fields["prosparse.neuron_order"].contents() == "frequency"
    for l in range(2):
        f = next(t for t in r.tensors if t.name == f"blk.{l}.ffn_act_freq").data
        assert np.all(np.diff(f) <= 0) and f[0] > f[-1]


# ---------------------------------------------------------------- SiLU thresholds

@pytest.mark.parametrize("target,allocation", [(0.5, "greedy"), (0.3, "uniform")])
def test_thresholds_reach_target_sparsity_on_held_out_text(silu, texts, tmp_path, target, allocation):
    out = tmp_path / "sparse.gguf"
    rep = calibrate(silu, out, Options(text=[texts[0]], tokens=3000, ctx=64, target_sparsity=target,
                                       allocation=allocation, probe_tokens=128, progress=False, n_threads=1))
    assert abs(np.mean([r["level"] for r in rep.layers]) - target) < 0.01
    m = _core.Model(str(out), n_ctx=64, n_threads=1)
    assert m.strategy == "exact"  # auto: SiLU with layer thresholds is sparse
    from prosparse_convert.calibrate import evaluate as E
    for w in _windows(m, texts[1], tokens=3000):
        m.rewind(0)
        m.eval(w)
    reached = E.sparsity_of(m)
    print(f"\ntarget {target} ({allocation}): held-out sparsity {reached:.4f}")
    assert abs(reached - target) <= 0.02
    # and the thresholded model is one model: exact (skips the zeroed neurons) equals dense
    ids = list(_windows(m, texts[1], tokens=64)[0])
    logits = {s: Model(str(out), n_ctx=64, n_threads=1, sparsity=s).logits(ids) for s in ("dense", "exact")}
    assert np.abs(logits["exact"] - logits["dense"]).max() / np.abs(logits["dense"]).max() < 1e-5


def test_exchange_moves_sparsity_from_sensitive_to_tolerant_layers():
    """The k layers whose marginal cost is largest give `step` of sparsity to the k smallest; the
    mean level is unchanged and no level leaves [0, max]."""
    lv = TH.exchange([0.5, 0.5, 0.5, 0.5], marginal=[0.9, 0.1, 0.5, 0.0], k=1, step=0.05, max_level=0.95)
    assert lv == [0.45, 0.5, 0.5, 0.55]
    lv = TH.exchange([0.0, 0.95, 0.5, 0.5], marginal=[1.0, 0.0, 0.5, 0.4], k=1, step=0.05, max_level=0.95)
    assert lv == [0.0, 0.95, 0.45, 0.55]  # layer 0 cannot go lower, layer 1 not higher
    assert abs(np.mean(lv) - np.mean([0.0, 0.95, 0.5, 0.5])) < 1e-9


def test_greedy_allocation_is_no_worse_than_uniform_on_the_probe_tokens(silu, texts, tmp_path):
    rep = calibrate(silu, tmp_path / "g.gguf", Options(text=[texts[0]], tokens=2000, ctx=64, target_sparsity=0.6,
                                                        probe_tokens=128, progress=False, n_threads=1))
    print(f"\nKL from dense on the probe tokens: {rep.allocation_kl}")
    assert rep.allocation_kl["greedy"] <= rep.allocation_kl["uniform"]
    assert abs(np.mean([r["level"] for r in rep.layers]) - 0.6) < 1e-6


# ---------------------------------------------------------------- the written file

def test_written_file_keeps_every_tensor_and_key(silu, texts, tmp_path):
    """llama.cpp file in: every tensor's bytes kept except ffn_down, which becomes ffn_down_t =
    dequantize(ffn_down)^T (F16 here); every key kept; thresholds and frequencies added."""
    out = tmp_path / "s.gguf"
    calibrate(silu, out, Options(text=[texts[0]], tokens=1000, ctx=64, target_sparsity=0.4, allocation="uniform",
                                 down_type="f16", progress=False, n_threads=1))
    a, b = gguf.GGUFReader(str(silu)), gguf.GGUFReader(str(out))
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    for name, t in ta.items():
        if ".ffn_down." in name:
            d = tb[name.replace("ffn_down", "ffn_down_t")]
            assert d.tensor_type == gguf.GGMLQuantizationType.F16
            want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed([int(x) for x in t.shape])))
            np.testing.assert_array_equal(np.asarray(d.data), want.T.astype(np.float16))
            continue
        assert tb[name].tensor_type == t.tensor_type
        assert np.array_equal(np.asarray(tb[name].data).view(np.uint8), np.asarray(t.data).view(np.uint8)), name
    for key, f in a.fields.items():
        if key.startswith("GGUF."):
            continue
        assert key in b.fields, key
        assert b.fields[key].contents() == f.contents(), key
    assert len(b.fields["prosparse.layer_thresholds"].contents()) == 3
    assert b.fields["prosparse.activation"].contents() == "silu"
    assert sum(".ffn_act_freq" in n for n in tb) == 3


@pytest.fixture(scope="module")
def silu_outliers(tmp_path_factory):
    """A SiLU llama.cpp file (Q8_0) whose FFN activations carry one outlier per 32-neuron block:
    neuron j's up row x100 and its down column /100, the same function. The input's own down
    projection quantizes those activations to 8 bits per block (the matmul kernel), which crushes
    the other 31 neurons of each block; ffn_down_t's axpy kernel takes them as floats."""
    d = tmp_path_factory.mktemp("silu_outliers")
    model, hf = make_llama_dir(d / "hf", n_layer=3)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.up_proj.weight[::32] *= 100.0
            layer.mlp.down_proj.weight[:, ::32] /= 100.0
    save_llama(hf, model)
    return convert(hf, d / "model.gguf", outtype="q8_0", format="llama.cpp", progress=False)


def _dense_ppl(path, windows):
    from prosparse_convert.calibrate import evaluate as E

    m = _core.Model(str(path), n_ctx=64, n_threads=1, sparsity="dense")
    m.set_layer_thresholds([])
    return E.perplexity(m, windows)


def test_down_type_auto_compares_q8_0_with_f16_not_with_the_input(silu_outliers, texts, tmp_path):
    """docs/design.md "The down projection": ffn_down_t is Q8_0 when perplexity moves < 0.5% against the unchanged model, which
    is the same file with F16 ffn_down_t (F16 of the dequantized Q8_0 weights), through the same
    kernel. On this file the input's quantized-activation path alone is > 0.5% away from the F16
    file, while Q8_0 and F16 ffn_down_t agree: measured against the input, Q8_0 would be refused."""
    outs = {t: tmp_path / f"{t}.gguf" for t in ("f16", "auto")}
    reps = {t: calibrate(silu_outliers, p, Options(text=[texts[0]], tokens=1000, ctx=64, target_sparsity=0.3,
                                                   allocation="uniform", down_type=t, progress=False,
                                                   n_threads=1))
            for t, p in outs.items()}
    win = _windows(_core.Model(str(silu_outliers), n_ctx=64, n_threads=1), texts[1], tokens=1000)
    ppl_input, ppl_f16 = _dense_ppl(silu_outliers, win), _dense_ppl(outs["f16"], win)
    print(f"\ninput {ppl_input:.3f}, F16 ffn_down_t {ppl_f16:.3f} ({100 * (ppl_input / ppl_f16 - 1):+.2f}%); "
          f"check: {reps['auto'].down_check}")
    assert abs(ppl_input / ppl_f16 - 1) > 0.005  # the old reference would have chosen F16
    chk = reps["auto"].down_check
    assert reps["auto"].down_type == "q8_0" and abs(chk["rel_change"]) < 0.005
    assert chk["rel_change"] == pytest.approx(chk["q8_0_ppl"] / chk["f16_ppl"] - 1)
    r = gguf.GGUFReader(str(outs["auto"]))
    assert {t.tensor_type for t in r.tensors if ".ffn_down_t." in t.name} == {gguf.GGMLQuantizationType.Q8_0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["auto.gguf", "f16.gguf"]  # no check files left


def test_down_type_check_leaves_no_files_when_it_fails(silu, texts, tmp_path, monkeypatch):
    """An error while the candidate files are measured leaves neither an output nor a candidate."""
    from prosparse_convert.calibrate import evaluate as E

    def boom(*a, **k):
        raise ConvertError("interrupted")
    monkeypatch.setattr(E, "perplexity", boom)
    with pytest.raises(ConvertError, match="interrupted"):
        calibrate(silu, tmp_path / "x.gguf", Options(text=[texts[0]], tokens=500, ctx=64, target_sparsity=0.4,
                                                      allocation="uniform", progress=False, n_threads=1))
    assert list(tmp_path.iterdir()) == []


def test_output_is_written_atomically(silu, texts, tmp_path):
    """A failing calibration leaves neither a partial output nor a temporary file."""
    out = tmp_path / "x.gguf"
    with pytest.raises(ConvertError):
        calibrate(silu, out, Options(text=[texts[0]], tokens=500, ctx=64, target_sparsity=0.4,
                                     neuron_order="frequency", predictors=True, progress=False))
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- bad input

def test_empty_text_is_refused(silu, tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ConvertError, match="empty"):
        calibrate(silu, tmp_path / "o.gguf", Options(text=[tmp_path / "empty.txt"], target_sparsity=0.5,
                                                     progress=False))


def test_too_few_tokens_for_predictors_is_refused(fatrelu, tmp_path):
    (tmp_path / "short.txt").write_text("A short text. " * 40)
    with pytest.raises(ConvertError, match="too few to train"):
        calibrate(fatrelu[1], tmp_path / "o.gguf", Options(text=[tmp_path / "short.txt"], ctx=64, progress=False))


def test_predictors_for_a_silu_model_are_refused(silu, texts, tmp_path):
    with pytest.raises(ConvertError, match="predictors need a sparse activation"):
        calibrate(silu, tmp_path / "o.gguf", Options(text=[texts[0]], predictors=True, target_sparsity=0.5,
                                                     progress=False))


def test_silu_model_without_target_and_relu_with_target_are_refused(silu, fatrelu, texts, tmp_path):
    with pytest.raises(ConvertError, match="--target-sparsity"):
        calibrate(silu, tmp_path / "o.gguf", Options(text=[texts[0]], progress=False))
    with pytest.raises(ConvertError, match="already sparse"):
        calibrate(fatrelu[1], tmp_path / "o.gguf", Options(text=[texts[0]], target_sparsity=0.5, progress=False))


def test_truncated_input_is_refused_in_one_cli_line(silu, texts, tmp_path, capsys):
    from prosparse_convert.calibrate.cli import main

    bad = tmp_path / "cut.gguf"
    bad.write_bytes(silu.read_bytes()[:-1000])
    rc = main([str(bad), str(tmp_path / "o.gguf"), "--text", str(texts[0]), "--target-sparsity", "0.5",
               "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1
    assert err.startswith(f"prosparse-calibrate: error: {bad} is truncated: tensor output.weight needs ")
    assert not list(tmp_path.glob("o.gguf*"))


def test_bad_options_are_refused(silu, tmp_path):
    for kw, msg in (({"target_sparsity": 1.5}, "target-sparsity"), ({"tokens": 3}, "--tokens"),
                    ({"target_sparsity": 0.5, "text": [tmp_path / "missing.txt"]}, "does not exist")):
        with pytest.raises(ConvertError, match=msg):
            calibrate(silu, tmp_path / "o.gguf", Options(progress=False, **kw))
    with pytest.raises(ConvertError, match="not the input"):
        calibrate(silu, silu, Options(target_sparsity=0.5, progress=False))


def test_cli_reports_and_writes(silu, texts, tmp_path, capsys):
    from prosparse_convert.calibrate.cli import main

    rc = main([str(silu), str(tmp_path / "c.gguf"), "--text", str(texts[0]), "--tokens", "500", "--ctx", "64",
               "--target-sparsity", "0.5", "--allocation", "uniform", "--no-progress", "-t", "1",
               "--eval", str(texts[1]), "--eval-tokens", "500"])
    out = capsys.readouterr().out
    assert rc == 0 and (tmp_path / "c.gguf").is_file()
    assert "| mean |" in out and "| calibrated | exact |" in out
    assert "ffn_down_t written at" in out and "at F16" in out  # both perplexities of the check
    rc = main([str(silu), str(tmp_path / "d.gguf"), "--text", str(texts[0]), "--no-progress"])
    assert rc == 1 and "--target-sparsity" in capsys.readouterr().err


def test_grid_quantiles_equal_quantile_thresholds():
    """The greedy search's cached quantiles are np.quantile's, on and off the grid."""
    rng = np.random.default_rng(0)
    a = np.abs(rng.standard_normal((3, 500, 40))).astype(np.float16)
    q = TH.GridQuantiles(a, 400, [0.3 + 0.05 * k for k in range(-7, 14)])
    for levels in ([0.3, 0.35, 0.25], [0.0, 0.95, 0.3], [0.33, 0.3, 0.1], [0.3, 0.35, 0.25]):
        assert q(levels) == TH.quantile_thresholds(a, 400, levels)
