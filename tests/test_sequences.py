"""Several sequences in one forward pass (the KV cache's sequences, Model::eval(TokenBatch)): each
sequence's logits are the same bits as when it runs alone, for every strategy, although the
sparse strategies compute the union of all sequences' active neurons (docs/design.md,
"Determinism"). The reference is the same model with one sequence, one at a time."""
from __future__ import annotations

import numpy as np
import pytest

import helpers_models as H
from prosparse_convert import convert
from prosparse_rt import _core


@pytest.fixture(scope="module")
def fat(tmp_path_factory):
    root = tmp_path_factory.mktemp("seqs")
    model, d = H.make_fatrelu_dir(root / "hf", 0.1, seed=81, n_ff=320)
    pred = H.exact_predictor_dir(model, root / "pred")
    return convert(d, root / "fat.gguf", outtype="q4_0", predictor=pred, predictor_type="f32", progress=False)


def _alone(path, strategy, ids, steps):
    """Prompt logits (every position) and greedy decode logits of one sequence on its own."""
    m = _core.Model(str(path), n_ctx=64, n_threads=2, sparsity=strategy, pred_threshold=0.5)
    prompt = m.eval(ids, True)
    out, tok = [], int(np.argmax(prompt[-1]))
    for _ in range(steps):
        row = m.eval([tok])
        out.append(row)
        tok = int(np.argmax(row))
    return prompt, np.stack(out)


@pytest.mark.parametrize("strategy", ["dense", "exact", "predict"])
def test_sequences_batched_together_get_what_each_gets_alone(fat, strategy):
    a, b, c = H.prompt_ids(9, seed=1), H.prompt_ids(14, seed=2), H.prompt_ids(4, seed=3)
    steps = 5
    want = [_alone(fat, strategy, ids, steps) for ids in (a, b, c)]
    m = _core.Model(str(fat), n_ctx=64, n_threads=3, n_batch=8, sparsity=strategy, pred_threshold=0.5, n_seq=3)
    # the three prompts interleaved in one batch (chunks of 8 cut across them)
    order = [(s, i) for i in range(14) for s, ids in enumerate((a, b, c)) if i < len(ids)]
    toks = [(a, b, c)[s][i] for s, i in order]
    got = m.eval_batch(toks, [i for _, i in order], [s for s, _ in order], True)
    for s, ids in enumerate((a, b, c)):
        rows = [k for k, (q, _) in enumerate(order) if q == s]
        np.testing.assert_array_equal(got[rows], want[s][0], err_msg=f"prompt of sequence {s}")
        assert m.seq_len(s) == len(ids)
    # decode: one token per sequence per step, all three in one batch
    nxt = [int(np.argmax(want[s][0][-1])) for s in range(3)]
    for step in range(steps):
        rows = m.eval_batch(nxt, [m.seq_len(s) for s in range(3)], [0, 1, 2], False)
        for s in range(3):
            np.testing.assert_array_equal(rows[s], want[s][1][step], err_msg=f"step {step}, sequence {s}")
        nxt = [int(np.argmax(r)) for r in rows]


def test_a_sequence_rewinds_alone_and_bad_batches_are_refused(fat):
    m = _core.Model(str(fat), n_ctx=16, n_threads=2, n_seq=2)
    m.eval_batch([5, 6, 7, 8], [0, 0, 1, 1], [0, 1, 0, 1])
    m.rewind(1, seq=1)
    assert (m.seq_len(0), m.seq_len(1)) == (2, 1)
    for toks, pos, seq, msg in (([5], [0], [2], "sequence 2 is out of range"),
                                ([5], [5], [0], "position 5 of sequence 0, which holds 2"),
                                ([5, 6], [2, 2], [0, 0], "position 2 of sequence 0, which holds 3"),
                                ([5], [1], [1, 0], "1 tokens, 1 positions and 2 sequences")):
        with pytest.raises(ValueError, match=msg):
            m.eval_batch(toks, pos, seq)
        assert (m.seq_len(0), m.seq_len(1)) == (2, 1)  # a refused batch changes nothing
    with pytest.raises(ValueError, match="context overflow"):
        m.eval_batch(list(range(3, 19)), list(range(1, 17)), [1] * 16)  # positions 1..16 of 16
    with pytest.raises(ValueError, match="n_seq"):
        _core.Model(str(fat), n_ctx=16, n_seq=0)


