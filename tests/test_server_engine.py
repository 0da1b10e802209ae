"""The server's continuous-batching engine without HTTP, and Model.create_chat_completion(stream=True).

The reference for every text is the same model decoding one request at a time (Model.generate):
the batch-invariance rule (docs/design.md "Determinism") makes a request's logits the same bits
batched or alone, and the engine samples each request through the same SequenceDecoder."""
from __future__ import annotations

import queue
import time
from pathlib import Path

import numpy as np
import pytest

import helpers_models as H
from prosparse_convert import convert
from prosparse_rt import Model, SamplingParams
from prosparse_rt.server.engine import Engine, QueueFull, Request

gguf = pytest.importorskip("gguf")

N_CTX = 96


@pytest.fixture(scope="module")
def fat(tmp_path_factory):
    """A FATReLU model (sparse: the exact strategy runs and computes unions), q8_0."""
    root = tmp_path_factory.mktemp("engine")
    _, d = H.make_fatrelu_dir(root / "hf", 0.1, seed=91, n_ff=320)
    return str(convert(d, root / "fat.gguf", outtype="q8_0", progress=False))


@pytest.fixture(scope="module")
def alone(fat):
    with Model(fat, n_ctx=N_CTX, n_threads=2) as m:
        yield m


def _collect(engine, reqs, hold=True):
    """Submits the requests (all before the engine's next step when hold) and waits for each one's
    (text, last event)."""
    outs = [queue.Queue() for _ in reqs]
    made = []
    for (ids, params, max_tokens), q in zip(reqs, outs):
        made.append(Request(list(ids), params, max_tokens, q.put))
    if hold:
        with engine._cond:  # nothing is admitted until all are queued: they start in one step
            for r in made:
                engine.submit(r)
    else:
        for r in made:
            engine.submit(r)
    results = []
    for q in outs:
        pieces = []
        while True:
            ev = q.get(timeout=60)
            pieces.append(ev.text)
            if ev.last:
                results.append(("".join(pieces), ev))
                break
    return results


GREEDY = SamplingParams(temperature=0.0)


def _prompts(alone):
    texts = ["The quick brown fox", "Hello world, this is", "def f(x):", "Numbers: 1 2 3 4"]
    return [alone.tokenize(t) for t in texts]


def test_four_requests_batched_get_what_each_gets_alone(fat, alone):
    prompts = _prompts(alone)
    max_tokens = [5, 17, 30, 44]  # they leave the batch at different steps
    want = [alone.generate(ids, max_tokens=n, temperature=0.0) for ids, n in zip(prompts, max_tokens)]
    with Model(fat, n_ctx=N_CTX, n_threads=2, n_seq=4) as m:
        engine = Engine(m)
        try:
            got = _collect(engine, [(ids, GREEDY, n) for ids, n in zip(prompts, max_tokens)])
            stats = engine.stats()
        finally:
            engine.close()
    assert [t for t, _ in got] == want
    assert [ev.completion_tokens for _, ev in got] == max_tokens
    assert [ev.prompt_tokens for _, ev in got] == [len(p) for p in prompts]
    assert all(ev.finish == "length" for _, ev in got)
    # one step ran all four together, then three, two, one as they finished
    assert set(stats["decode_batch_sizes"]) == {1, 2, 3, 4}
    assert stats["decode_tokens"] == sum(max_tokens) - 4  # each one's last token is sampled, never run


def test_seeded_sampling_and_stop_strings_match_generate(fat, alone):
    prompts = _prompts(alone)
    params = [SamplingParams(temperature=0.9, seed=s, top_k=0, top_p=1.0, min_p=0.0) for s in (1, 2, 3)]
    params.append(SamplingParams(temperature=0.0, stop=["e"]))
    want = []
    for ids, p in zip(prompts, params):
        want.append(alone.generate(ids, max_tokens=25, temperature=p.temperature, seed=p.seed, top_k=p.top_k,
                                   top_p=p.top_p, min_p=p.min_p, stop=p.stop))
    with Model(fat, n_ctx=N_CTX, n_threads=2, n_seq=2) as m:  # four requests on two slots: two wait
        engine = Engine(m)
        try:
            got = _collect(engine, [(ids, p, 25) for ids, p in zip(prompts, params)])
        finally:
            engine.close()
    assert [t for t, _ in got] == want


def test_a_request_joins_while_others_decode(fat, alone):
    prompts = _prompts(alone)
    want = [alone.generate(ids, max_tokens=40, temperature=0.0) for ids in prompts[:2]]
    with Model(fat, n_ctx=N_CTX, n_threads=2, n_seq=2) as m:
        engine = Engine(m)
        try:
            first = queue.Queue()
            engine.submit(Request(prompts[0], GREEDY, 40, first.put))
            pieces = [first.get(timeout=60).text]  # the first is decoding
            got = _collect(engine, [(prompts[1], GREEDY, 40)], hold=False)
            while True:
                ev = first.get(timeout=60)
                pieces.append(ev.text)
                if ev.last:
                    break
        finally:
            engine.close()
    assert got[0][0] == want[1]
    assert "".join(pieces) == want[0]


