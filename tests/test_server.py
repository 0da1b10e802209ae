"""prosparse-server as a real process on a free port, driven by the official `openai` client (and
httpx where the client hides the wire). The reference for every text is Model.generate / Model.chat
on the same file, one request at a time (docs/design.md "Determinism")."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import helpers_models as H
from prosparse_convert import convert
from prosparse_rt import Model

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")
pytest.importorskip("sse_starlette")

N_CTX = 384
KEY = "sk-test-key"
LONG = 4000  # max_tokens of a request that runs for seconds (greedy never ends it early, see model_path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, path, *args, key=None):
        self.auth = {"Authorization": f"Bearer {key}"} if key else {}
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "prosparse_rt.server", "-m", str(path), "--port", str(self.port), "-t", "2",
             *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited {self.proc.returncode}: {self.proc.stdout.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("the server did not start within 60 s")

    def client(self, key="none", **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, **kw)

    def get(self, path, **kw):
        return httpx.get(self.url + path, headers=self.auth, **kw)

    def post(self, path, **kw):
        return httpx.post(self.url + path, **kw)

    def wait_idle(self, timeout=20):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            h = self.get("/health").json()
            if h["slots_processing"] == 0 and h["queued"] == 0:
                return h
            time.sleep(0.05)
        raise AssertionError(f"the server is still busy after {timeout} s: {h}")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    """A small FATReLU model whose end-of-text logit is always 0, so that greedy decoding never ends
    early (random logits have a positive maximum) and a long request runs for seconds."""
    from safetensors.numpy import load_file, save_file

    root = tmp_path_factory.mktemp("server")
    _, d = H.make_fatrelu_dir(root / "hf", 0.1, seed=93, n_embd=128, n_ff=512)
    weights = load_file(str(d / "model.safetensors"))
    head = weights["lm_head.weight"].copy()
    head[2] = 0.0  # </s>
    weights["lm_head.weight"] = head
    save_file(weights, str(d / "model.safetensors"), metadata={"format": "pt"})
    return convert(d, root / "tiny.gguf", outtype="q8_0", progress=False)


@pytest.fixture(scope="module")
def server(model_path):
    s = ServerProcess(model_path, "-np", "4", "-c", str(N_CTX))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def guarded(model_path):
    """One slot, a queue of one, an API key."""
    s = ServerProcess(model_path, "-np", "1", "--queue", "1", "-c", str(LONG + 64), "--api-key", KEY, key=KEY)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def ref(model_path):
    with Model(str(model_path), n_ctx=N_CTX, n_threads=2) as m:
        yield m


PROMPTS = ["The quick brown fox", "Hello world, this is", "def f(x):", "Numbers: 1 2 3 4"]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


def test_models_lists_the_file(server, model_path):
    (m,) = server.client().models.list().data
    assert m.id == Path(model_path).name and m.object == "model"


def test_health(server):
    h = server.get("/health").json()
    assert h["status"] == "ok" and h["slots_idle"] + h["slots_processing"] == 4


def test_completion_equals_generate(server, ref, model_path):
    r = server.client().completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=20, temperature=0)
    assert r.object == "text_completion" and r.model == Path(model_path).name and r.id.startswith("cmpl-")
    assert r.choices[0].text == ref.generate(PROMPTS[0], max_tokens=20, temperature=0.0)
    assert r.choices[0].finish_reason == "length"
    n_prompt = len(ref.tokenize(PROMPTS[0]))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (n_prompt, 20, n_prompt + 20)


def test_completion_default_max_tokens_is_openais_16(server):
    r = server.client().completions.create(model="tiny", prompt=PROMPTS[1], temperature=0)
    assert r.usage.completion_tokens == 16 and r.choices[0].finish_reason == "length"


def test_completion_takes_token_ids_and_llama_cpp_sampling_fields(server, ref):
    ids = ref.tokenize(PROMPTS[2])
    r = server.client().completions.create(
        model="tiny", prompt=ids, max_tokens=12, temperature=0.7, seed=5,
        extra_body={"top_k": 20, "min_p": 0.1, "repeat_penalty": 1.1})
    want = ref.generate(ids, max_tokens=12, temperature=0.7, seed=5, top_k=20, min_p=0.1, repeat_penalty=1.1)
    assert r.choices[0].text == want


def test_completion_streamed_equals_whole(server, ref):
    chunks = list(server.client().completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=20,
                                                      temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == ref.generate(PROMPTS[3], max_tokens=20, temperature=0.0)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_equals_model_chat(server, ref):
    r = server.client().chat.completions.create(model="tiny", messages=CHAT, max_tokens=24, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.chat(CHAT, max_tokens=24, temperature=0.0)
    assert r.usage.prompt_tokens == len(ref._chat_prompt(CHAT))


def test_chat_streamed_equals_whole_and_ends_with_done(server, ref):
    stream = server.client().chat.completions.create(model="tiny", messages=CHAT, max_tokens=24, temperature=0,
                                                     stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref.chat(CHAT, max_tokens=24, temperature=0.0)
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24
    # on the wire: server-sent events, the last one data: [DONE]
    raw = server.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 3, "stream": True})
    assert raw.headers["content-type"].startswith("text/event-stream")
    data = [line[len("data: "):] for line in raw.text.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]" and all(json.loads(d)["object"] == "chat.completion.chunk" for d in data[:-1])


def test_chat_default_runs_to_the_end_of_the_context(server, ref):
    r = server.client().chat.completions.create(model="tiny", messages=CHAT, temperature=0)
    u = r.usage
    assert r.choices[0].finish_reason == "length" and u.prompt_tokens + u.completion_tokens == N_CTX
    assert r.choices[0].message.content == ref.chat(CHAT, max_tokens=N_CTX, temperature=0.0)


def test_four_concurrent_requests_equal_one_at_a_time(server, ref):
    client = server.client()
    max_tokens = [60, 120, 180, 240]  # long enough to overlap however fast the host
    sequential = [client.completions.create(model="tiny", prompt=p, max_tokens=n, temperature=0).choices[0].text
                  for p, n in zip(PROMPTS, max_tokens)]
    before = server.get("/stats").json()["decode_batch_sizes"]
    out = [None] * 4
    go = threading.Barrier(4)

    def one(i):
        go.wait()
        out[i] = client.completions.create(model="tiny", prompt=PROMPTS[i], max_tokens=max_tokens[i],
                                           temperature=0).choices[0].text

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out == sequential
    assert out == [ref.generate(p, max_tokens=n, temperature=0.0) for p, n in zip(PROMPTS, max_tokens)]
    after = server.get("/stats").json()["decode_batch_sizes"]
    batched = {int(k): v - before.get(k, 0) for k, v in after.items() if int(k) > 1}
    assert sum(batched.values()) > 0, "the four requests never decoded in one step"


def test_a_resent_chat_history_pays_only_for_the_new_turn(server, ref):
    client = server.client()
    first = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=12, temperature=0)
    history = CHAT + [{"role": "assistant", "content": first.choices[0].message.content},
                      {"role": "user", "content": "And another?"}]
    before = server.get("/stats").json()
    second = client.chat.completions.create(model="tiny", messages=history, max_tokens=12, temperature=0)
    after = server.get("/stats").json()
    assert second.choices[0].message.content == ref.chat(history, max_tokens=12, temperature=0.0)
    reused = after["cached_prompt_tokens"] - before["cached_prompt_tokens"]
    assert reused >= first.usage.prompt_tokens
    assert second.usage.prompt_tokens_details.cached_tokens == reused
    assert after["prompt_tokens"] - before["prompt_tokens"] == second.usage.prompt_tokens - reused


def _long(stream: bool):
    return {"prompt": "Once", "max_tokens": LONG, "temperature": 0, "stream": stream}


AUTH = {"Authorization": f"Bearer {KEY}"}


def test_a_dropped_stream_cancels_its_request(guarded):
    cancelled = guarded.get("/stats").json()["cancelled"]
    with httpx.stream("POST", guarded.url + "/v1/completions", json=_long(True), headers=AUTH) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")  # the first piece: it is decoding
        assert guarded.get("/health").json()["slots_processing"] == 1
    guarded.wait_idle()
    stats = guarded.get("/stats").json()
    assert stats["cancelled"] == cancelled + 1
    time.sleep(0.2)
    assert guarded.get("/stats").json()["decode_tokens"] == stats["decode_tokens"]  # nothing runs for nobody


def test_a_dropped_request_cancels_it(guarded):
    cancelled = guarded.get("/stats").json()["cancelled"]
    with pytest.raises(httpx.ReadTimeout):
        guarded.post("/v1/completions", json=_long(False), headers=AUTH, timeout=0.5)
    guarded.wait_idle()
    assert guarded.get("/stats").json()["cancelled"] == cancelled + 1


def test_a_full_queue_is_answered_503(guarded):
    with httpx.stream("POST", guarded.url + "/v1/completions", json=_long(True), headers=AUTH) as running:
        lines = running.iter_lines()  # kept: a closed iterator closes the connection
        next(lines)  # in the one slot
        with httpx.stream("POST", guarded.url + "/v1/completions", json=_long(True), headers=AUTH) as waiting:
            deadline = time.monotonic() + 10
            while guarded.get("/health").json()["queued"] < 1:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            with pytest.raises(openai.APIStatusError) as e:
                guarded.client(KEY).chat.completions.create(model="tiny", messages=CHAT, max_tokens=2)
            assert e.value.status_code == 503
            assert e.value.body["code"] == "queue_full"
            assert waiting.status_code == 200
    guarded.wait_idle()
    assert guarded.client(KEY).completions.create(model="tiny", prompt="x", max_tokens=2).usage.completion_tokens == 2


def test_a_wrong_api_key_is_401(guarded):
    with pytest.raises(openai.AuthenticationError) as e:
        guarded.client("wrong").models.list()
    assert e.value.status_code == 401 and "API key" in e.value.body["message"]
    assert guarded.post("/v1/completions", json={"prompt": "x"}).status_code == 401  # no key at all
    assert httpx.get(guarded.url + "/health").status_code == 200  # health needs no key
    assert httpx.get(guarded.url + "/stats").status_code == 401
    assert guarded.client(KEY).models.list().data


def _error(r, status):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "max_tokens": "10"}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": "x", "stop": 5}, "stop"),
    ({"prompt": "x", "seed": 1.5}, "seed"),
    ({"prompt": "x", "ignore_eos": 1}, "ignore_eos"),
    ({"prompt": 7}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": [1, 2, 10**6]}, "prompt"),
    ({}, "prompt"),
    ({"prompt": "x", "n": 2}, "n"),
    ({"prompt": "x", "logprobs": 2}, "logprobs"),
    ({"prompt": "x", "logit_bias": {"5": 10}}, "logit_bias"),
    ({"prompt": "x", "echo": True}, "echo"),
])
def test_bad_completion_fields_are_400_naming_the_field(server, body, param):
    err = _error(server.post("/v1/completions", json=body), 400)
    assert err["param"] == param and err["type"] == "invalid_request_error"


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"content": "x"}]}, "messages[0]"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"messages": CHAT, "logprobs": True}, "logprobs"),
    ({"messages": CHAT, "n": 3}, "n"),
    ({"messages": CHAT, "max_completion_tokens": -2}, "max_completion_tokens"),
])
def test_bad_chat_fields_are_400_naming_the_field(server, body, param):
    assert _error(server.post("/v1/chat/completions", json=body), 400)["param"] == param


def test_unimplemented_fields_at_their_defaults_are_accepted(server):
    r = server.client().chat.completions.create(
        model="tiny", messages=CHAT, max_tokens=2, n=1, logprobs=False, tools=None, logit_bias={},
        presence_penalty=0, frequency_penalty=0.0, user="me")
    assert r.choices[0].message.content is not None
    r = server.client().completions.create(model="tiny", prompt="x", max_tokens=2, n=1, logprobs=None, echo=False,
                                           best_of=1)
    assert r.usage.completion_tokens >= 1


def test_the_openai_client_raises_bad_request(server):
    with pytest.raises(openai.BadRequestError) as e:
        server.client().chat.completions.create(model="tiny", messages=CHAT, n=2)
    assert "'n'" in e.value.body["message"]


def test_malformed_json_and_non_objects_are_400(server):
    err = _error(server.post("/v1/completions", content=b"{\"prompt\": ", headers={"content-type": "application/json"}),
                 400)
    assert "not valid JSON" in err["message"]
    assert "JSON object" in _error(server.post("/v1/completions", json=[1, 2]), 400)["message"]
    assert _error(server.post("/v1/completions", content=b"\xff\xfe"), 400)


def test_a_prompt_longer_than_the_context_is_400(server):
    err = _error(server.post("/v1/completions", json={"prompt": "word " * (2 * N_CTX)}), 400)
    assert err["code"] == "context_length_exceeded" and "context of 384" in err["message"]
    long_chat = [{"role": "user", "content": "word " * (2 * N_CTX)}]
    assert _error(server.post("/v1/chat/completions", json={"messages": long_chat}), 400)["param"] == "messages"


def test_an_oversized_body_is_413(server):
    err = _error(server.post("/v1/completions", content=b"x" * (9 << 20)), 413)
    assert err["code"] == "request_too_large"


def test_unknown_paths_and_methods_get_openai_errors(server):
    _error(server.get("/v1/nothing"), 404)
    _error(server.get("/v1/completions"), 405)


def test_the_server_survives_everything_above(server, ref):
    assert server.proc.poll() is None
    r = server.client().completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=5, temperature=0)
    assert r.choices[0].text == ref.generate(PROMPTS[0], max_tokens=5, temperature=0.0)


def test_the_command_line_refuses_bad_options(model_path):
    for args, msg in ((["--parallel", "0"], "--parallel"), (["--queue", "-1"], "--queue"),
                      (["--port", "70000"], "--port")):
        r = subprocess.run([sys.executable, "-m", "prosparse_rt.server", "-m", str(model_path), *args],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and msg in r.stderr


def test_nan_in_one_request_fails_it_alone_over_http(tmp_path):
    """In-process (Starlette's TestClient): a request whose token has a NaN embedding gets a 500
    with an OpenAI error body, or an error event in its stream; the others are answered."""
    from starlette.testclient import TestClient

    from prosparse_rt.server.app import create_app
    from test_server_engine import _nan_row_file

    _, d = H.make_llama_dir(tmp_path / "hf", hidden_act="relu", seed=23)
    good = str(convert(d, tmp_path / "m.gguf", outtype="f32", progress=False))
    path = _nan_row_file(good, tmp_path / "nan.gguf", 77)
    with Model(good, n_ctx=64, n_threads=2) as m:
        want = m.generate([1, 5, 9], max_tokens=8, temperature=0.0)
    model = Model(path, n_ctx=64, n_threads=2, n_seq=2)
    with TestClient(create_app(model)) as client:
        r = client.post("/v1/completions", json={"prompt": [1, 40, 77], "max_tokens": 8})
        err = _error(r, 500)
        assert err["code"] == "generation_failed" and "non-finite" in err["message"]
        r = client.post("/v1/completions", json={"prompt": [1, 40, 77], "max_tokens": 8, "stream": True})
        data = [line[len("data: "):] for line in r.text.splitlines() if line.startswith("data: ")]
        assert "non-finite" in json.loads(data[-2])["error"]["message"] and data[-1] == "[DONE]"
        r = client.post("/v1/completions", json={"prompt": [1, 5, 9], "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == want
