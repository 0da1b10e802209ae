"""OpenAI-shaped bodies (as llama-cpp-python returns them), shared by :class:`Model`'s
``create_completion`` / ``create_chat_completion`` and the server, so that both answer alike."""
from __future__ import annotations

import time
import uuid
from typing import Any, Dict, Optional, Tuple


def new_id(kind: str) -> Tuple[str, int]:
    """(id, created) for a new completion; ``kind`` is "cmpl" or "chatcmpl"."""
    return f"{kind}-{uuid.uuid4()}", int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> Dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(cid: str, created: int, model: str, text: str, finish: Optional[str],
               use: Optional[Dict[str, int]] = None) -> Dict[str, Any]:
    """A ``text_completion``, or one chunk of a streamed one (no usage)."""
    out: Dict[str, Any] = {"id": cid, "object": "text_completion", "created": created, "model": model,
                           "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}
    if use is not None:
        out["usage"] = use
    return out


def chat_completion(cid: str, created: int, model: str, text: str, finish: Optional[str],
                    use: Dict[str, int]) -> Dict[str, Any]:
    return {"id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish}],
            "usage": use}


def chat_chunk(cid: str, created: int, model: str, delta: Dict[str, str], finish: Optional[str]) -> Dict[str, Any]:
    """One ``chat.completion.chunk``: the first carries ``{"role": "assistant"}``, then
    ``{"content": piece}``, and the last an empty delta with the finish_reason."""
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


def usage_chunk(cid: str, created: int, model: str, obj: str, use: Dict[str, int]) -> Dict[str, Any]:
    """The extra last chunk that ``stream_options={"include_usage": true}`` asks for."""
    return {"id": cid, "object": obj, "created": created, "model": model, "choices": [], "usage": use}
