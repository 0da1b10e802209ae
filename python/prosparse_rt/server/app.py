"""The OpenAI-compatible HTTP API over an :class:`Engine`: a Starlette app, streamed through
server-sent events (sse-starlette), served by uvicorn (see ``cli``).

Every error is OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with 400 for a
bad request (malformed JSON, a wrong type, a value out of range, a prompt longer than the context,
a field we do not implement set to anything but its default), 401 for a wrong API key, 413 for an
oversized body, 404/405 for a wrong path or method, 503 when the queue is full, and 500 when a
request's own computation fails (non-finite logits), which fails that request only.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import math
import secrets
import time
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .. import _openai
from ..model import Model, SamplingParams, option_problem
from .engine import Engine, EngineClosed, Event, QueueFull
from .engine import Request as GenRequest

MAX_BODY_BYTES = 8 << 20  # a request body larger than this is answered 413

# Fields we do not implement, and the values that mean "not used" (absent and null are too).
UNSUPPORTED: Dict[str, Tuple[Any, ...]] = {
    "n": (1,), "best_of": (1,), "logprobs": (False,), "top_logprobs": (0,), "echo": (False,),
    "suffix": ("",), "logit_bias": ({},), "tools": ([],), "tool_choice": ("none", "auto"),
    "functions": ([],), "function_call": ("none", "auto"), "presence_penalty": (0,),
    "frequency_penalty": (0,), "response_format": ({"type": "text"},), "parallel_tool_calls": (True, False),
}


class ApiError(Exception):
    """An error answered as OpenAI's ``{"error": {...}}`` body with ``status``."""

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 type_: str = "invalid_request_error", code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code

    def body(self) -> Dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def _bad(message: str, param: Optional[str] = None) -> ApiError:
    return ApiError(400, message, param)


# ---------------------------------------------------------------------- request fields
def _is_default(value: Any, defaults: Tuple[Any, ...]) -> bool:
    if value is None:
        return True
    return any(value == d and isinstance(value, bool) == isinstance(d, bool) for d in defaults)


def _typed(body: Dict[str, Any], name: str, kind: str, default: Any = None) -> Any:
    """body[name] checked to be of ``kind`` (int, number, bool, str, object); absent or null: default."""
    v = body.get(name)
    if v is None:
        return default
    ok = {"int": isinstance(v, int) and not isinstance(v, bool),
          "number": isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
          "bool": isinstance(v, bool), "str": isinstance(v, str), "object": isinstance(v, dict)}[kind]
    if not ok:
        shown = json.dumps(v)
        raise _bad(f"'{name}' must be {'an' if kind[0] in 'io' else 'a'} {kind}, got "
                   f"{shown if len(shown) <= 40 else shown[:40] + '...'}", name)
    return v


def _sampling(body: Dict[str, Any]) -> SamplingParams:
    """llama-cpp-python's sampling fields and defaults (temperature 0.8, top_k 40, ...)."""
    defaults = SamplingParams()
    kw: Dict[str, Any] = {}
    for name in ("temperature", "top_p", "min_p", "repeat_penalty"):
        kw[name] = _typed(body, name, "number", getattr(defaults, name))
    for name in ("top_k", "seed"):
        kw[name] = _typed(body, name, "int", getattr(defaults, name))
    for name, value in kw.items():
        problem = option_problem(name, value)
        if problem:
            raise _bad(f"'{name}' {problem}", name)
    stop = body.get("stop")
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        kw["stop"] = stop
    elif stop is None or isinstance(stop, str):
        kw["stop"] = stop
    else:
        raise _bad("'stop' must be a string, a list of strings or null", "stop")
    return SamplingParams(**kw)


def _max_tokens(body: Dict[str, Any], default: Optional[int], name: str = "max_tokens") -> Optional[int]:
    v = _typed(body, name, "int", default)
    if v is not None and v < 1:
        raise _bad(f"'{name}' must be >= 1, got {v}", name)
    return v


