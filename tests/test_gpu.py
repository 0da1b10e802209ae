"""The hybrid on a GPU (issue 13, "Tests"): logits with everything on the GPU and split at VRAM
budgets of 0, 25%, 50% and 100% of the model against the CPU-only run (1e-4 relative for float
weights, 1e-3 for quantized ones; greedy tokens identical), exact = dense on the GPU, for every
strategy, and the GPU's counters in stats. Skipped where there is no usable GPU
(prosparse_rt.cuda_devices() empty); bench/device_check.sh runs them on one."""
from __future__ import annotations

import numpy as np
import pytest

import helpers_models as H
import prosparse_rt
from prosparse_convert import convert
from prosparse_rt import _core

pytestmark = pytest.mark.skipif(not prosparse_rt.cuda_devices(), reason="no usable GPU")

N_FF = 320  # five neuron groups of 64
PROMPT = H.prompt_ids(24, seed=7)
TOL = {"f32": 1e-4, "q8_0": 1e-3, "q4_0": 1e-3}
BUDGETS = (0.0, 0.25, 0.5, 1.0)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu")
    model, d = H.make_fatrelu_dir(root / "fat", 0.1, seed=61, n_ff=N_FF, n_head_kv=2)
    pred = H.exact_predictor_dir(model, root / "pred")
    return {t: convert(d, root / f"fat-{t}.gguf", outtype=t, predictor=pred, predictor_type="f32", progress=False)
            for t in TOL}


def _total_bytes(path):
    return _core.Model(str(path), n_ctx=64, device="cpu").stats()["placement"]["bytes"]["cpu"]


def _model(path, strategy, frac):
    kw = dict(pred_threshold=0.5) if strategy == "predict" else {}
    if frac == 0.0:
        return _core.Model(str(path), n_ctx=64, n_threads=2, sparsity=strategy, device="cpu", **kw)
    budget = frac * _total_bytes(path) / 2**30 * 1.001  # just over: 100% holds everything
    return _core.Model(str(path), n_ctx=64, n_threads=2, sparsity=strategy, device="cuda", vram_budget=budget, **kw)


def _run(m, n_decode=8):
    """Prompt logits for every token, then greedy decode: (prompt logits, decode logits, tokens)."""
    prompt = np.asarray(m.eval(PROMPT, True))
    tok = int(np.argmax(prompt[-1]))
    rows, toks = [], []
    for _ in range(n_decode):
        row = np.asarray(m.eval([tok], False))  # the token's logits, [n_vocab]
        rows.append(row)
        tok = int(np.argmax(row))
        toks.append(tok)
    return prompt, np.stack(rows), toks


@pytest.mark.parametrize("strategy", ["dense", "exact", "predict"])
@pytest.mark.parametrize("wtype", list(TOL))
def test_logits_at_every_budget_match_the_cpu(files, strategy, wtype):
    path = files[wtype]
    ref_prompt, ref_decode, ref_toks = _run(_model(path, strategy, 0.0))
    for frac in BUDGETS[1:]:
        m = _model(path, strategy, frac)
        pl = m.stats()["placement"]
        assert pl["gpu_active"], pl["note"]
        assert pl["device"].startswith("cuda:")
        prompt, decode, toks = _run(m)
        assert H.rel_error(prompt, ref_prompt) <= TOL[wtype], f"prompt, budget {frac:.0%}"
        assert H.rel_error(decode, ref_decode) <= TOL[wtype], f"decode, budget {frac:.0%}"
        assert toks == ref_toks, f"greedy tokens, budget {frac:.0%}"


def test_everything_on_the_gpu_at_a_full_budget(files):
    m = _model(files["q4_0"], "exact", 1.0)
    pl = m.stats()["placement"]
    assert pl["output_on_gpu"]
    assert all(x["attention_on_gpu"] and x["n_hot"] == N_FF for x in pl["layers"])
    assert pl["bytes"]["cpu"] == 0 and pl["bytes"]["gpu"] > 0


@pytest.mark.parametrize("wtype", list(TOL))
def test_exact_equals_dense_on_the_gpu(files, wtype):
    # exact skips only neurons whose activation is zero: the same sums (cpu/kernels.h)
    dense = _run(_model(files[wtype], "dense", 1.0))
    exact = _run(_model(files[wtype], "exact", 1.0))
    np.testing.assert_array_equal(exact[0], dense[0])
    np.testing.assert_array_equal(exact[1], dense[1])


@pytest.mark.parametrize("strategy", ["exact", "predict"])
def test_the_decode_graph_gives_the_same_bits(files, strategy, monkeypatch):
    # PROSPARSE_CUDA_GRAPHS=1 replays the recorded kernels of a decode step: the same arithmetic
    monkeypatch.setenv("PROSPARSE_CUDA_GRAPHS", "0")
    plain = _run(_model(files["q4_0"], strategy, 1.0))
    monkeypatch.setenv("PROSPARSE_CUDA_GRAPHS", "1")
    graph = _run(_model(files["q4_0"], strategy, 1.0))
    np.testing.assert_array_equal(graph[0], plain[0])
    np.testing.assert_array_equal(graph[1], plain[1])


def test_stats_show_the_gpus_work_and_the_overlap(files):
    m = _model(files["q4_0"], "exact", 0.5)
    _run(m)
    s = m.stats()
    pl = s["placement"]
    assert pl["gpu_active"] and pl["gpu_resident_bytes"] > 0
    assert pl["seconds"]["gpu"] > 0 and pl["seconds"]["cpu"] > 0
    assert pl["cpu_wait_seconds"] >= 0 and pl["gpu_idle_seconds"] >= 0
    assert pl["seconds"]["cpu"] <= s["prompt_seconds"] + s["decode_seconds"]
    meas = pl["measured_bytes_per_token"]
    assert meas["gpu"] > 0 and meas["cpu"] >= 0
    assert meas["gpu"] + meas["cpu"] == pytest.approx(s["weight_bytes_per_token"])
    assert sum(x["n_hot"] for x in pl["layers"]) > 0


def test_an_unordered_file_is_refused_on_the_gpu_naming_the_fix(tmp_path, files):
    # neurons out of frequency order have no hot prefix (placement.h)
    freq = np.linspace(0.1, 0.9, N_FF).astype(np.float32)  # increasing: layer 0 is out of order
    dest = H.edited_gguf(files["f32"], tmp_path / "unordered.gguf", extra_tensor=("blk.0.ffn_act_freq", freq))
    with pytest.raises(ValueError, match="neuron-order frequency"):
        _core.Model(str(dest), n_ctx=64, sparsity="exact", device="cuda")
