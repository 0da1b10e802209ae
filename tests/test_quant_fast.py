"""The fast K-quant and IQ4_NL quantizers (prosparse_convert/kquants.py, iq4nl.py: every candidate
scale for all blocks at once on transposed blocks, numpy's summation order emulated, chunked and
threaded) against the straightforward implementation they replaced (tests/oracle_kquants.py,
oracle_iq4nl.py, which bench/bench_quant.py validated against llama.cpp's quantizer), with the
scale searches in C++ (cpp/src/quant_search.cpp) and in numpy: the same bytes for every type, on
random and adversarial blocks (zero, -0.0, constant, flat negative sub-blocks, one sign only, huge,
tiny, subnormal, on the grid, sparse, outliers)."""

from __future__ import annotations

import numpy as np
import oracle_iq4nl
import oracle_kquants
import pytest

from prosparse_convert import iq4nl, kquants

F32 = np.float32
K_TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


def _adversarial(seed=0):
    """Rows of 256 weights (one super-block, eight IQ4_NL blocks each)."""
    rng = np.random.default_rng(seed)
    g = lambda *s: rng.standard_normal(s).astype(F32)  # noqa: E731
    rows = [g(256) * s for s in (1.0, 0.02, 1e-3)]
    rows += [np.zeros(256, F32), np.full(256, -0.0, F32), np.full(256, 1.0, F32), np.full(256, -3.5, F32)]
    rows.append(np.repeat(-rng.uniform(0.1, 2, 8), 32).astype(F32))  # each sub-block flat and negative
    rows.append(np.repeat(-rng.uniform(0.1, 2, 16), 16).astype(F32))  # each 16-block flat and negative
    rows.append(np.repeat(rng.uniform(0.1, 2, 8), 32).astype(F32))  # flat positive sub-blocks
    rows += [-np.abs(g(256)), np.abs(g(256)), -np.abs(g(256)) * 1e-4]
    for s in (1e30, 1e36, 3e37, 1e-10, 1e-13, 1e-14, 2e-15, 1e-15, 5e-16, 1e-20, 1e-30, 1e-38, 1e-41, 1e-44):
        rows.append((g(256) * F32(s)).astype(F32))
    r = g(256)
    r[::32] = 1e4  # one outlier per sub-block
    rows.append(r)
    r = g(256) * 1e-3
    r[7] = -50.0
    rows.append(r)
    r = g(256)
    r[32:64] = 0.0  # one zero sub-block in a normal super-block
    r[128:144] = 1e-12  # a tiny 16-block
    rows.append(r)
    mixed = g(256)
    mixed[::2] *= F32(1e-9)  # magnitudes apart inside every block
    rows.append(mixed)
    rows.append((rng.integers(-8, 8, 256) * 0.25).astype(F32))  # on a grid: ties
    rows.append((rng.integers(-127, 114, 256)).astype(F32))  # on IQ4_NL's scale
    rows.append(np.where(rng.random(256) < 0.9, 0, g(256)).astype(F32))  # sparse
    rows.append(np.where(rng.random(256) < 0.5, 1.0, -1.0).astype(F32))  # two values
    rows.append(rng.standard_t(1, 256).astype(F32))  # heavy tails
    rows.append(np.where(rng.random(256) < 0.5, 0.0, -0.0).astype(F32))
    rows.append(np.linspace(-1, 1, 256, dtype=F32))
    x = np.stack(rows).astype(F32)
    assert np.all(np.isfinite(x))
    return x


@pytest.fixture(params=["native", "numpy"])
def searches(request, monkeypatch):
    """Both versions of the K-quant scale searches: C++ (prosparse_rt's core) and numpy."""
    if request.param == "native" and kquants._native is None:
        pytest.skip("prosparse_rt._core._quant_search is not built")
    monkeypatch.setattr(kquants, "NATIVE", request.param == "native")
    return request.param


def test_the_native_searches_are_built_into_the_installed_package():
    assert kquants._native is not None


@pytest.mark.parametrize("qtype", K_TYPES)
def test_k_quants_give_the_oracles_bytes_on_adversarial_blocks(qtype, searches):
    x = _adversarial()
    with np.errstate(all="ignore"):
        want = oracle_kquants.quantize(x, qtype)
    got = kquants.quantize(x, qtype)
    assert got.dtype == want.dtype and got.shape == want.shape
    bad = np.flatnonzero(np.any(got != want, axis=1))
    assert bad.size == 0, f"{qtype}: rows {bad.tolist()} differ"


def test_iq4_nl_gives_the_oracles_bytes_on_adversarial_blocks():
    x = _adversarial()
    with np.errstate(all="ignore"):
        want = oracle_iq4nl.quantize(x)
    got = iq4nl.quantize(x)
    bad = np.flatnonzero(np.any(got != want, axis=1))
    assert got.shape == want.shape and bad.size == 0, f"rows {bad.tolist()} differ"


