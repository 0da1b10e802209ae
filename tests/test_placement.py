"""Placement from a VRAM budget (cpp/src/placement.cpp), through `_core.placement`.

The specification (docs/design.md, "The CPU/GPU hybrid"): blocks are placed highest expected bytes read per byte
first, across all layers, until the next one does not fit; a layer's attention (with its KV cache
and predictor) is one block read every token; a layer's FFN is placed in groups of 64 neurons from
neuron 0 (a prefix, since files are in frequency order), each neuron's rows read every token
(gate under `exact`) or only when it fires (up, ffn_down_t). The checks below recompute every
quantity in Python from that description and the returned placement, so a placement that breaks
the budget, the prefix rule or the order of preference fails here.

Run as a script to print the LLaMA-2-7B-shaped table for the README:
`python tests/test_placement.py`.
"""

import math

import numpy as np
import pytest

from prosparse_rt import _core

GROUP = 64
GiB = 1 << 30


def _layer_bytes(layer):
    return layer.get("attention_bytes", 0) + layer.get("kv_bytes", 0) + layer.get("predictor_bytes", 0)


def _neuron_bytes(layer):
    return layer.get("neuron_bytes_always", 0) + layer.get("neuron_bytes_fired", 0)


def _total_bytes(layers, output_bytes):
    return output_bytes + sum(_layer_bytes(l) + _neuron_bytes(l) * len(l["freq"]) for l in layers)


def _expected_reads(layer, lo, hi):
    """Expected bytes read per token from neurons [lo, hi) of a layer."""
    f = np.asarray(layer["freq"][lo:hi], dtype=np.float64)
    return (hi - lo) * layer.get("neuron_bytes_always", 0) + f.sum() * layer.get("neuron_bytes_fired", 0)


def _gpu_cpu_from(p, layers, output_bytes):
    """(gpu bytes, gpu reads, cpu reads) implied by the per-block decisions of a placement."""
    gpu = output_bytes if p["output_on_gpu"] else 0
    gpu_reads = float(gpu)
    cpu_reads = 0.0 if p["output_on_gpu"] else float(output_bytes)
    for layer, lp in zip(layers, p["layers"]):
        a = _layer_bytes(layer)
        n_ff, h = len(layer["freq"]), lp["n_hot"]
        if lp["attention_on_gpu"]:
            gpu += a
            gpu_reads += a
        else:
            cpu_reads += a
        gpu += h * _neuron_bytes(layer)
        gpu_reads += _expected_reads(layer, 0, h)
        cpu_reads += _expected_reads(layer, h, n_ff)
    return gpu, gpu_reads, cpu_reads


def _random_freq(rng, n_ff):
    kind = rng.integers(4)
    if kind == 0:
        f = rng.beta(0.3, 2.0, n_ff)
    elif kind == 1:
        f = rng.uniform(0, 1, n_ff)
    elif kind == 2:  # ties and exact 0/1, the edge of the order
        f = rng.choice([0.0, 0.25, 1.0], n_ff)
    else:
        f = np.full(n_ff, rng.uniform(0, 1))
    return np.sort(f.astype(np.float32))[::-1].copy()


def _random_model(rng):
    layers = []
    for _ in range(int(rng.integers(0, 6))):
        n_ff = int(rng.choice([0, 1, 63, 64, 65, 128, 200, 1000]))
        layers.append({
            "attention_bytes": int(rng.integers(0, 50_000)),
            "kv_bytes": int(rng.integers(0, 20_000)),
            "predictor_bytes": int(rng.choice([0, int(rng.integers(1, 5_000))])),
            "neuron_bytes_always": int(rng.integers(0, 40)),
            "neuron_bytes_fired": int(rng.integers(0, 80)),
            "freq": _random_freq(rng, n_ff),
        })
    return layers, int(rng.integers(0, 30_000))


