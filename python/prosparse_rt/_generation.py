"""Text assembly for generation: incremental UTF-8 decoding and stop strings.

Both streaming and non-streaming generation go through :class:`TextAssembler`, so they
produce the same text by construction."""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Tuple


def _utf8_complete_prefix(buf: bytes) -> int:
    """Length of the longest prefix of ``buf`` that does not end inside a UTF-8 sequence."""
    n = len(buf)
    # look back at most 3 bytes for the start of an unfinished multi-byte sequence
    for back in range(1, min(4, n) + 1):
        b = buf[n - back]
        if b & 0xC0 == 0x80:  # continuation byte: keep looking for the lead byte
            continue
        if b & 0x80 == 0:  # ASCII: complete
            return n
        need = 2 if b & 0xE0 == 0xC0 else 3 if b & 0xF0 == 0xE0 else 4 if b & 0xF8 == 0xF0 else 1
        return n if back >= need else n - back
    return n


class TextAssembler:
    """Turns token bytes into text pieces, holding back incomplete UTF-8 sequences and any
    tail that could still grow into a stop string."""

    def __init__(self, stop: Sequence[str]):
        self.stop = [s for s in stop if s]
        self._pending = b""      # bytes not yet decoded (an unfinished UTF-8 sequence)
        self._held = ""          # decoded text held back because it may start a stop string
        self.stopped = False

    def feed(self, piece: bytes) -> str:
        """Adds one token's bytes; returns the text that is now safe to emit."""
        buf = self._pending + piece
        cut = _utf8_complete_prefix(buf)
        self._pending = buf[cut:]
        text = self._held + buf[:cut].decode("utf-8", errors="replace")
        self._held = ""
        if not self.stop:
            return text
        hit = self._find_stop(text)
        if hit is not None:
            self.stopped = True
            self._pending = b""
            return text[:hit]
        keep = self._stop_prefix_len(text)
        if keep:
            self._held = text[len(text) - keep:]
            text = text[: len(text) - keep]
        return text

    def flush(self) -> str:
        """The rest, at the end of generation (incomplete bytes become U+FFFD)."""
        if self.stopped:
            return ""
        text = self._held + self._pending.decode("utf-8", errors="replace")
        self._held, self._pending = "", b""
        return text

    def _find_stop(self, text: str) -> Optional[int]:
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _stop_prefix_len(self, text: str) -> int:
        """Longest suffix of text that is a proper prefix of some stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best


class SequenceDecoder:
    """One sequence's generation after its prompt: samples each next token from its logits, ends at
    an end-of-generation token or a stop string ("stop"), after ``max_tokens`` tokens or at the end
    of the context ("length"), and assembles the text. :meth:`Model.generate` and the server's slots
    both decode through it, so a request's text depends only on its logits, which are the same bits
    alone or batched (docs/design.md "Determinism").

    ``max_tokens`` None: until the end of the context. ``is_eog`` and ``token_to_piece`` are the
    native model's."""

    def __init__(self, ids: Sequence[int], sampler: Any, max_tokens: Optional[int], stop: Sequence[str],
                 n_ctx: int, is_eog: Callable[[int], bool], token_to_piece: Callable[[int], bytes]):
        self.ids = list(ids)  # prompt, then the generated tokens
        self.n_prompt = len(self.ids)
        self.finish: Optional[str] = None  # "stop" or "length" once generation has ended
        self._sampler, self._max_tokens, self._n_ctx = sampler, max_tokens, n_ctx
        self._is_eog, self._token_to_piece = is_eog, token_to_piece
        self._text = TextAssembler(stop)

    @property
    def n_generated(self) -> int:
        return len(self.ids) - self.n_prompt

    def step(self, logits) -> str:
        """Samples the next token from ``logits`` (the last token's, float32 [n_vocab]); returns the
        text that is now safe to emit. After it, ``finish`` says whether generation has ended;
        if not, ``ids[-1]`` is the token to run next."""
        tok = self._sampler.sample(logits, self.ids)
        if self._is_eog(tok):
            self.finish = "stop"
            return ""
        self.ids.append(tok)
        piece = self._text.feed(self._token_to_piece(tok))
        if self._text.stopped:
            self.finish = "stop"
        elif (self._max_tokens is not None and self.n_generated >= self._max_tokens) or len(self.ids) >= self._n_ctx:
            self.finish = "length"
        return piece

    def flush(self) -> str:
        """The text held back, once generation has ended."""
        return self._text.flush()


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def split_batches(ids: List[int], n: int) -> List[Tuple[int, int]]:
    return [(i, min(i + n, len(ids))) for i in range(0, len(ids), n)]