def _check_unsupported(body: Dict[str, Any]) -> None:
    for name, defaults in UNSUPPORTED.items():
        if name in body and not _is_default(body[name], defaults):
            raise _bad(f"'{name}' is not supported by this server (only {defaults[0]!r} or null)", name)


def _include_usage(body: Dict[str, Any]) -> bool:
    opts = _typed(body, "stream_options", "object", {})
    usage = opts.get("include_usage", False)
    if not isinstance(usage, bool):
        raise _bad("'stream_options.include_usage' must be a bool", "stream_options")
    return usage


def _completion_prompt(body: Dict[str, Any]) -> Union[str, List[int]]:
    """A string or a list of token ids; a list holding one of those (OpenAI's batch form) too."""
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]
    if isinstance(p, str):
        if not p:
            raise _bad("'prompt' is empty", "prompt")
        return p
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        return p
    if isinstance(p, list) and len(p) > 1 and all(isinstance(x, (str, list)) for x in p):
        raise _bad("'prompt' holds several prompts: this server takes one per request", "prompt")
    raise _bad("'prompt' must be a non-empty string or a non-empty list of token ids", "prompt")


def _messages(body: Dict[str, Any]) -> List[Dict[str, str]]:
    """The chat messages with their content as plain text (text parts joined)."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("'messages' must be a non-empty list of {'role', 'content'} objects", "messages")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _bad(f"'{where}' must be an object with a string 'role'", where)
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise _bad(f"'{where}.content' may hold only text parts ({{'type': 'text', 'text': ...}})",
                               f"{where}.content")
                parts.append(part["text"])
            content = "".join(parts)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise _bad(f"'{where}.content' must be a string, a list of text parts or null", f"{where}.content")
        out.append({"role": m["role"], "content": content})
    return out


# ---------------------------------------------------------------------- the app
class Server:
    """The routes over ``engine``; ``name`` is the model id the API reports."""

    def __init__(self, engine: Engine, name: str, api_key: Optional[str] = None,
                 max_body_bytes: int = MAX_BODY_BYTES):
        self.engine, self.model, self.name = engine, engine.model, name
        self.api_key, self.max_body_bytes = api_key, max_body_bytes
        self.created = int(time.time())

    def app(self) -> Starlette:
        routes = [
            Route("/health", self.health, methods=["GET"]),
            Route("/v1/models", self._api(self.models), methods=["GET"]),
            Route("/v1/completions", self._api(self.completions), methods=["POST"]),
            Route("/v1/chat/completions", self._api(self.chat_completions), methods=["POST"]),
            Route("/stats", self._api(self.stats), methods=["GET"]),
        ]
        handlers = {HTTPException: _http_error, Exception: _internal_error}
        return Starlette(routes=routes, exception_handlers=handlers, lifespan=self._lifespan)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette):
        yield
        await run_in_threadpool(self.engine.close)

    def _api(self, handler: Callable) -> Callable:
        """Checks the API key, then answers ApiError as OpenAI's error body."""
        async def endpoint(request: Request) -> Response:
            try:
                self._authorize(request)
                return await handler(request)
            except ApiError as e:
                return e.response()
        return endpoint

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "invalid API key: send 'Authorization: Bearer KEY' with the server's --api-key",
                           type_="authentication_error", code="invalid_api_key")

    async def _json(self, request: Request) -> Dict[str, Any]:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            raise ApiError(413, f"the request body is {length} bytes, more than the {self.max_body_bytes} this "
                                "server takes", code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise ApiError(413, f"the request body is more than the {self.max_body_bytes} bytes this server "
                                    "takes", code="request_too_large")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as e:
            raise _bad(f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise _bad("the request body must be a JSON object")
        return body

    # ------------------------------------------------------------------ endpoints
    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", **self.engine.status()})

    async def stats(self, request: Request) -> Response:
        return JSONResponse(await run_in_threadpool(self.engine.stats))

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": self.name, "object": "model", "created": self.created, "owned_by": "prosparse-rt"}]})

    async def completions(self, request: Request) -> Response:
        body = await self._json(request)
        prompt = _completion_prompt(body)
        gen = self._common(body, default_max_tokens=16)
        ids = await self._prompt_ids(prompt)
        cid, created = _openai.new_id("cmpl")

        def chunk(ev: Event) -> Dict[str, Any]:
            return _openai.completion(cid, created, self.name, ev.text, ev.finish)

        def final(text: str, ev: Event) -> Dict[str, Any]:
            return _openai.completion(cid, created, self.name, text, ev.finish, _usage(ev))

        return await self._respond(request, ids, gen, chunk, final, None, "text_completion", cid, created)

    async def chat_completions(self, request: Request) -> Response:
        body = await self._json(request)
        messages = _messages(body)
        name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        gen = self._common(body, default_max_tokens=None, max_tokens_name=name)
        try:
            ids = await run_in_threadpool(self.model._chat_prompt, messages)
        except ValueError as e:
            raise _bad(str(e), "messages") from None
        ids = self._fits(ids, "messages")
        cid, created = _openai.new_id("chatcmpl")

        def chunk(ev: Event) -> Dict[str, Any]:
            delta = {"content": ev.text} if ev.text else {}
            return _openai.chat_chunk(cid, created, self.name, delta, None)

        def final(text: str, ev: Event) -> Dict[str, Any]:
            return _openai.chat_completion(cid, created, self.name, text, ev.finish, _usage(ev))

        first = _openai.chat_chunk(cid, created, self.name, {"role": "assistant"}, None)
        return await self._respond(request, ids, gen, chunk, final, first, "chat.completion.chunk", cid, created)

    # ------------------------------------------------------------------ shared steps
    def _common(self, body: Dict[str, Any], default_max_tokens: Optional[int],
                max_tokens_name: str = "max_tokens") -> Dict[str, Any]:
        _typed(body, "model", "str")
        _typed(body, "user", "str")
        _check_unsupported(body)
        return {"params": _sampling(body), "max_tokens": _max_tokens(body, default_max_tokens, max_tokens_name),
                "stream": _typed(body, "stream", "bool", False), "include_usage": _include_usage(body),
                "ignore_eos": _typed(body, "ignore_eos", "bool", False)}

    async def _prompt_ids(self, prompt: Union[str, List[int]]) -> List[int]:
        try:
            if isinstance(prompt, str):
                ids = await run_in_threadpool(self.model.tokenize, prompt, None, True)
            else:
                ids = self.model._check_ids(prompt)
        except (TypeError, ValueError) as e:
            raise _bad(f"'prompt': {e}", "prompt") from None
        return self._fits(ids, "prompt")

    def _fits(self, ids: List[int], param: str) -> List[int]:
        n_ctx = self.engine.n_ctx
        if not ids:
            raise _bad(f"'{param}' gives no tokens", param)
        if len(ids) >= n_ctx:
            raise ApiError(400, f"'{param}' is {len(ids)} tokens, which does not fit the context of {n_ctx} per "
                                "slot (-c) with room for one generated token", param, code="context_length_exceeded")
        return ids

    def _submit(self, ids: List[int], gen: Dict[str, Any]) -> Tuple[GenRequest, "asyncio.Queue[Event]"]:
        loop = asyncio.get_running_loop()
        queue: "asyncio.Queue[Event]" = asyncio.Queue()

        def on_event(ev: Event) -> None:  # on the engine's thread
            try:
                loop.call_soon_threadsafe(queue.put_nowait, ev)
            except RuntimeError:  # the event loop has closed: nobody is listening
                pass

        req = GenRequest(ids, gen["params"], gen["max_tokens"], on_event, ignore_eos=gen["ignore_eos"])
        try:
            self.engine.submit(req)
        except QueueFull as e:
            raise ApiError(503, f"the server is busy: {e}", type_="server_error", code="queue_full") from None
        except EngineClosed as e:
            raise ApiError(503, str(e), type_="server_error", code="shutting_down") from None
        return req, queue

    async def _respond(self, request: Request, ids: List[int], gen: Dict[str, Any], chunk: Callable,
                       final: Callable, first: Optional[Dict[str, Any]], obj: str, cid: str, created: int) -> Response:
        req, queue = self._submit(ids, gen)
        if gen["stream"]:
            return EventSourceResponse(self._stream(req, queue, chunk, first, gen["include_usage"], obj, cid, created),
                                       ping=15)
        return await self._collect(request, req, queue, final)

    async def _collect(self, request: Request, req: GenRequest, queue: "asyncio.Queue[Event]",
                       final: Callable) -> Response:
        """The whole answer; a client that goes away first cancels the request."""
        async def text() -> Tuple[str, Event]:
            pieces = []
            while True:
                ev = await queue.get()
                pieces.append(ev.text)
                if ev.last:
                    return "".join(pieces), ev

        done = asyncio.ensure_future(text())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not done.done():
                done.cancel()
                self.engine.cancel(req)
        if not done.done() or done.cancelled():  # the client left: nobody reads this
            return Response(status_code=499)
        out, ev = done.result()
        if ev.error is not None:
            return _failed(ev.error).response()
        return JSONResponse(final(out, ev))

    async def _stream(self, req: GenRequest, queue: "asyncio.Queue[Event]", chunk: Callable,
                      first: Optional[Dict[str, Any]], include_usage: bool, obj: str, cid: str, created: int):
        """Server-sent events: the chunks, then ``data: [DONE]``. A client that goes away cancels
        this generator (sse-starlette watches for the disconnect), which cancels the request."""
        finished = False
        try:
            if first is not None:
                yield {"data": json.dumps(first)}
            while True:
                ev = await queue.get()
                if ev.error is not None:
                    finished = True
                    yield {"data": json.dumps(_failed(ev.error).body())}
                    break
                if ev.text:
                    yield {"data": json.dumps(chunk(Event(text=ev.text)))}
                if ev.finish is not None:
                    finished = True
                    last = chunk(Event(finish=ev.finish))
                    last["choices"][0]["finish_reason"] = ev.finish
                    yield {"data": json.dumps(last)}
                    if include_usage:
                        yield {"data": json.dumps(_openai.usage_chunk(cid, created, self.name, obj, _usage(ev)))}
                    break
            yield {"data": "[DONE]"}
        finally:
            if not finished:
                self.engine.cancel(req)


def _usage(ev: Event) -> Dict[str, Any]:
    """OpenAI's usage, with the prompt tokens served from the slot's cache as its cached_tokens."""
    return {**_openai.usage(ev.prompt_tokens, ev.completion_tokens),
            "prompt_tokens_details": {"cached_tokens": ev.cached_tokens}}


def _failed(message: str) -> ApiError:
    return ApiError(500, f"generation failed: {message}", type_="server_error", code="generation_failed")


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone away (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _http_error(request: Request, exc: HTTPException) -> Response:
    """Starlette's own errors (no such path, wrong method) in OpenAI's shape."""
    return ApiError(exc.status_code, str(exc.detail)).response()


async def _internal_error(request: Request, exc: Exception) -> Response:
    return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type_="server_error").response()


def create_app(model: Model, name: Optional[str] = None, api_key: Optional[str] = None, queue_size: int = 64,
               max_body_bytes: int = MAX_BODY_BYTES) -> Starlette:
    """The ASGI app serving ``model`` (made with ``n_seq`` = the parallel slots); its engine thread
    starts now and stops at the app's shutdown."""
    from pathlib import Path

    engine = Engine(model, queue_size=queue_size)
    return Server(engine, name or Path(model.model_path).name, api_key, max_body_bytes).app()
