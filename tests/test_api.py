"""The Python API's contract (docs/design.md "Python API and command lines"), on the real SmolLM2 model."""
import threading

import numpy as np
import pytest

from prosparse_rt import Model
from prosparse_rt.model import usable_cores
from prosparse_rt._generation import TextAssembler


@pytest.fixture(scope="module")
def model(smollm2_path):
    with Model(smollm2_path, n_ctx=512, n_threads=2) as m:
        yield m


PROMPT = "The capital of France is"


def test_greedy_generation_is_deterministic(model):
    a = model.generate(PROMPT, max_tokens=16, temperature=0.0)
    b = model.generate(PROMPT, max_tokens=16, temperature=0.0)
    assert a == b
    assert len(model.tokenize(a, add_bos=False)) >= 8  # it wrote something real, not an early stop


def test_greedy_matches_argmax_of_logits(model):
    """temperature 0 is exactly argmax of the model's logits, token by token."""
    ids = model.tokenize(PROMPT)
    text = model.generate(ids, max_tokens=4, temperature=0.0)
    out = list(ids)
    for _ in range(4):
        out.append(int(np.argmax(model.logits(out)[-1])))
    assert text == model.detokenize(out[len(ids):])


def test_same_seed_same_sample_and_different_seeds_differ(model):
    kw = dict(max_tokens=24, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    a = model.generate(PROMPT, seed=7, **kw)
    b = model.generate(PROMPT, seed=7, **kw)
    assert a == b
    others = {model.generate(PROMPT, seed=s, **kw) for s in (1, 2, 3)}
    assert len(others | {a}) > 1


def test_streaming_yields_the_same_text(model):
    kw = dict(max_tokens=24, temperature=0.7, seed=3)
    pieces = list(model.generate(PROMPT, stream=True, **kw))
    assert "".join(pieces) == model.generate(PROMPT, **kw)
    assert len(pieces) > 1


def test_break_cancels_a_stream_and_the_model_stays_usable(model):
    for i, _ in enumerate(model.generate(PROMPT, max_tokens=100, temperature=0.0, stream=True)):
        if i == 2:
            break
    assert model.generate(PROMPT, max_tokens=8, temperature=0.0) == model.generate(PROMPT, max_tokens=8, temperature=0.0)


def test_max_tokens_holds(model):
    out = model.create_completion(PROMPT, max_tokens=5, temperature=0.0)
    assert out["usage"]["completion_tokens"] <= 5
    assert out["choices"][0]["finish_reason"] in ("length", "stop")
    if out["choices"][0]["finish_reason"] == "length":
        assert out["usage"]["completion_tokens"] == 5


def test_stop_string_truncates_and_streaming_agrees(model):
    full = model.generate(PROMPT, max_tokens=24, temperature=0.0)
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip(), full
    out = model.create_completion(PROMPT, max_tokens=24, temperature=0.0, stop=[stop])
    text = out["choices"][0]["text"]
    assert out["choices"][0]["finish_reason"] == "stop"
    assert text == full[: full.index(stop)]
    assert "".join(model.generate(PROMPT, max_tokens=24, temperature=0.0, stop=stop, stream=True)) == text


def test_completion_dict_has_llama_cpp_python_shape(model):
    out = model(PROMPT, max_tokens=3, temperature=0.0)
    assert out["object"] == "text_completion"
    assert set(out["choices"][0]) == {"text", "index", "logprobs", "finish_reason"}
    u = out["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    assert u["prompt_tokens"] == len(model.tokenize(PROMPT))


def test_chat_uses_the_gguf_template(model):
    text = model.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert "<|im_start|>user\nHi<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    reply = model.chat([{"role": "user", "content": "What is 2+2?"}], max_tokens=16, temperature=0.0)
    assert isinstance(reply, str) and reply and "<|im_end|>" not in reply


def test_logits_are_stateless_and_own_their_memory(model):
    ids = model.tokenize(PROMPT)
    a = model.logits(ids)
    model.generate("Something else entirely", max_tokens=4, temperature=0.0)
    b = model.logits(ids)
    assert a.shape == (len(ids), model.n_vocab) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert a.flags.owndata or a.base is not None and not np.shares_memory(a, b)


def test_prefix_reuse_gives_the_same_logits_as_a_fresh_run(tmp_path):
    """Continuing from a cached prefix computes what a fresh run computes. On an f32 model:
    SmolLM2's Q4_1 path quantizes activations to 8 bits, and a different batch split changes
    float summation order enough to flip roundings (logits then move by a few percent)."""
    import helpers_models as H
    from prosparse_convert import convert

    _, d = H.make_llama_dir(tmp_path / "hf", hidden_act="silu", seed=3)
    path = convert(d, tmp_path / "m.gguf", outtype="f32", progress=False)
    ids = H.prompt_ids(20)
    with Model(path, n_ctx=64, n_batch=8) as m:
        fresh = m.logits(ids)[-1]
        m.logits(ids[:5])                      # the cache now holds a 5-token prefix
        reused = m._advance(list(ids))         # continues from it
    np.testing.assert_allclose(reused, fresh, rtol=0, atol=1e-5 * np.abs(fresh).max())


def test_two_threads_share_one_model_safely(model):
    results, errors = [], []

    def work():
        try:
            results.append(model.generate(PROMPT, max_tokens=6, temperature=0.0))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    ts = [threading.Thread(target=work) for _ in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors and len(results) == 3 and all(isinstance(r, str) and r for r in results)
    # and the model is intact afterwards
    assert model.generate(PROMPT, max_tokens=6, temperature=0.0) == model.generate(PROMPT, max_tokens=6, temperature=0.0)


def test_stats_report_speed_and_strategy(model):
    model.generate(PROMPT, max_tokens=4, temperature=0.0)
    s = model.stats
    assert s["decode_tokens_per_second"] > 0 and s["prompt_tokens_per_second"] > 0
    assert s["strategy"] == "dense"


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(min_p=2.0), "min_p"),
    (dict(repeat_penalty=0.0), "repeat_penalty"),
    (dict(seed=-3), "seed"),
    (dict(seed=2**70), r"seed must be None or an int in \[0, 2\*\*64\)"),
    (dict(top_k=2**40), r"top_k must be an int in \[0, 2147483647\]"),
    (dict(temperature=float("nan")), "temperature"),
])
def test_bad_sampling_parameters_raise(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        model.generate(PROMPT, **kwargs)
    with pytest.raises(ValueError, match=match):
        model.create_completion(PROMPT, **kwargs)
    with pytest.raises(ValueError, match=match):  # when called, not when the stream is first read
        model.generate(PROMPT, stream=True, **kwargs)


def test_generate_and_create_completion_take_the_same_sampling_options(model):
    opts = dict(max_tokens=8, temperature=0.7, top_k=20, top_p=0.9, min_p=0.1, repeat_penalty=1.1, seed=5,
                stop=["\n\n"])
    assert model.create_completion(PROMPT, **opts)["choices"][0]["text"] == model.generate(PROMPT, **opts)
    for call in (model.generate, model.create_completion):
        with pytest.raises(TypeError, match="temp"):
            call(PROMPT, temp=0.5)  # llama.cpp's flag name, not the option's


def test_tokenize_refuses_text_that_is_not_valid_unicode(model):
    with pytest.raises(ValueError, match=r"text is not valid Unicode: surrogates not allowed '\\ud800' at position 2"):
        model.tokenize("ab\ud800")
    with pytest.raises(ValueError, match="not valid Unicode"):
        model.generate("\udc80")


def test_empty_prompt_raises(model):
    with pytest.raises(ValueError, match="empty"):
        model.generate("")


def test_prompt_longer_than_context_raises(smollm2_path):
    with Model(smollm2_path, n_ctx=16) as m:
        with pytest.raises(ValueError, match="context"):
            m.generate("word " * 40)
        with pytest.raises(ValueError, match="context"):
            m.logits(list(range(17)))


def test_bad_token_ids_raise(model):
    with pytest.raises(ValueError, match="out of range"):
        model.logits([1, model.n_vocab])
    with pytest.raises(ValueError, match="out of range"):
        model.detokenize([-1])
    with pytest.raises(ValueError, match="empty"):
        model.logits([])


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_ctx=-1), "n_ctx"),
    (dict(n_threads=0), "n_threads"),
    (dict(sparsity="fast"), "sparsity"),
    (dict(n_batch=0), "n_batch"),
    (dict(n_ctx=10**12), r"n_ctx must be an int in \[0, 2147483647\]"),
    (dict(n_batch=2**40), "n_batch"),
    (dict(n_threads=4 * usable_cores() + 1), f"n_threads={4 * usable_cores() + 1} is more than 4x the"),
    (dict(layer_thresholds=[0.1] * 3), "layer_thresholds has 3 entries for 30 layers"),
    (dict(layer_thresholds="0.1"), "layer_thresholds must be a list"),
])
def test_bad_model_parameters_raise(smollm2_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        Model(smollm2_path, **kwargs)


def test_threads_beyond_the_cores_warn_and_still_generate(smollm2_path):
    n = usable_cores() + 1
    with pytest.warns(RuntimeWarning, match=f"n_threads={n} is more than the {usable_cores()} cores"):
        m = Model(smollm2_path, n_ctx=64, n_threads=n)
    with m:
        assert m.generate(PROMPT, max_tokens=4, temperature=0.0)


def test_the_constructor_documents_every_parameter():
    import inspect

    doc = Model.__doc__
    for name in list(inspect.signature(Model.__init__).parameters)[1:]:
        assert f"\n        {name}: " in doc, name


def test_missing_and_non_gguf_files_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Model(tmp_path / "nope.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + b"\0" * 64)
    with pytest.raises(ValueError, match="not a GGUF"):
        Model(bad)
    with pytest.raises(IsADirectoryError):
        Model(tmp_path)


def test_closed_model_raises(smollm2_path):
    m = Model(smollm2_path, n_ctx=64)
    m.close()
    with pytest.raises(RuntimeError, match="closed"):
        m.generate(PROMPT)


# --- text assembly, independent of any model ---------------------------------------------

def test_assembler_holds_back_split_utf8():
    a = TextAssembler([])
    euro = "€".encode()
    assert a.feed(euro[:1]) == "" and a.feed(euro[1:2]) == ""
    assert a.feed(euro[2:]) == "€"


def test_assembler_holds_back_possible_stop_prefix():
    a = TextAssembler(["STOP"])
    assert a.feed(b"abc ST") == "abc "
    assert a.feed(b"OX") == "STOX"
    assert a.feed(b" ST") == " "
    assert a.feed(b"OP tail") == "" and a.stopped


def test_the_runtime_imports_no_tool_package():
    """Layers point down: the converter, calibration, benchmarks and training import the runtime,
    never the reverse (DESIGN.md; a runtime install must not need the tools)."""
    import ast
    from pathlib import Path

    import prosparse_rt

    tools = {"prosparse_convert", "prosparse_bench", "prosparse_sparsify"}
    found = []
    for f in Path(prosparse_rt.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            found += [f"{f.name}: {n}" for n in names if n.split(".")[0] in tools]
    assert not found, found