def test_generation_ends_at_the_end_of_the_context(fat, alone):
    ids = _prompts(alone)[0]
    want = alone.generate(ids, max_tokens=N_CTX, temperature=0.0)
    with Model(fat, n_ctx=N_CTX, n_threads=2, n_seq=2) as m:
        engine = Engine(m)
        try:
            ((text, ev),) = _collect(engine, [(ids, GREEDY, None)])
        finally:
            engine.close()
    assert text == want
    assert ev.finish == "length" and ev.prompt_tokens + ev.completion_tokens == N_CTX


def test_a_longer_prompt_reuses_the_slots_cache(fat, alone):
    ids = _prompts(alone)[1]
    longer = ids + H.prompt_ids(6, seed=9)  # the same start, then a new turn
    with Model(fat, n_ctx=N_CTX, n_threads=2, n_seq=2) as m:
        engine = Engine(m)
        try:
            _collect(engine, [(ids, GREEDY, 10)])
            before = engine.stats()
            ((text, _),) = _collect(engine, [(longer, GREEDY, 10)])
            after = engine.stats()
        finally:
            engine.close()
    reused = after["cached_prompt_tokens"] - before["cached_prompt_tokens"]
    assert reused >= len(ids)  # the first prompt's tokens are not run again
    assert after["prompt_tokens"] - before["prompt_tokens"] == len(longer) - reused
    assert text == alone.generate(longer, max_tokens=10, temperature=0.0)


def test_a_full_queue_is_refused_and_cancelled_requests_leave(fat, alone):
    ids = _prompts(alone)[0]
    with Model(fat, n_ctx=N_CTX, n_threads=2, n_seq=1) as m:
        engine = Engine(m, queue_size=1)
        try:
            with engine._cond:  # the engine admits nothing meanwhile
                a = Request(ids, GREEDY, None, lambda ev: None)
                b = Request(ids, GREEDY, None, lambda ev: None)
                engine.submit(a)  # takes the free slot at the next step
                engine.submit(b)  # waits
                with pytest.raises(QueueFull, match="--queue 1"):
                    engine.submit(Request(ids, GREEDY, 4, lambda ev: None))
            engine.cancel(a)
            engine.cancel(b)
            deadline = time.monotonic() + 30
            while engine.status()["queued"] or engine.status()["slots_processing"]:
                assert time.monotonic() < deadline, "cancelled requests still hold the engine"
                time.sleep(0.01)
            assert engine.stats()["cancelled"] == 2
            ((text, _),) = _collect(engine, [(ids, GREEDY, 6)], hold=False)
            status = engine.status()
        finally:
            engine.close()
    assert text == alone.generate(ids, max_tokens=6, temperature=0.0)
    assert status == {"slots_idle": 1, "slots_processing": 0, "queued": 0}


def _nan_row_file(src: str, dst: Path, token: int) -> str:
    """A copy of the f32 file src whose token_embd row `token` is NaN: that token's logits are NaN."""
    tensor = {t.name: t for t in gguf.GGUFReader(src).tensors}["token_embd.weight"]
    assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
    n_embd = int(tensor.shape[0])
    data = bytearray(Path(src).read_bytes())
    at = int(tensor.data_offset) + token * n_embd * 4
    data[at:at + n_embd * 4] = np.full(n_embd, np.nan, np.float32).tobytes()
    dst.write_bytes(bytes(data))
    return str(dst)


def test_nan_in_one_request_fails_that_request_only(tmp_path):
    _, d = H.make_llama_dir(tmp_path / "hf", hidden_act="relu", seed=23)
    good = str(convert(d, tmp_path / "m.gguf", outtype="f32", progress=False))
    bad_token = 77
    path = _nan_row_file(good, tmp_path / "nan.gguf", bad_token)
    prompts = [[1, 5, 9, 12], [1, 40, bad_token, 41], [1, 200, 201]]
    with Model(good, n_ctx=64, n_threads=2) as ref:
        want = [ref.generate(p, max_tokens=12, temperature=0.0) for p in (prompts[0], prompts[2])]
    with Model(path, n_ctx=64, n_threads=2, n_seq=3) as m:
        engine = Engine(m)
        try:
            got = _collect(engine, [(p, GREEDY, 12) for p in prompts])
            after = _collect(engine, [(prompts[0], GREEDY, 12)])  # the engine goes on
        finally:
            engine.close()
    assert got[1][1].error is not None and "non-finite" in got[1][1].error
    assert [got[0][0], got[2][0]] == want
    assert after[0][0] == want[0]


