"""An OpenAI-compatible HTTP server with continuous batching (``prosparse-server``).

``engine`` (the scheduler over the KV cache's sequences) needs only the runtime; ``app`` and ``cli``
need the ``server`` extra (Starlette, uvicorn, sse-starlette)."""
from .engine import Engine, Event, QueueFull, Request

__all__ = ["Engine", "Event", "QueueFull", "Request"]
