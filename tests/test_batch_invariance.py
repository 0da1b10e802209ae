"""Batch invariance (docs/design.md, "Determinism"): the same tokens give the same logits, bit for
bit, however they are batched, on however many threads, whatever else the step computes.

Each case evaluates one prompt in a single batch, one token at a time, and in random chunk sizes,
on 1, 2 and 3 threads, and continues from a cached prefix; every position's logits must be equal
to the single batch's. The cases cover every layout a weight can be read in: plain rows and
interleaved copies (PROSPARSE_INTERLEAVE), gathered rows (exact, predict), the neuron-major
ffn_down_t (ReLU/FATReLU files, calibrated SiLU files) and the plain ffn_down, in float and
quantized types, with several neuron groups per layer (n_ff = 320)."""
from __future__ import annotations

import zlib

import numpy as np
import pytest

import helpers_models as H
from prosparse_convert import convert
from prosparse_rt import Model

N_FF = 320  # five groups of 64 neurons
PROMPT = H.prompt_ids(40, seed=3)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("invariance")


@pytest.fixture(scope="module")
def dirs(root):
    fat_model, fat_dir = H.make_fatrelu_dir(root / "fat", 0.1, seed=31, n_ff=N_FF, n_head_kv=2)
    _, silu_dir = H.make_llama_dir(root / "silu", seed=32, n_ff=N_FF)
    return {"fatrelu": (fat_model, fat_dir), "silu": (None, silu_dir)}


_FILES = {}


def _file(root, dirs, kind, outtype):
    key = (kind, outtype)
    if key in _FILES:
        return _FILES[key]
    out = root / f"{kind}-{outtype}.gguf"
    if kind == "fatrelu":
        pred = H.exact_predictor_dir(dirs["fatrelu"][0], root / "pred")
        convert(dirs["fatrelu"][1], out, outtype=outtype, predictor=pred, predictor_type="f32", progress=False)
    elif kind == "silu":
        convert(dirs["silu"][1], out, outtype=outtype, progress=False)
    else:  # calibrated SiLU: per-layer thresholds and an F16 ffn_down_t written by prosparse-calibrate
        from prosparse_convert.calibrate import Options, calibrate

        plain = _file(root, dirs, "silu", outtype)
        text = root / "calib.txt"
        text.write_text(" ".join(f"word{i % 97} and the{i % 13}." for i in range(4000)))
        calibrate(plain, out, Options(text=[text], tokens=1000, ctx=64, target_sparsity=0.4, allocation="uniform",
                                      down_type="f16", progress=False, n_threads=1))
    _FILES[key] = out
    return out


def _eval_chunks(m, ids, sizes):
    """Logits of every position, the prompt fed in chunks of the given sizes from position 0."""
    core = m._native()
    core.rewind(0)
    m._cache = []
    rows, i = [], 0
    for s in sizes:
        rows.append(core.eval(ids[i:i + s], all_logits=True))
        i += s
    assert i == len(ids)
    return np.concatenate(rows, axis=0)


def _random_sizes(n, rng):
    sizes = []
    while n > 0:
        s = int(rng.integers(1, 12))
        sizes.append(min(s, n))
        n -= sizes[-1]
    return sizes


CASES = [
    # (file kind, weight type, strategy)
    ("silu", "f32", "dense"),
    ("silu", "q8_0", "dense"),
    ("silu", "q4_0", "dense"),
    ("silu", "q5_0", "dense"),  # interleaved Q5_0 (and the Q6_K/Q8_0 head)
    ("fatrelu", "iq4_nl", "exact"),  # interleaved IQ4_NL attention, gathered IQ4_NL rows
    ("fatrelu", "f32", "dense"),
    ("fatrelu", "f16", "exact"),
    ("fatrelu", "q8_0", "exact"),
    ("fatrelu", "q4_0", "dense"),
    ("fatrelu", "q4_0", "exact"),
    ("fatrelu", "f32", "predict"),
    ("fatrelu", "q4_0", "predict"),
    ("calibrated", "q8_0", "exact"),
    ("calibrated", "q4_0", "dense"),
]