def test_union_sparsity_is_reported_by_batch_size(fat, alone):
    """The union of the active rows over a step's tokens, against numpy's count from the captured
    gate pre-activations (FATReLU: active where gate >= t)."""
    prompts = _prompts(alone)
    with Model(fat, n_ctx=N_CTX, n_threads=2, n_seq=3) as m:
        core = m._native()
        for s, ids in enumerate(prompts[:3]):
            core.eval_batch(ids[:2], [0, 1], [s] * 2)
        core.set_capture(True)
        core.eval_batch([ids[2] for ids in prompts[:3]], [2, 2, 2], [0, 1, 2])  # the one step of three tokens
        t = m.hparams["activation_threshold"]
        n_ff, n_layer = m.hparams["n_ff"], m.hparams["n_layer"]
        want = np.mean([(core.captured(il)[1] >= t).any(axis=0).sum() / n_ff for il in range(n_layer)])
        stats = m.stats
    assert stats["union_fraction_by_batch"][3] == pytest.approx(want, rel=1e-12)
    per_token = np.mean(stats["active_fraction"])
    assert per_token < stats["union_fraction_by_batch"][3] < 1.0


def test_the_model_generates_as_before_after_the_engine_closes(fat, alone):
    ids = _prompts(alone)[0]
    with Model(fat, n_ctx=N_CTX, n_threads=2, n_seq=1) as m:
        m.generate(ids, max_tokens=4, temperature=0.0)  # cached in sequence 0 by the Model
        engine = Engine(m)
        try:
            _collect(engine, [(_prompts(alone)[1], GREEDY, 8)])  # the engine overwrites sequence 0
        finally:
            engine.close()
        assert m.generate(ids, max_tokens=12, temperature=0.0) == alone.generate(ids, max_tokens=12, temperature=0.0)


def test_dense_reports_no_union(fat):
    with Model(fat, n_ctx=N_CTX, n_threads=2, n_seq=2, sparsity="dense") as m:
        m._native().eval_batch([1, 5, 1, 6], [0, 1, 0, 1], [0, 0, 1, 1])
        assert m.stats["union_fraction_by_batch"] == {}  # dense reads every row: no union to report


def test_a_small_step_budget_still_serves_every_prompt(fat, alone):
    prompts = _prompts(alone)
    want = [alone.generate(ids, max_tokens=8, temperature=0.0) for ids in prompts]
    with Model(fat, n_ctx=N_CTX, n_threads=2, n_seq=4, n_batch=2) as m:
        engine = Engine(m, step_tokens=2)  # fewer tokens per step than decoding slots
        try:
            got = _collect(engine, [(ids, GREEDY, 8) for ids in prompts])
        finally:
            engine.close()
    assert [t for t, _ in got] == want


def test_create_chat_completion_streams_openai_chunks(alone):
    messages = [{"role": "user", "content": "Say something"}]
    whole = alone.create_chat_completion(messages, max_tokens=20, temperature=0.0)
    chunks = list(alone.create_chat_completion(messages, max_tokens=20, temperature=0.0, stream=True))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None,
                                        "finish_reason": whole["choices"][0]["finish_reason"]}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == whole["choices"][0]["message"]["content"] == alone.chat(messages, max_tokens=20, temperature=0.0)
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_create_chat_completion_stream_checks_arguments_at_the_call(alone):
    with pytest.raises(ValueError, match="max_tokens"):
        alone.create_chat_completion([{"role": "user", "content": "x"}], max_tokens=0, stream=True)


def test_engine_refuses_a_prompt_that_does_not_fit(fat, alone):
    with Model(fat, n_ctx=16, n_threads=2, n_seq=1) as m:
        engine = Engine(m)
        try:
            with pytest.raises(ValueError, match="does not fit the context of 16"):
                engine.submit(Request(list(range(3, 19)), GREEDY, 4, lambda ev: None))
        finally:
            engine.close()


class _EogAt:
    """The native model with one more end-of-generation token (``eog``), recording each token the
    decoder asks about: the sampled tokens, in order."""

    def __init__(self, core, eog=None):
        self._core, self.eog, self.seen = core, eog, []

    def is_eog(self, tok):
        self.seen.append(tok)
        return tok == self.eog or self._core.is_eog(tok)

    def __getattr__(self, name):
        return getattr(self._core, name)


def test_ignore_eos_generates_past_an_end_of_generation_token(fat, alone):
    ids = _prompts(alone)[1]

    def run(engine, ignore_eos):
        q = queue.Queue()
        engine.submit(Request(list(ids), GREEDY, 10, q.put, ignore_eos=ignore_eos))
        pieces = []
        while True:
            ev = q.get(timeout=60)
            pieces.append(ev.text)
            if ev.last:
                return "".join(pieces), ev

    with Model(fat, n_ctx=N_CTX, n_threads=2, n_seq=2) as m:
        engine = Engine(m)
        try:
            engine._core = spy = _EogAt(engine._core)
            text, ev = run(engine, False)
            assert ev.finish == "length" and ev.completion_tokens == 10
            # the k-th sampled token (k >= 2, where it is sampled for the first time) becomes an EOG
            k = next(i for i in range(2, 10) if spy.seen[i] not in spy.seen[:i])
            spy.eog = spy.seen[k]
            cut, ev_cut = run(engine, False)
            assert (ev_cut.finish, ev_cut.completion_tokens) == ("stop", k)
            assert text.startswith(cut) and len(cut) < len(text)
            full, ev_full = run(engine, True)  # llama-server's ignore_eos: the EOG is just a token
            assert (ev_full.finish, ev_full.completion_tokens, full) == ("length", 10, text)
        finally:
            engine.close()