@pytest.mark.parametrize("qtype", K_TYPES + ["IQ4_NL"])
@pytest.mark.parametrize("threads", [1, 2])
def test_random_matrices_over_several_chunks_and_threads(qtype, threads, monkeypatch, searches):
    """More rows than one chunk (and not a multiple of it), log-normal magnitudes per row."""
    monkeypatch.setattr(kquants, "THREADS", threads)
    monkeypatch.setattr(kquants, "CHUNK_WEIGHTS", 1 << 13)
    rng = np.random.default_rng(threads)
    x = (rng.standard_normal((77, 512)) * np.exp(rng.normal(-4, 3, (77, 1)))).astype(F32)
    x[5, 100:300] = 0.0
    if qtype == "IQ4_NL":
        want, got = oracle_iq4nl.quantize(x), iq4nl.quantize(x)
    else:
        want, got = oracle_kquants.quantize(x, qtype), kquants.quantize(x, qtype)
    np.testing.assert_array_equal(got, want)


def test_nearest_grid_index_equals_the_oracles_search():
    """The table lookup of llama.cpp's best_index_int8 against the oracle's searchsorted version:
    every midpoint and its float32 neighbours, the ends, beyond them, infinities and NaN."""
    kv = oracle_iq4nl._KV
    mids = (kv[:-1] + kv[1:]) / F32(2)
    pts = np.concatenate([mids, kv, np.arange(-400, 400, 0.25, dtype=F32)])
    near = [pts]
    for direction in (np.inf, -np.inf):
        p = pts.copy()
        for _ in range(3):
            p = np.nextafter(p, F32(direction))
            near.append(p)
    rng = np.random.default_rng(3)
    v = np.concatenate(near + [rng.uniform(-140, 140, 100000).astype(F32),
                               np.array([0.0, -0.0, 1e-45, -1e-45, 1e30, -1e30, 3e38, -3e38, np.inf, -np.inf, np.nan],
                                        F32)]).astype(F32)
    with np.errstate(invalid="ignore"):
        np.testing.assert_array_equal(iq4nl._nearest(v), oracle_iq4nl._nearest(v))


@pytest.mark.parametrize("k", [16, 32])
def test_transposed_sums_are_numpys_row_sums_bit_for_bit(k):
    rng = np.random.default_rng(k)
    x = (rng.standard_normal((5000, k)) * np.exp(rng.normal(0, 5, (5000, k)))).astype(F32)
    x[0] = -0.0
    x[1, ::2] = -0.0
    want = x.sum(axis=1, dtype=F32)
    got = kquants._pw(np.ascontiguousarray(x.T))
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    if k == 32:
        np.testing.assert_array_equal(kquants._pw(np.ascontiguousarray(x.T)).view(np.uint32), want.view(np.uint32))


def test_bench_quant_speed_mode_times_every_type_and_checks_the_bytes(tmp_path):
    """bench/bench_quant.py --speed (the timing behind the README's figure) runs from the source
    tree, times the old version too, and finds the same bytes."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "bench_quant.py"
    out = tmp_path / "speed.json"
    r = subprocess.run([sys.executable, str(script), "--speed", "--speed-shapes", "8x512", "--speed-before",
                        "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())["seconds_per_mweight"]
    assert [row["type"] for row in rows] == ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL"]
    assert all(row["same_bytes"] and row["now"] > 0 and row["before"] > 0 for row in rows)


def test_native_searches_refuse_arrays_that_do_not_fit():
    """The C++ searches read and write through raw pointers: arrays whose shapes disagree, or a
    block size or code range they do not handle, are refused with an error naming the problem."""
    from prosparse_rt._core import _quant_search as q

    n, k = 4, 32
    x, w = np.zeros((n, k), F32), np.ones((n, k), F32)
    per_block = lambda m=n: np.zeros(m, F32)  # noqa: E731
    flags = np.zeros(n, np.uint8)
    codes = np.zeros((n, k), np.int32)

    def qkx2(**kw):
        a = dict(x=x, w=w, mn=per_block(), span=per_block(), flat=flags, nmax=15, rmin=-1.0, rdelta=0.1, nstep=20,
                 use_mad=False, scale=per_block(), the_min=per_block(), codes=codes)
        a.update(kw)
        q.qkx2(**a)

    qkx2()  # fits
    with pytest.raises(ValueError, match="same shape"):
        qkx2(w=np.ones((n, 16), F32))
    with pytest.raises(ValueError, match="same shape"):
        qkx2(codes=np.zeros((n + 1, k), np.int32))
    with pytest.raises(ValueError, match="scale: one value per block"):
        qkx2(scale=per_block(n - 1))
    with pytest.raises(ValueError, match="blocks of 16 or 32"):
        qkx2(x=np.zeros((n, 24), F32), w=np.ones((n, 24), F32), codes=np.zeros((n, 24), np.int32))
    with pytest.raises(ValueError, match="nmax or nstep"):
        qkx2(nmax=0)
    q.qx(x=x, mxs=per_block(), zero=flags, nmax=31, scale=per_block(), codes=codes)  # fits
    with pytest.raises(ValueError, match="mxs: one value per block"):
        q.qx(x=x, mxs=per_block(2), zero=flags, nmax=31, scale=per_block(), codes=codes)
    with pytest.raises(ValueError, match="nmax out of range"):
        q.qx(x=x, mxs=per_block(), zero=flags, nmax=200, scale=per_block(), codes=codes)