@pytest.mark.parametrize("interleave", ["1", "0"])
@pytest.mark.parametrize("kind,outtype,strategy", CASES)
def test_logits_do_not_depend_on_batching_threads_or_prefix_reuse(root, dirs, monkeypatch, kind, outtype,
                                                                   strategy, interleave):
    monkeypatch.setenv("PROSPARSE_INTERLEAVE", interleave)
    path = _file(root, dirs, kind, outtype)
    ids = PROMPT
    n = len(ids)
    kw = dict(predictor_threshold=-1e-6) if strategy == "predict" else {}
    rng = np.random.default_rng(zlib.crc32(f"{kind}{outtype}{strategy}{interleave}".encode()))
    results = {}
    for threads in (1, 2, 3):
        # the single batch's union (40 tokens) is most neurons, a prompt's case
        with Model(path, n_ctx=64, n_threads=threads, sparsity=strategy, **kw) as m:
            assert m.strategy == strategy
            if interleave == "1" and outtype != "f32" and outtype != "f16":
                assert m.stats["n_interleaved"] > 0
            results[(threads, "batch")] = _eval_chunks(m, ids, [n])
            results[(threads, "single")] = _eval_chunks(m, ids, [1] * n)
            results[(threads, "random")] = _eval_chunks(m, ids, _random_sizes(n, rng))
            # prefix reuse: the cache holds a prefix evaluated one way, the rest comes later
            m.logits(ids[:17])
            tail = m._native().eval(ids[17:], all_logits=True)
            results[(threads, "reuse")] = np.concatenate([results[(threads, "batch")][:17], tail], axis=0)
    ref = results[(2, "batch")]
    assert np.all(np.isfinite(ref))
    for key, got in results.items():
        np.testing.assert_array_equal(got, ref, err_msg=f"{key} differs from one batch on 2 threads")


@pytest.mark.parametrize("kind,outtype", [("fatrelu", "q4_0"), ("calibrated", "q8_0")])
def test_seeded_generate_repeats_on_a_warm_cache(root, dirs, kind, outtype):
    path = _file(root, dirs, kind, outtype)
    with Model(path, n_ctx=128, n_threads=2) as m:
        first = m.generate(PROMPT, max_tokens=24, temperature=0.9, seed=7)
        again = m.generate(PROMPT, max_tokens=24, temperature=0.9, seed=7)  # reuses the cached prefix
    with Model(path, n_ctx=128, n_threads=3, n_batch=5) as m:
        cold = m.generate(PROMPT, max_tokens=24, temperature=0.9, seed=7)
    assert first == again == cold
    assert len(first) > 0


@pytest.mark.parametrize("outtype", ["f32", "q8_0", "q4_0"])
def test_dense_exact_and_a_superset_predictor_agree_bit_for_bit(root, dirs, outtype):
    """A zero coefficient adds an exact zero, and gathered rows give the same bits as whole
    matrices: dense, exact and predict (with a predictor that misses nothing) compute the same
    numbers, not merely close ones. (The predictor sees the unquantized gate: on Q4_0 weights it
    can miss a neuron whose quantized gate fires, so predict is compared on the finer types.)"""
    path = _file(root, dirs, "fatrelu", outtype)
    out = {}
    for s in ("dense", "exact", "predict") if outtype != "q4_0" else ("dense", "exact"):
        kw = dict(predictor_threshold=-1e-6) if s == "predict" else {}
        with Model(path, n_ctx=64, n_threads=2, sparsity=s, **kw) as m:
            out[s] = m.logits(PROMPT)
    np.testing.assert_array_equal(out["exact"], out["dense"])
    if "predict" in out:
        np.testing.assert_array_equal(out["predict"], out["dense"])


def test_predict_statistics_count_each_step_once(root, dirs):
    """predict with diag_recall counts the active neurons it computes the full gate for: over many
    decode steps its active fraction must equal exact's on the same tokens, not grow with each step."""
    path = _file(root, dirs, "fatrelu", "f32")
    fracs = {}
    for s in ("exact", "predict"):
        kw = dict(predictor_threshold=-1e-6, diag_recall=True) if s == "predict" else {}
        with Model(path, n_ctx=64, n_threads=2, sparsity=s, **kw) as m:
            m.generate(PROMPT[:8], max_tokens=12, temperature=0.0)
            fracs[s] = np.array(m.stats["active_fraction"])
            if s == "predict":
                assert np.allclose(m.stats["recall"], 1.0)
    assert np.all(fracs["predict"] <= 1.0)
    np.testing.assert_allclose(fracs["predict"], fracs["exact"], rtol=1e-12)