@pytest.mark.parametrize("sparsity", ["dense", "exact"])
def test_stats_give_the_weight_bytes_of_a_decode_step_by_its_token_count(fat, sparsity):
    """A decode step of n sequences reads every weight once (dense) or the union of its tokens'
    active rows once (exact): at least any one token's rows, at most n tokens' own reads."""
    m = _core.Model(str(fat), n_ctx=64, n_threads=2, n_seq=3, sparsity=sparsity)
    for s, n in enumerate((5, 7, 6)):
        m.eval_batch(H.prompt_ids(n, seed=s), list(range(n)), [s] * n)
    assert m.stats()["weight_bytes_per_step_by_batch"] == {}  # prompts are not decode steps
    one = []
    for t in (7, 8, 9):  # each sequence alone, then the three together
        m.eval_batch([t], [m.seq_len(0)], [0])
        one.append(m.stats()["weight_bytes_per_token"])
    for _ in range(4):
        m.eval_batch([7, 8, 9], [m.seq_len(s) for s in range(3)], [0, 1, 2])
    by_n = m.stats()["weight_bytes_per_step_by_batch"]
    assert set(by_n) == {1, 3}
    assert by_n[1] == pytest.approx(sum(one) / 3)
    if sparsity == "dense":
        assert by_n[3] == pytest.approx(by_n[1])
    else:
        assert min(one) <= by_n[3] < 3 * max(one)


def test_stats_count_a_batched_decode_step_as_decode_tokens(fat):
    """A sequence with one token in a call takes a decode step, one with several runs prompt,
    whatever else shares the call: three sequences decoding together are three decode tokens (they
    were once counted as a 3-token prompt), and a step mixing both counts each kind as what it is."""
    m = _core.Model(str(fat), n_ctx=64, n_threads=2, n_seq=3)

    def counts():
        s = m.stats()
        return s["n_prompt_tokens"], s["n_decode_tokens"], s["prompt_seconds"], s["decode_seconds"]

    a, b, c = H.prompt_ids(9, seed=1), H.prompt_ids(14, seed=2), H.prompt_ids(4, seed=3)
    toks = a + b + c
    seq = [0] * len(a) + [1] * len(b) + [2] * len(c)
    pos = list(range(len(a))) + list(range(len(b))) + list(range(len(c)))
    m.eval_batch(toks, pos, seq)
    n_p, n_d, s_p, s_d = counts()
    assert (n_p, n_d, s_d) == (27, 0, 0.0) and s_p > 0
    for _ in range(5):  # three sequences, one token each, in one call: decode
        m.eval_batch([7, 8, 9], [m.seq_len(s) for s in range(3)], [0, 1, 2])
    n_p, n_d, s_p2, s_d = counts()
    assert (n_p, n_d, s_p2) == (27, 15, s_p) and s_d > 0
    # sequence 0 decodes while sequence 1 runs two more prompt tokens and sequence 2 waits
    m.eval_batch([3, 4, 5], [m.seq_len(0), m.seq_len(1), m.seq_len(1) + 1], [0, 1, 1])
    n_p, n_d, s_p3, s_d3 = counts()
    assert (n_p, n_d) == (29, 16)
    assert s_p3 > s_p and s_d3 > s_d
    # one sequence alone: one token is a decode step, several a prompt (as before)
    m.eval([11])
    m.eval([12, 13])
    assert counts()[:2] == (31, 17)
