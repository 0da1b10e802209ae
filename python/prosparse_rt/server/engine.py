"""Continuous batching: up to ``n_seq`` requests decode together, one forward pass per step.

Each slot is a sequence of the native KV cache. A step runs, for every active slot, its next prompt
tokens (a prefilling slot) or its one new token (a decoding slot) in a single ``eval_batch``; a new
request takes a free slot at the next step and a finished one leaves it. A slot keeps the tokens
its cache holds after its request has ended, and a new request goes to the free slot sharing the
longest prefix with it, so a chat client that resends the whole history pays only for the new turn.
A token's logits are the same bits batched or alone (docs/design.md "Determinism"), and each request
samples through its own :class:`SequenceDecoder`, so a request's text does not depend on the others.

The engine runs on one thread of its own; requests come from any thread and hear back through the
callback they carry (the HTTP server passes one that hops onto its event loop).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, List, Optional

from .._generation import SequenceDecoder, common_prefix_len
from ..model import Model, SamplingParams

logger = logging.getLogger("prosparse_rt.server")


def _never(_token: int) -> bool:
    return False


class QueueFull(Exception):
    """Every slot is busy and the queue of waiting requests is full."""


class EngineClosed(Exception):
    """The engine has stopped and takes no more requests."""


@dataclass
class Event:
    """What a request hears: a text piece, then one last event with ``finish`` ("stop", "length")
    or ``error`` (the request failed; the others go on)."""

    text: str = ""
    finish: Optional[str] = None
    error: Optional[str] = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens the slot's cache already held (not run again)

    @property
    def last(self) -> bool:
        return self.finish is not None or self.error is not None


@dataclass(eq=False)
class Request:
    """One generation: the prompt's token ids (checked to fit the context), how to sample, and at
    most ``max_tokens`` new tokens (None: until the end of the context). ``on_event`` is called on the
    engine's thread and must not block. ``ignore_eos`` (llama-server's field): an end-of-generation
    token does not end it; it is generated as any other token."""

    ids: List[int]
    params: SamplingParams
    max_tokens: Optional[int]
    on_event: Callable[[Event], None]
    ignore_eos: bool = False
    cancelled: bool = False
    cached_tokens: int = 0  # set when it gets a slot


@dataclass(eq=False)
class _Slot:
    seq: int
    cached: List[int] = field(default_factory=list)  # the tokens the sequence's KV cache holds
    request: Optional[Request] = None
    decoder: Optional[SequenceDecoder] = None
    pending: List[int] = field(default_factory=list)  # prompt tokens still to run
    last_used: float = 0.0

    def next_tokens(self, budget: int) -> List[int]:
        """The tokens to run this step: a chunk of the prompt, or the last sampled token."""
        if self.pending:
            return self.pending[:budget]
        return [self.decoder.ids[-1]]

    def free(self) -> None:
        self.request, self.decoder, self.pending = None, None, []
        self.last_used = time.monotonic()


class Engine:
    """Schedules requests onto ``model``'s ``n_seq`` sequences and steps them together.

    Args:
        model: a :class:`Model` made with ``n_seq`` = the number of parallel slots; the engine
            drives its KV cache sequences and nothing else may use the model meanwhile.
        queue_size: requests that may wait for a slot; one more raises :class:`QueueFull`.
        step_tokens: the most tokens one step runs (prompt chunks fill what the decoding slots
            leave); None: the model's ``n_batch``.
    """

    def __init__(self, model: Model, queue_size: int = 64, step_tokens: Optional[int] = None):
        self.model = model
        self._core = model._native()
        self.n_ctx = model.n_ctx
        self.queue_size = queue_size
        self.step_tokens = max(step_tokens or model.n_batch, 1)
        self._slots = [_Slot(i) for i in range(model.n_seq)]
        self._waiting: Deque[Request] = deque()
        self._cond = threading.Condition()
        self._eval_lock = threading.Lock()  # held around each forward; stats() reads under it
        self._stopping = False
        self.counters: Dict[str, float] = {"steps": 0, "step_seconds": 0.0, "prompt_tokens": 0,
                                           "decode_tokens": 0, "cached_prompt_tokens": 0, "requests": 0,
                                           "cancelled": 0}
        self.decode_batch_sizes: Dict[int, int] = {}  # decoding sequences per step -> steps
        self._thread = threading.Thread(target=self._run, name="prosparse-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the caller's side
    def submit(self, request: Request) -> None:
        """Queues ``request``; raises :class:`QueueFull` or :class:`EngineClosed`."""
        if not request.ids or len(request.ids) >= self.n_ctx:
            raise ValueError(f"prompt of {len(request.ids)} tokens does not fit the context of {self.n_ctx}")
        with self._cond:
            if self._stopping:
                raise EngineClosed("the server is shutting down")
            n_free = sum(s.request is None for s in self._slots)
            if len(self._waiting) >= self.queue_size + n_free:
                raise QueueFull(f"all {len(self._slots)} slots are busy and {len(self._waiting)} requests wait "
                                f"(--queue {self.queue_size})")
            self._waiting.append(request)
            self._cond.notify()

    def cancel(self, request: Request) -> None:
        """Ends ``request`` at the next step and frees its slot (a client went away)."""
        with self._cond:
            request.cancelled = True
            self._cond.notify()

    def close(self) -> None:
        """Stops the engine thread; waiting and running requests end with an error event."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()
        with self.model._lock:  # sequence 0 no longer holds what the Model's own calls cached there
            self.model._cache = []

    def status(self) -> Dict[str, int]:
        with self._cond:
            busy = sum(s.request is not None for s in self._slots)
            return {"slots_idle": len(self._slots) - busy, "slots_processing": busy, "queued": len(self._waiting)}

    def stats(self) -> Dict[str, object]:
        """The engine's counters and the model's FFN statistics, read between steps."""
        with self._eval_lock:
            s = self.model.stats
        with self._cond:
            c = dict(self.counters)
            sizes = dict(sorted(self.decode_batch_sizes.items()))
        known = [x for x in s["active_fraction"] if x == x]  # NaN: not known for this strategy
        return {**c, "decode_batch_sizes": sizes, "strategy": s["strategy"],
                "active_fraction": sum(known) / len(known) if known else None,
                "union_fraction_by_batch": s["union_fraction_by_batch"],
                "weight_bytes_per_step_by_batch": s["weight_bytes_per_step_by_batch"]}

    # ------------------------------------------------------------------ the engine thread
    def _free_slot_exists(self) -> bool:
        return any(s.request is None for s in self._slots)

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    self._drop_cancelled()
                    self._admit()
                    active = [s for s in self._slots if s.request is not None]
                    if self._stopping:
                        break
                    if not active:
                        self._cond.wait()
                        continue
                self._step(active)
        except BaseException as e:  # never leave a client waiting forever
            logger.exception("the engine stopped")
            self._fail_all(f"the engine stopped: {e}")
            raise
        self._fail_all("the server is shutting down")

    def _fail_all(self, message: str) -> None:
        with self._cond:
            self._stopping = True
            for s in self._slots:
                if s.request is not None:
                    self._finish(s, Event(error=message))
            while self._waiting:
                self._waiting.popleft().on_event(Event(error=message))

    def _drop_cancelled(self) -> None:
        n = len(self._waiting)
        self._waiting = deque(r for r in self._waiting if not r.cancelled)
        self.counters["cancelled"] += n - len(self._waiting)
        for s in self._slots:
            if s.request is not None and s.request.cancelled:
                self.counters["cancelled"] += 1
                s.free()

    def _admit(self) -> None:
        """Gives waiting requests, in order, the free slot whose cache shares most with their prompt
        (the least recently used among equals) and rewinds it to that prefix."""
        while self._waiting and self._free_slot_exists():
            req = self._waiting.popleft()
            free = [s for s in self._slots if s.request is None]
            slot = max(free, key=lambda s: (common_prefix_len(s.cached, req.ids), -s.last_used))
            # keep at least the prompt's last token to run: its logits give the first new token
            keep = min(common_prefix_len(slot.cached, req.ids), len(req.ids) - 1)
            self._core.rewind(keep, slot.seq)
            slot.cached = slot.cached[:keep]
            slot.request, slot.pending = req, list(req.ids[keep:])
            req.cached_tokens = keep
            is_eog = _never if req.ignore_eos else self._core.is_eog
            slot.decoder = SequenceDecoder(req.ids, Model.sampler(req.params), req.max_tokens, req.params.stop,
                                           self.n_ctx, is_eog, self._core.token_to_piece)
            self.counters["requests"] += 1
            self.counters["cached_prompt_tokens"] += keep

    def _plan(self, active: List[_Slot]) -> Dict[_Slot, List[int]]:
        """Each slot's tokens for this step: decoding slots one each, prefilling ones share the rest
        of the step's budget in slot order (at least one token, so that a prompt never starves)."""
        budget = max(self.step_tokens - sum(not s.pending for s in active), 1)
        plan: Dict[_Slot, List[int]] = {}
        for s in active:
            if not s.pending:
                plan[s] = s.next_tokens(1)
            elif budget > 0:
                plan[s] = s.next_tokens(budget)
                budget -= len(plan[s])
        return plan

    def _eval(self, plan: Dict[_Slot, List[int]]):
        tokens: List[int] = []
        pos: List[int] = []
        seq: List[int] = []
        for s, toks in plan.items():
            tokens += toks
            pos += range(len(s.cached), len(s.cached) + len(toks))
            seq += [s.seq] * len(toks)
        with self._eval_lock:
            return self._core.eval_batch(tokens, pos, seq)

    def _step(self, active: List[_Slot]) -> None:
        plan = self._plan(active)
        t0 = time.perf_counter()
        try:
            rows = self._eval(plan)
            results = list(zip(plan, rows))
        except (RuntimeError, ValueError):
            results = self._eval_alone(plan)
        dt = time.perf_counter() - t0
        with self._cond:
            n_decode = sum(not s.pending for s in plan)
            self.counters["steps"] += 1
            self.counters["step_seconds"] += dt
            self.counters["prompt_tokens"] += sum(len(t) for s, t in plan.items() if s.pending)
            self.counters["decode_tokens"] += n_decode
            if n_decode:
                self.decode_batch_sizes[n_decode] = self.decode_batch_sizes.get(n_decode, 0) + 1
            for s, logits in results:
                self._advance(s, plan[s], logits)

    def _eval_alone(self, plan: Dict[_Slot, List[int]]):
        """After a failed step (which changed no sequence): each slot's tokens alone, so that a
        request whose logits went non-finite fails and the others go on with the same logits they
        would have had batched."""
        results = []
        for s, toks in plan.items():
            try:
                results.append((s, self._eval({s: toks})[0]))
            except (RuntimeError, ValueError) as e:
                logger.warning("request in slot %d failed: %s", s.seq, e)
                with self._cond:
                    self._finish(s, Event(error=str(e)))
        return results

    def _advance(self, s: _Slot, toks: List[int], logits) -> None:
        """After a step ran ``toks`` for slot ``s``: the cache holds them; a slot past its prompt
        samples its next token and tells its request."""
        if s.request is None:  # failed in this step
            return
        s.cached += toks
        if s.pending:
            del s.pending[:len(toks)]
            if s.pending:
                return
        if s.request.cancelled:
            self.counters["cancelled"] += 1
            s.free()
            return
        dec = s.decoder
        piece = dec.step(logits)
        if dec.finish is None:
            if piece:
                s.request.on_event(Event(text=piece))
            return
        self._finish(s, Event(text=piece + dec.flush(), finish=dec.finish, prompt_tokens=dec.n_prompt,
                              completion_tokens=dec.n_generated, cached_tokens=s.request.cached_tokens))

    def _finish(self, s: _Slot, event: Event) -> None:
        req = s.request
        s.free()
        if req is not None and not req.cancelled:
            req.on_event(event)
