"""The hybrid's seam (ffn.h): a layer's neurons [0, n_hot) on one executor and [n_hot, n_ff) on
another, their neuron groups' sums chained in index order. Here both executors are CPU ones, so
any difference from the unsplit model is the seam's: split must equal unsplit bit for bit, for
every strategy, every multiple of the neuron group (64) from 0 to n_ff, and 1-3 threads."""
from __future__ import annotations

import numpy as np
import pytest

import helpers_models as H
from prosparse_convert import convert
from prosparse_rt import _core

N_FF = 320  # five groups of 64
PROMPT = H.prompt_ids(24, seed=5)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("split")
    model, d = H.make_fatrelu_dir(root / "fat", 0.1, seed=51, n_ff=N_FF)
    pred = H.exact_predictor_dir(model, root / "pred")
    out = {}
    for t in ("f32", "q4_0"):
        out[t] = convert(d, root / f"fat-{t}.gguf", outtype=t, predictor=pred, predictor_type="f32", progress=False)
    _, sd = H.make_llama_dir(root / "silu", seed=52, n_ff=N_FF)
    out["silu"] = convert(sd, root / "silu.gguf", outtype="q8_0", progress=False)
    return out


def _logits(path, strategy, threads, split, n_batch=256):
    kw = dict(pred_threshold=0.5) if strategy == "predict" else {}  # a cut-off that misses neurons
    m = _core.Model(str(path), n_ctx=64, n_threads=threads, n_batch=n_batch, sparsity=strategy,
                    test_split_hot=split, **kw)
    batch = m.eval(PROMPT, True)
    m.rewind(0)
    single = np.concatenate([m.eval([t], True) for t in PROMPT], axis=0)
    return batch, single


@pytest.mark.parametrize("strategy", ["dense", "exact", "predict"])
@pytest.mark.parametrize("wtype", ["f32", "q4_0"])
def test_split_equals_unsplit_bit_for_bit(files, strategy, wtype):
    path = files[wtype]
    ref_batch, ref_single = _logits(path, strategy, 2, -1)
    assert np.all(np.isfinite(ref_batch))
    np.testing.assert_array_equal(ref_single, ref_batch)
    for threads in (1, 2, 3):
        for split in range(0, N_FF + 1, 64):
            batch, single = _logits(path, strategy, threads, split)
            np.testing.assert_array_equal(batch, ref_batch, err_msg=f"prompt, n_hot={split}, {threads} threads")
            np.testing.assert_array_equal(single, ref_batch, err_msg=f"decode, n_hot={split}, {threads} threads")


def test_a_file_without_ffn_down_t_runs_whole_on_either_side_and_refuses_a_split(files):
    ref, _ = _logits(files["silu"], "dense", 2, -1)
    for split in (0, N_FF):
        np.testing.assert_array_equal(_logits(files["silu"], "dense", 2, split)[0], ref)
    with pytest.raises(ValueError, match="ffn_down_t"):
        _logits(files["silu"], "dense", 2, 128)


def test_a_split_off_the_neuron_groups_is_refused(files):
    with pytest.raises(ValueError, match="multiple of 64"):
        _logits(files["f32"], "exact", 2, 100)
