"""Calibration text: a file, or text the model writes itself from varied prompts; tokenized and cut
into windows that each start at position 0 (with BOS where the model adds one), split into
calibration and held-out windows."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

from ..errors import ConvertError

log = logging.getLogger(__name__)

# Varied registers, so that the neurons that fire on stories, code, lists and dialogue all count.
PROMPTS = [
    "Once upon a time, in a small village by the sea,",
    "The history of the Roman Empire can be divided into",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Photosynthesis is the process by which plants",
    "Here is a simple recipe for a vegetable soup. Ingredients:",
    "Q: What is the difference between a virus and a bacterium?\nA:",
    "Dear hiring manager,\n\nI am writing to apply for",
    "The most important thing to understand about interest rates is",
    "In mathematics, a prime number is",
    "# Installation\n\nTo install the package, run",
    "The weather forecast for tomorrow says",
    "Alice: Did you finish the report?\nBob:",
    "Ten tips for learning a new language:\n1.",
    "The French Revolution began in 1789 when",
    "SELECT name, COUNT(*) FROM orders",
    "My favourite book as a child was",
    "The human heart has four chambers:",
    "Breaking news: scientists have discovered",
    "To solve the equation 3x + 7 = 22, we",
    "The city at night was quiet, except for",
    "A good night's sleep matters because",
    "Climate change affects agriculture in several ways.",
    "The rules of chess are simple to learn:",
    "In the year 2050, cities will",
]


@dataclass
class Windows:
    """Three disjoint parts of the text's windows: `calib` to train on (and profile), `tune` to choose
    what training cannot (the predictors' per-layer cut-offs), `test` to report on, seen by neither."""
    calib: List[List[int]]
    tune: List[List[int]]
    test: List[List[int]]

    @property
    def held_out(self) -> List[List[int]]:
        """Every window not trained on (tune and test)."""
        return self.tune + self.test

    @property
    def n_calib_tokens(self) -> int:
        return sum(len(w) for w in self.calib)

    @property
    def n_held_out_tokens(self) -> int:
        return sum(len(w) for w in self.held_out)

    @property
    def n_tune_tokens(self) -> int:
        return sum(len(w) for w in self.tune)

    @property
    def n_test_tokens(self) -> int:
        return sum(len(w) for w in self.test)


def read_texts(paths: Sequence[Path]) -> str:
    parts = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise ConvertError(f"calibration text {p} does not exist or is not a file")
        t = p.read_text(encoding="utf-8", errors="replace")
        if not t.strip():
            raise ConvertError(f"calibration text {p} is empty")
        parts.append(t)
    return "\n\n".join(parts)


def generate_text(model_path: str, n_tokens: int, seed: int = 0, n_threads: Optional[int] = None,
                  progress: bool = True) -> str:
    """The model's own text: continuations of PROMPTS, sampled (temperature 0.8, top-p 0.95) so that
    the text is varied rather than the greedy loop a small model falls into."""
    from prosparse_rt import Model
    from tqdm import tqdm

    per_prompt = max(32, min(512, n_tokens // len(PROMPTS) + 1))
    out, got = [], 0
    bar = tqdm(total=n_tokens, desc="writing calibration text", unit="tok", disable=not progress)
    with Model(model_path, n_ctx=per_prompt + 128, n_threads=n_threads, sparsity="dense") as m:
        i = 0
        while got < n_tokens:
            prompt = PROMPTS[i % len(PROMPTS)]
            text = m.generate(prompt, max_tokens=per_prompt, temperature=0.8, top_p=0.95, top_k=40,
                              min_p=0.05, repeat_penalty=1.1, seed=seed + i)
            n = m.last_completion_tokens + len(m.tokenize(prompt, add_bos=False))
            out.append(prompt + text)
            got += n
            bar.update(n)
            i += 1
    bar.close()
    return "\n\n".join(out)


def make_windows(tokenize, text: str, bos: Optional[int], ctx: int, max_tokens: int,
                 held_out_every: int = 5) -> Windows:
    """Cuts the text's tokens into windows of `ctx` tokens (BOS first when `bos` is given): up to
    `max_tokens` calibration tokens, and of every `held_out_every` windows one held out besides,
    alternately for tuning and for testing (interleaved, so that all three parts sample the whole
    text; at least one of each whenever the text has three windows). held_out_every=0: every
    window is a calibration window."""
    if not text.strip():
        raise ConvertError("the calibration text is empty")
    if ctx < 8:
        raise ConvertError(f"--ctx must be at least 8 tokens, got {ctx}")
    ids = tokenize(text)
    step = ctx - (1 if bos is not None else 0)
    windows = []
    for i in range(0, len(ids), step):
        w = ([bos] if bos is not None else []) + list(ids[i:i + step])
        if len(w) < 8:
            break  # a tail too short to say anything
        windows.append(w)
    if not windows:
        raise ConvertError(f"the calibration text has only {len(ids)} tokens: too few for one window")
    calib, held, n = [], [], 0
    for k, w in enumerate(windows):
        if held_out_every and k % held_out_every == held_out_every - 1:
            held.append(w)
        elif n < max_tokens:
            calib.append(w)
            n += len(w)
        else:
            break
    if held_out_every:
        while len(held) < 2 and len(calib) >= 2:
            held.append(calib.pop())
    return Windows(calib, held[0::2], held[1::2])