def _check_placement(p, layers, output_bytes, budget):
    total = _total_bytes(layers, output_bytes)
    assert p["gpu_bytes"] <= budget
    assert p["gpu_bytes"] + p["cpu_bytes"] == total
    gpu, gpu_reads, cpu_reads = _gpu_cpu_from(p, layers, output_bytes)
    assert p["gpu_bytes"] == gpu
    assert p["gpu_bytes_per_token"] == pytest.approx(gpu_reads, rel=1e-6, abs=1e-6)
    assert p["cpu_bytes_per_token"] == pytest.approx(cpu_reads, rel=1e-6, abs=1e-6)
    for layer, lp in zip(layers, p["layers"]):
        n_ff = len(layer["freq"])
        assert 0 <= lp["n_hot"] <= n_ff
        assert lp["n_hot"] % GROUP == 0 or lp["n_hot"] == n_ff


def test_respects_the_budget_for_random_inputs():
    rng = np.random.default_rng(12)
    for _ in range(300):
        layers, output_bytes = _random_model(rng)
        total = _total_bytes(layers, output_bytes)
        for budget in (0, int(rng.integers(0, total + 2)), total // 2, total - 1 if total else 0):
            p = _core.placement(layers, output_bytes, budget)
            assert len(p["layers"]) == len(layers)
            _check_placement(p, layers, output_bytes, budget)


def _densities(layers, output_bytes, p):
    """Expected reads per byte of the placed and of the unplaced blocks (zero-byte blocks left out)."""
    placed, unplaced = [], []
    if output_bytes:
        (placed if p["output_on_gpu"] else unplaced).append(1.0)
    for layer, lp in zip(layers, p["layers"]):
        if _layer_bytes(layer):
            (placed if lp["attention_on_gpu"] else unplaced).append(1.0)
        n_ff = len(layer["freq"])
        if not _neuron_bytes(layer):
            continue
        for g0 in range(0, n_ff, GROUP):
            g1 = min(g0 + GROUP, n_ff)
            d = _expected_reads(layer, g0, g1) / ((g1 - g0) * _neuron_bytes(layer))
            (placed if g1 <= lp["n_hot"] else unplaced).append(d)
    return placed, unplaced


def test_places_highest_reads_per_byte_first():
    # Whatever is on the GPU is read at least as often per byte as whatever is not: the greedy
    # order. (Relative slack for the float32 frequencies summed in another order.)
    rng = np.random.default_rng(3)
    for _ in range(200):
        layers, output_bytes = _random_model(rng)
        budget = int(rng.integers(0, _total_bytes(layers, output_bytes) + 2))
        p = _core.placement(layers, output_bytes, budget)
        placed, unplaced = _densities(layers, output_bytes, p)
        if placed and unplaced:
            assert min(placed) >= max(unplaced) * (1 - 1e-6)


def test_grows_monotonically_with_the_budget():
    rng = np.random.default_rng(5)
    for _ in range(60):
        layers, output_bytes = _random_model(rng)
        total = _total_bytes(layers, output_bytes)
        budgets = sorted(int(b) for b in rng.integers(0, total + 2, size=25))
        prev = None
        for b in budgets:
            p = _core.placement(layers, output_bytes, b)
            if prev is not None:
                assert p["gpu_bytes"] >= prev["gpu_bytes"]
                assert p["gpu_bytes_per_token"] >= prev["gpu_bytes_per_token"] - 1e-6
                assert p["output_on_gpu"] >= prev["output_on_gpu"]
                for now, before in zip(p["layers"], prev["layers"]):
                    assert now["attention_on_gpu"] >= before["attention_on_gpu"]
                    assert now["n_hot"] >= before["n_hot"]
            prev = p


def test_extremes_nothing_and_everything():
    rng = np.random.default_rng(7)
    for _ in range(50):
        layers, output_bytes = _random_model(rng)
        if not layers:
            continue
        for layer in layers:  # every block has bytes, so budget 0 places nothing
            layer["attention_bytes"] += 1
            layer["neuron_bytes_fired"] += 1
        output_bytes += 1
        total = _total_bytes(layers, output_bytes)
        p0 = _core.placement(layers, output_bytes, 0)
        assert p0["gpu_bytes"] == 0 and p0["cpu_bytes"] == total and p0["gpu_bytes_per_token"] == 0
        assert not p0["output_on_gpu"]
        assert all(not lp["attention_on_gpu"] and lp["n_hot"] == 0 for lp in p0["layers"])
        for budget in (total, total + 1, 2**63 - 1):
            p = _core.placement(layers, output_bytes, budget)
            assert p["gpu_bytes"] == total and p["cpu_bytes"] == 0 and p["cpu_bytes_per_token"] == 0
            assert p["output_on_gpu"]
            for layer, lp in zip(layers, p["layers"]):
                assert lp["attention_on_gpu"] and lp["n_hot"] == len(layer["freq"])
        p = _core.placement(layers, output_bytes, total - 1)  # one byte short: something stays
        assert p["cpu_bytes"] > 0


def test_n_hot_is_rounded_down_to_the_group():
    # 1000 neurons of 10 bytes, no attention: a budget of 64 * 10 * 3 + 639 holds 3 groups and
    # most of a fourth, which is not placed (the budget is never exceeded).
    layer = {"neuron_bytes_fired": 10, "freq": np.linspace(0.9, 0.1, 1000, dtype=np.float32)}
    p = _core.placement([layer], 0, 64 * 10 * 3 + 639)
    assert p["layers"][0]["n_hot"] == 192
    assert p["gpu_bytes"] == 1920
    # n_ff not a multiple of 64: the last, short group is placed whole or not at all
    p = _core.placement([layer], 0, 10_000)
    assert p["layers"][0]["n_hot"] == 1000
    p = _core.placement([layer], 0, 9_999)
    assert p["layers"][0]["n_hot"] == 960
    # another group size (the executor's may change)
    p = _core.placement([layer], 0, 1000, group=32)
    assert p["layers"][0]["n_hot"] == 96


def test_a_layer_without_ffn_down_t_moves_its_ffn_whole():
    # ffn.h: only ffn_down_t splits a layer's neurons, so such a layer's n_hot is 0 or n_ff
    layer = {"neuron_bytes_always": 10, "freq": np.ones(1000, np.float32), "whole_ffn": True}
    assert _core.placement([layer], 0, 9_999)["layers"][0]["n_hot"] == 0
    p = _core.placement([layer], 0, 10_000)
    assert p["layers"][0]["n_hot"] == 1000 and p["gpu_bytes"] == 10_000
    split = dict(layer, whole_ffn=False)
    assert _core.placement([split], 0, 9_999)["layers"][0]["n_hot"] == 960


def test_prefers_attention_over_rare_neurons():
    # Per byte, attention (read every token) beats neurons that fire 5% of the time, even when the
    # neurons are in an earlier layer and fit in the budget while the attention just fits.
    rare = {"attention_bytes": 0, "neuron_bytes_always": 0, "neuron_bytes_fired": 100,
            "freq": np.full(640, 0.05, np.float32)}
    attn = {"attention_bytes": 60_000, "kv_bytes": 4_000, "freq": np.zeros(0, np.float32)}
    p = _core.placement([rare, attn], 0, 64_000)
    assert p["layers"][1]["attention_on_gpu"]
    assert p["layers"][0]["n_hot"] == 0
    # ...but hot neurons (always read gate rows, frequent firing) beat rarer ones in another layer
    hot = {"neuron_bytes_always": 50, "neuron_bytes_fired": 100, "freq": np.full(128, 0.9, np.float32)}
    p = _core.placement([rare, hot], 0, 128 * 150)
    assert p["layers"][1]["n_hot"] == 128 and p["layers"][0]["n_hot"] == 0
    # ties at probability 1 go to attention first
    always = {"neuron_bytes_always": 100, "freq": np.zeros(64, np.float32)}
    p = _core.placement([always, attn], 0, 64_000)
    assert p["layers"][1]["attention_on_gpu"] and p["layers"][0]["n_hot"] == 0


def test_is_frequency_ordered():
    f = _core.is_frequency_ordered
    assert f(np.array([], np.float32))
    assert f(np.array([0.5], np.float32))
    assert f(np.array([0.9, 0.9, 0.5, 0.0], np.float32))
    assert not f(np.array([0.1, 0.2], np.float32))
    assert not f(np.array([0.5, np.nan, 0.1], np.float32))


def test_unordered_file_is_an_error_naming_the_fix():
    layer = {"neuron_bytes_fired": 10, "freq": np.array([0.1, 0.5, 0.3], np.float32)}
    with pytest.raises(ValueError, match=r"layer 0.*prosparse-calibrate --neuron-order frequency"):
        _core.placement([layer], 0, 100)
    # a caller holding such a file places a frequency-ordered copy: sort, then place
    order = np.argsort(-layer["freq"], kind="stable")
    layer["freq"] = layer["freq"][order]
    assert _core.placement([layer], 0, 100, group=1)["layers"][0]["n_hot"] == 3


def test_freq_may_be_any_one_dimensional_sequence():
    for freq in ([0.5, 0.2], np.array([0.5, 0.2]), np.array([0.9, 0.5, 0.2], np.float32)[::2]):
        layer = {"neuron_bytes_fired": 1, "freq": freq}
        assert _core.placement([layer], 0, 10, group=1)["layers"][0]["n_hot"] == 2


@pytest.mark.parametrize("kwargs, match", [
    (dict(budget_bytes=-1), "budget_bytes must be >= 0"),
    (dict(budget_bytes=1.5), "budget_bytes must be an int"),
    (dict(budget_bytes=2**64), "budget_bytes is too large"),
    (dict(output_bytes=-3), "output_bytes must be >= 0"),
    (dict(group=0), "group size must be >= 1"),
    (dict(layers=[{"kv_bytes": -1}]), "kv_bytes must be >= 0"),
    (dict(layers=[{"attn_bytes": 1}]), "unknown key 'attn_bytes'"),
    (dict(layers=[{"freq": np.array([1.5], np.float32)}]), r"frequency 1\.5, outside \[0, 1\]"),
    (dict(layers=[{"freq": np.array([np.nan], np.float32)}]), "outside"),
    (dict(layers=[{"freq": np.ones((2, 64), np.float32)}]), "freq must be one-dimensional"),
    (dict(layers=[7]), "layer 0 is not a dict"),
])
def test_bad_parameters_raise(kwargs, match):
    args = dict(layers=[], output_bytes=0, budget_bytes=0, group=64)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        _core.placement(**args)


# --- the LLaMA-2-7B shape ----------------------------------------------------------------------

def power_law_freq(n_ff, mean=0.11, alpha=1.5):
    """Firing frequencies, hottest first: f(x) = min(1, c x^-alpha) at x = (i + 0.5) / n_ff, c set
    so the mean is `mean` (FATReLU ProSparse-7B: ~89% sparsity). With alpha = 1.5 the hottest 20%
    of the neurons hold 80% of the firings, the skew PowerInfer reports for ReLU LLaMA models; 4%
    of the neurons fire on every token, the median one on 2.5% of the tokens."""
    x = (np.arange(n_ff) + 0.5) / n_ff
    lo, hi = 0.0, 1.0
    for _ in range(100):  # bisection on c: the mean grows with c
        c = (lo + hi) / 2
        if np.minimum(1.0, c * x ** -alpha).mean() < mean:
            lo = c
        else:
            hi = c
    return np.minimum(1.0, c * x ** -alpha).astype(np.float32)


def llama2_7b_q4_0(n_ctx=2048):
    """LLaMA-2-7B (n_embd 4096, n_ff 11008, 32 layers, 32 heads, n_vocab 32000) at Q4_0 (18 bytes
    per 32 weights), F32 norms and KV cache, run with `exact` (gate rows read every token; up and
    ffn_down_t rows when the neuron fires; no predictor). The token embeddings stay on the CPU
    (one row read per token) and are not placed."""
    E, F, L, V = 4096, 11008, 32, 32000
    row = E // 32 * 18  # one Q4_0 row of n_embd weights: 2304 bytes
    freq = power_law_freq(F)
    layer = {
        "attention_bytes": 4 * E * row + 2 * E * 4,  # wq wk wv wo (32 KV heads), two norms
        "kv_bytes": 2 * n_ctx * E * 4,                 # K and V, f32
        "predictor_bytes": 0,
        "neuron_bytes_always": row,                    # gate row
        "neuron_bytes_fired": 2 * row,                 # up row and ffn_down_t row
        "freq": freq,
    }
    return [dict(layer) for _ in range(L)], V * row + E * 4


def placement_table(budgets_gib=(4, 8, 24)):
    layers, output_bytes = llama2_7b_q4_0()
    total = _total_bytes(layers, output_bytes)
    rows = ["| VRAM budget | on the GPU | attention on the GPU | mean n_hot (of 11008) | "
            "read per token: GPU | CPU |",
            "| --- | --- | --- | --- | --- | --- |"]
    out = []
    for b in budgets_gib:
        p = _core.placement(layers, output_bytes, b * GiB)
        out.append(p)
        n_attn = sum(lp["attention_on_gpu"] for lp in p["layers"])
        mean_hot = np.mean([lp["n_hot"] for lp in p["layers"]])
        rows.append(f"| {b} GiB | {p['gpu_bytes'] / GiB:.2f} GiB of {total / GiB:.2f} | "
                    f"{n_attn} of {len(layers)} layers{', and output' if p['output_on_gpu'] else ''} | "
                    f"{mean_hot:.0f} | {p['gpu_bytes_per_token'] / 1e9:.2f} GB | "
                    f"{p['cpu_bytes_per_token'] / 1e9:.2f} GB |")
    return "\n".join(rows), out, total


def test_llama2_7b_shape_at_4_8_24_gib():
    freq = power_law_freq(11008)
    assert freq.mean() == pytest.approx(0.11, rel=1e-3)
    assert freq[: 11008 // 5].sum() / freq.sum() == pytest.approx(0.8, abs=0.01)
    table, (p4, p8, p24), total = placement_table()
    layers, output_bytes = llama2_7b_q4_0()
    for p, b in ((p4, 4), (p8, 8), (p24, 24)):
        _check_placement(p, layers, output_bytes, b * GiB)
    # 4 GiB: output and every layer's attention and KV cache (3.2 GiB, read every token) first,
    # then the hottest neurons of every layer alike (the layers are the same)
    assert p4["output_on_gpu"] and all(lp["attention_on_gpu"] for lp in p4["layers"])
    hots = {lp["n_hot"] for lp in p4["layers"]}
    assert max(hots) - min(hots) <= GROUP and 0 < min(hots) < 11008
    assert 4 * GiB - p4["gpu_bytes"] < 11008 * 6912  # the budget is used up to less than a layer's FFN
    # the Q4_0 7B with a 2048-token f32 KV cache is 5.5 GiB: 8 and 24 GiB hold all of it
    assert total < 8 * GiB
    for p in (p8, p24):
        assert p["gpu_bytes"] == total and p["cpu_bytes_per_token"] == 0
    # the hot prefix holds far more than its share of the reads: the point of the split
    frac_neurons = np.mean([lp["n_hot"] for lp in p4["layers"]]) / 11008
    f = layers[0]["freq"].astype(np.float64)
    frac_firings = f[: p4["layers"][0]["n_hot"]].sum() / f.sum()
    assert frac_firings > frac_neurons + 0.2


if __name__ == "__main__":
    print(placement_table((2, 4, 8, 24))[0])
