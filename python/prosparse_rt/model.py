"""The Python API: :class:`Model` wraps the native core with argument checks, generation,
streaming, chat templates and llama-cpp-python-style completion dicts."""
from __future__ import annotations

import logging
import math
import os
import random
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import numpy as np

from . import _core
from ._generation import TextAssembler, common_prefix_len

logger = logging.getLogger("prosparse_rt")

SPARSITY_CHOICES = ("auto", "dense", "exact", "predict")
KV_TYPES = ("f16", "f32", "q8_0")  # the KV cache's type, as llama.cpp's -ctk/-ctv
_GGUF_MAGICS = (b"GGUF", b"PWRI")


def _check_model_path(model_path: Union[str, os.PathLike]) -> str:
    p = Path(model_path)
    if not p.exists():
        raise FileNotFoundError(f"model file does not exist: {p}")
    if p.is_dir():
        raise IsADirectoryError(f"model path is a directory, not a GGUF file: {p}")
    with open(p, "rb") as fh:
        magic = fh.read(4)
    if magic not in _GGUF_MAGICS:
        raise ValueError(f"{p} is not a GGUF file (magic {magic!r}, expected b'GGUF' or b'PWRI')")
    return str(p)


class Model:
    """A GGUF model loaded into the native runtime.

    >>> m = Model("model.gguf", n_ctx=2048)
    >>> m.generate("The capital of France is", max_tokens=16, temperature=0.0)
    """

    def __init__(
        self,
        model_path: Union[str, os.PathLike],
        n_ctx: int = 2048,
        n_threads: Optional[int] = None,
        sparsity: str = "auto",
        verbose: bool = False,
        n_batch: int = 256,
        activation_threshold: Optional[float] = None,
        predictor_threshold: Optional[float] = None,
        diag_recall: bool = False,
        kv_type: str = "f16",
    ):
        if not isinstance(n_ctx, int) or n_ctx < 0:
            raise ValueError(f"n_ctx must be an int >= 0 (0 = the model's own), got {n_ctx!r}")
        if n_threads is not None and (not isinstance(n_threads, int) or n_threads < 1):
            raise ValueError(f"n_threads must be an int >= 1 or None, got {n_threads!r}")
        if not isinstance(n_batch, int) or n_batch < 1:
            raise ValueError(f"n_batch must be an int >= 1, got {n_batch!r}")
        if sparsity not in SPARSITY_CHOICES:
            raise ValueError(f"sparsity must be one of {SPARSITY_CHOICES}, got {sparsity!r}")
        if kv_type not in KV_TYPES:
            raise ValueError(f"kv_type must be one of {KV_TYPES}, got {kv_type!r}")
        for name, v in (("activation_threshold", activation_threshold), ("predictor_threshold", predictor_threshold)):
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v)):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        self.verbose = verbose
        if verbose and not logger.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("prosparse_rt: %(message)s"))
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
        self.model_path = _check_model_path(model_path)
        self._lock = threading.RLock()
        t0 = time.perf_counter()
        self._core: Optional[_core.Model] = _core.Model(
            self.model_path,
            n_ctx=n_ctx,
            n_threads=n_threads or 0,
            n_batch=n_batch,
            sparsity=sparsity,
            act_threshold=float("nan") if activation_threshold is None else float(activation_threshold),
            pred_threshold=float("nan") if predictor_threshold is None else float(predictor_threshold),
            diag_recall=bool(diag_recall),
            kv_type=kv_type,
        )
        self._cache: List[int] = []  # token ids whose keys/values are in the native KV cache
        self.n_batch = n_batch
        self.metadata: Dict[str, Any] = self._core.metadata
        self.chat_template: Optional[str] = self.metadata.get("tokenizer.chat_template")
        hp = self._core.hparams
        logger.info(
            "loaded %s: %s, %d layers, n_embd %d, n_ff %d, activation %s, strategy %s, %d threads, kernels %s, %.2f s",
            self.model_path, hp["arch"], hp["n_layer"], hp["n_embd"], hp["n_ff"], hp["activation"],
            self._core.strategy, self._core.n_threads, _core._testing.active_isa(), time.perf_counter() - t0)

    # ----------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Frees the weights mapping and the KV cache now rather than at garbage collection."""
        with self._lock:
            self._core = None
            self._cache = []

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _native(self) -> _core.Model:
        if self._core is None:
            raise RuntimeError("this Model has been closed")
        return self._core

    # ----------------------------------------------------------------- properties
    @property
    def n_ctx(self) -> int:
        return self._native().n_ctx

    @property
    def n_vocab(self) -> int:
        return self._native().n_vocab

    @property
    def hparams(self) -> Dict[str, Any]:
        return self._native().hparams

    @property
    def strategy(self) -> str:
        """The FFN strategy that runs ("dense", "exact", "predict")."""
        return self._native().strategy

    def token_bos(self) -> int:
        return self._native().bos

    def token_eos(self) -> int:
        return self._native().eos

    @property
    def stats(self) -> Dict[str, Any]:
        """Counters since load: tokens and seconds for prompt and decode, tokens/s, the bytes
        of weights the last decoded token read, and per layer (lists of n_layer, averaged over
        tokens): ``active_fraction`` (neurons whose activation is non-zero, where the strategy
        computes it), ``predicted_fraction`` and ``recall`` (predict; recall needs
        ``diag_recall=True``), ``ffn_bytes_per_token``; and ``n_interleaved``, the weight
        matrices re-laid out at load for faster matrix products (Q4_0, Q4_1 and Q8_0 matrices
        read whole; ``PROSPARSE_INTERLEAVE=0`` keeps the file's layout)."""
        s = self._native().stats()
        s["prompt_tokens_per_second"] = s["n_prompt_tokens"] / s["prompt_seconds"] if s["prompt_seconds"] else 0.0
        s["decode_tokens_per_second"] = s["n_decode_tokens"] / s["decode_seconds"] if s["decode_seconds"] else 0.0
        s["strategy"] = self.strategy
        return s

    # ----------------------------------------------------------------- tokens
    def tokenize(self, text: Union[str, bytes], add_bos: Optional[bool] = None, special: bool = True) -> List[int]:
        """Text to token ids. ``add_bos=None`` follows the model's default; ``special`` parses
        special-token text such as ``<|im_start|>`` into its id."""
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        if not isinstance(text, str):
            raise TypeError(f"text must be str or bytes, got {type(text).__name__}")
        core = self._native()
        if add_bos is None:
            add_bos = core.add_bos_default
        return core.tokenize(text, bool(add_bos), bool(special))

    def detokenize(self, ids: Sequence[int], special: bool = False) -> str:
        return self._native().detokenize(self._check_ids(ids, allow_empty=True), special).decode("utf-8", errors="replace")

    def _check_ids(self, ids: Sequence[int], allow_empty: bool = False) -> List[int]:
        try:
            out = [int(i) for i in ids]
        except (TypeError, ValueError) as e:
            raise TypeError(f"token ids must be integers: {e}") from None
        if not out and not allow_empty:
            raise ValueError("token id list is empty")
        nv = self.n_vocab
        bad = [i for i in out if i < 0 or i >= nv]
        if bad:
            raise ValueError(f"token id {bad[0]} is out of range [0, {nv})")
        return out

    # ----------------------------------------------------------------- evaluation
    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Logits for every position of ``ids`` run from position 0, nothing added:
        a float32 array [len(ids), n_vocab] that owns its memory."""
        ids = self._check_ids(ids)
        if len(ids) > self.n_ctx:
            raise ValueError(f"{len(ids)} tokens do not fit the context of {self.n_ctx}")
        rows = []
        with self._lock:
            core = self._native()
            core.rewind(0)
            self._cache = []
            for i in range(0, len(ids), self.n_batch):
                rows.append(core.eval(ids[i:i + self.n_batch], all_logits=True))
                self._cache = ids[: i + self.n_batch]
        return rows[0] if len(rows) == 1 else np.concatenate(rows, axis=0)

    def _advance(self, ids: List[int]) -> np.ndarray:
        """Makes the KV cache hold exactly ``ids`` and returns the last token's logits, reusing
        the longest cached prefix. Runs in batches so that Ctrl-C is seen between them."""
        with self._lock:
            core = self._native()
            keep = common_prefix_len(self._cache, ids)
            if keep == len(ids):  # everything cached: recompute the last token for its logits
                keep -= 1
            core.rewind(keep)
            self._cache = self._cache[:keep]
            logits = None
            for i in range(keep, len(ids), self.n_batch):
                chunk = ids[i:i + self.n_batch]
                logits = core.eval(chunk)
                self._cache = ids[: i + len(chunk)]
            assert logits is not None
            return logits

    # ----------------------------------------------------------------- generation
    def generate(
        self,
        prompt: Union[str, Sequence[int]],
        max_tokens: int = 128,
        temperature: float = 0.8,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        repeat_penalty: float = 1.0,
        seed: Optional[int] = None,
        stop: Union[None, str, Sequence[str]] = None,
        stream: bool = False,
    ) -> Union[str, Iterator[str]]:
        """Continues ``prompt`` (text, special tokens parsed; or token ids). Returns the text,
        or with ``stream=True`` an iterator of text pieces (break to cancel). Streamed and
        returned text are identical. ``temperature=0`` is greedy and repeatable."""
        it = self._generate(prompt, max_tokens, temperature, top_k, top_p, min_p, repeat_penalty, seed, stop)
        if stream:
            return (piece for piece, _ in it if piece)
        return "".join(piece for piece, _ in it)

    def _prepare(self, prompt, max_tokens, temperature, top_k, top_p, min_p, repeat_penalty, seed, stop):
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {max_tokens!r}")
        if not (isinstance(temperature, (int, float)) and temperature >= 0):
            raise ValueError(f"temperature must be >= 0, got {temperature!r}")
        if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
        if not isinstance(top_k, int) or top_k < 0:
            raise ValueError(f"top_k must be an int >= 0, got {top_k!r}")
        if not (isinstance(min_p, (int, float)) and 0 <= min_p <= 1):
            raise ValueError(f"min_p must be in [0, 1], got {min_p!r}")
        if not (isinstance(repeat_penalty, (int, float)) and repeat_penalty > 0):
            raise ValueError(f"repeat_penalty must be > 0, got {repeat_penalty!r}")
        if seed is not None and (not isinstance(seed, int) or seed < 0):
            raise ValueError(f"seed must be an int >= 0 or None, got {seed!r}")
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        else:
            stop = list(stop)
            if not all(isinstance(s, str) for s in stop):
                raise TypeError("stop must be a string or a list of strings")
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            ids = self.tokenize(prompt, special=True)
        else:
            ids = self._check_ids(prompt)
        if not ids:
            raise ValueError("prompt is empty")
        if len(ids) >= self.n_ctx:
            raise ValueError(
                f"prompt is {len(ids)} tokens, which does not fit the context of {self.n_ctx} "
                f"(leave room for at least one generated token)")
        sampler = _core.Sampler(
            temperature=float(temperature), top_k=top_k, top_p=float(top_p), min_p=float(min_p),
            repeat_penalty=float(repeat_penalty), repeat_last_n=64,
            seed=random.getrandbits(63) if seed is None else seed)
        return ids, sampler, stop

    def _generate(self, prompt, max_tokens, temperature, top_k, top_p, min_p, repeat_penalty, seed, stop):
        """Yields (text piece, finish_reason or None); the last item carries the reason."""
        ids, sampler, stop = self._prepare(prompt, max_tokens, temperature, top_k, top_p, min_p, repeat_penalty, seed, stop)
        core = self._native()
        text = TextAssembler(stop)
        n_prompt = len(ids)
        finish = "length"
        logits = self._advance(ids)
        for _ in range(max_tokens):
            tok = sampler.sample(logits, ids)
            if core.is_eog(tok):
                finish = "stop"
                break
            ids.append(tok)
            piece = text.feed(core.token_to_piece(tok))
            if text.stopped:
                finish = "stop"
                yield piece, None
                break
            yield piece, None
            if len(ids) >= self.n_ctx:
                break
            logits = self._advance(ids)
        self.last_prompt_tokens = n_prompt
        self.last_completion_tokens = len(ids) - n_prompt
        yield text.flush(), finish

    # ----------------------------------------------------------------- llama-cpp-python style
    def create_completion(
        self,
        prompt: Union[str, Sequence[int]],
        max_tokens: int = 16,
        temperature: float = 0.8,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        repeat_penalty: float = 1.0,
        seed: Optional[int] = None,
        stop: Union[None, str, Sequence[str]] = None,
        stream: bool = False,
    ) -> Union[Dict[str, Any], Iterator[Dict[str, Any]]]:
        """llama-cpp-python's completion dict (or an iterator of chunks with ``stream=True``)."""
        it = self._generate(prompt, max_tokens, temperature, top_k, top_p, min_p, repeat_penalty, seed, stop)
        cid, created, name = f"cmpl-{uuid.uuid4()}", int(time.time()), self.model_path

        def chunk(text: str, finish: Optional[str]) -> Dict[str, Any]:
            return {"id": cid, "object": "text_completion", "created": created, "model": name,
                    "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}

        if stream:
            return (chunk(piece, finish) for piece, finish in it if piece or finish)
        pieces, finish = [], None
        for piece, finish in it:
            pieces.append(piece)
        out = chunk("".join(pieces), finish)
        out["usage"] = {"prompt_tokens": self.last_prompt_tokens,
                        "completion_tokens": self.last_completion_tokens,
                        "total_tokens": self.last_prompt_tokens + self.last_completion_tokens}
        return out

    def __call__(self, prompt, **kwargs):
        return self.create_completion(prompt, **kwargs)

    # ----------------------------------------------------------------- chat
    def apply_chat_template(self, messages: Sequence[Dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Renders ``messages`` with the GGUF's ``tokenizer.chat_template`` (sandboxed jinja2)."""
        from .chat import render_chat

        core = self._native()
        bos = core.detokenize([core.bos], True).decode("utf-8", "replace") if core.bos >= 0 else ""
        eos = core.detokenize([core.eos], True).decode("utf-8", "replace") if core.eos >= 0 else ""
        return render_chat(self.chat_template, messages, bos_token=bos, eos_token=eos,
                           add_generation_prompt=add_generation_prompt)

    def chat(self, messages: Sequence[Dict[str, str]], max_tokens: int = 256, **kwargs) -> Union[str, Iterator[str]]:
        """Generates the assistant's reply to ``messages`` ([{"role": ..., "content": ...}])."""
        return self.generate(self._chat_prompt(messages), max_tokens=max_tokens, **kwargs)

    def create_chat_completion(self, messages: Sequence[Dict[str, str]], max_tokens: int = 256, **kwargs) -> Dict[str, Any]:
        """llama-cpp-python's chat completion dict (non-streaming)."""
        if kwargs.get("stream"):
            raise ValueError("create_chat_completion(stream=True) is not supported; use chat(stream=True)")
        out = self.create_completion(self._chat_prompt(messages), max_tokens=max_tokens, **kwargs)
        choice = out["choices"][0]
        return {"id": out["id"].replace("cmpl", "chatcmpl"), "object": "chat.completion",
                "created": out["created"], "model": out["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": choice["text"]},
                             "finish_reason": choice["finish_reason"]}],
                "usage": out["usage"]}

    def _chat_prompt(self, messages) -> List[int]:
        text = self.apply_chat_template(messages)
        ids = self.tokenize(text, special=True)
        bos = self.token_bos()
        if len(ids) >= 2 and ids[0] == bos and ids[1] == bos:  # template already wrote the BOS
            ids = ids[1:]
        if not ids:
            raise ValueError("the chat template rendered an empty prompt")
        return ids
