"""The Python API: :class:`Model` wraps the native core with argument checks, generation,
streaming, chat templates and llama-cpp-python-style completion dicts."""
from __future__ import annotations

import logging
import math
import os
import random
import re
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import _core, _openai
from ._generation import SequenceDecoder, common_prefix_len

logger = logging.getLogger("prosparse_rt")

SPARSITY_CHOICES = ("auto", "dense", "exact", "predict")
KV_TYPES = ("f16", "f32", "q8_0")  # the KV cache's type, as llama.cpp's -ctk/-ctv
_GGUF_MAGICS = (b"GGUF", b"PWRI")
_INT32_MAX = 2**31 - 1  # the native core's int
# More threads than cores only makes them wait for each other; this many is surely a mistake.
MAX_THREADS_PER_CORE = 4


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


# What each generation option must be: (test, requirement). The API names the option, the CLI its flag.
_OPTION_RULES: Dict[str, Tuple[Callable[[Any], bool], str]] = {
    "max_tokens": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an int >= 1"),
    "temperature": (lambda v: _is_number(v) and v >= 0, "a number >= 0 (0 = greedy)"),
    "top_k": (lambda v: _is_int(v, 0, _INT32_MAX), f"an int in [0, {_INT32_MAX}] (0 = off)"),
    "top_p": (lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "min_p": (lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "repeat_penalty": (lambda v: _is_number(v) and v > 0, "a number > 0"),
    "seed": (lambda v: v is None or _is_int(v, 0, 2**64 - 1), "None or an int in [0, 2**64)"),
}


def option_problem(name: str, value: Any) -> Optional[str]:
    """Why ``value`` is not a valid generation option ``name`` ("must be ..., got ..."), or None."""
    ok, want = _OPTION_RULES[name]
    return None if ok(value) else f"must be {want}, got {value!r}"


def _check_option(name: str, value: Any) -> None:
    problem = option_problem(name, value)
    if problem:
        raise ValueError(f"{name} {problem}")


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


@dataclass(frozen=True)
class SamplingParams:
    """How generation picks each next token; llama-cpp-python's names and defaults. Checked when
    made: a bad value raises ValueError naming the option.

    - ``temperature``: 0 is greedy (exactly the argmax, repeatable); higher flattens the distribution.
    - ``top_k``: keep the k most likely tokens (0 = all). ``top_p``: the smallest set whose
      probability reaches p. ``min_p``: drop tokens below min_p times the most likely one's.
    - ``repeat_penalty``: divides the logits of tokens among the last 64 (1.0 = off).
    - ``seed``: for this call (None = a fresh random one).
    - ``stop``: a string or strings that end the text (not included in it).
    """

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    seed: Optional[int] = None
    stop: Union[None, str, Sequence[str]] = None

    def __post_init__(self) -> None:
        for name in ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "seed"):
            _check_option(name, getattr(self, name))
        stop = self.stop
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        else:
            stop = tuple(stop)
            if not all(isinstance(x, str) for x in stop):
                raise TypeError("stop must be a string or a list of strings")
        object.__setattr__(self, "stop", stop)


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
    """A GGUF model loaded into the native runtime: tokenizer, weights (memory-mapped), KV cache.

    >>> with Model("model.gguf", n_ctx=2048) as m:
    ...     m.generate("The capital of France is", max_tokens=16, temperature=0.0)

    Args:
        model_path: the GGUF file (ours, llama.cpp's or PowerInfer's).
        n_ctx: the context in tokens, prompt and generated text together; 0 = the model's own
            training context. The KV cache for it is allocated at load.
        n_threads: threads for the forward pass (None = every core this process may use). More than
            the cores warns (threads then wait for each other); more than 4x the cores
            (``MAX_THREADS_PER_CORE``) is refused.
        sparsity: the FFN strategy. ``"auto"`` runs ``"exact"`` where the activation is sparse
            (ReLU/FATReLU files with the neuron-major ``ffn_down_t``, and SiLU models with layer
            thresholds), else ``"dense"``. ``"exact"`` skips the neurons whose activation is zero
            (the same numbers as dense, bit for bit); ``"predict"`` lets the file's per-layer
            predictor choose the neurons (approximate; needs ``blk.N.fc1/fc2``). ``self.strategy``
            says which runs.
        verbose: log loading details (through the ``prosparse_rt`` logger, to stderr unless the
            application configured logging).
        n_batch: prompt tokens per forward pass.
        activation_threshold: replaces a ReLU/FATReLU file's threshold t (keep x >= t); None = the
            file's.
        predictor_threshold: replaces every layer's predictor logit cut-off (``predict``); None = the
            file's (``prosparse.predictor.layer_thresholds``, else ``prosparse.predictor.threshold``).
        diag_recall: with ``predict``, also compute the full gate to report the predictor's recall
            in ``stats``.
        layer_thresholds: per-layer thresholds on |SiLU(gate)| for a SiLU model (one non-negative
            number per layer), replacing the file's ``prosparse.layer_thresholds``: neurons below
            their layer's threshold count as zero. The model becomes sparse: where the file has
            only llama.cpp's ``ffn_down``, its neuron-major F16 copy is built in memory at load, as
            ``prosparse-calibrate`` would write it, so every strategy computes the same model.
            ``prosparse_rt.presets`` holds the thresholds shipped for the default model.
        device: where the weights go: ``"cpu"``, ``"cuda"``/``"cuda:N"`` (a GPU; a ValueError naming
            why where there is none usable), or ``"auto"`` (a GPU where there is one, else the CPU).
            A GPU gets the weights read most per byte of its budget (attention, then each layer's
            most frequently firing neurons); ``stats["placement"]`` says where everything is and
            what each device reads, how long the GPU was busy and how long the CPU waited for it.
            The GPU runs the attention of its layers and each layer's hot neurons while the CPU
            runs the cold ones; with everything placed, the residual stream stays on the GPU.
        vram_budget: GiB of GPU memory for weights and the KV cache (None: the GPU's free memory
            less a margin for scratch and the CUDA context).
        n_seq: sequences the KV cache holds, ``n_ctx`` positions each (the server's parallel slots,
            which it drives itself; ``generate`` and the other calls here use sequence 0).
        kv_type: the KV cache's type, ``"f16"`` (default, as llama.cpp), ``"f32"`` (what the
            references compare against) or ``"q8_0"`` (half of f16's bytes; the head size must be a
            multiple of 32). Deep in a context the cache is most of what decode reads.

    Raises:
        FileNotFoundError, IsADirectoryError: no file at ``model_path``.
        ValueError: a bad parameter, or a file that is not a valid GGUF model (the message names
            the parameter, tensor or key at fault).
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
        layer_thresholds: Optional[Sequence[float]] = None,
        kv_type: str = "f16",
        device: str = "auto",
        vram_budget: Optional[float] = None,
        n_seq: int = 1,
    ):
        if not _is_int(n_ctx, 0, _INT32_MAX):
            raise ValueError(f"n_ctx must be an int in [0, {_INT32_MAX}] (0 = the model's own), got {n_ctx!r}")
        if n_threads is not None:
            cores = usable_cores()
            limit = MAX_THREADS_PER_CORE * cores
            if not _is_int(n_threads, 1, _INT32_MAX):
                raise ValueError(f"n_threads must be an int >= 1 or None, got {n_threads!r}")
            if n_threads > limit:
                raise ValueError(f"n_threads={n_threads} is more than {MAX_THREADS_PER_CORE}x the {cores} "
                                 f"cores this process may use (at most {limit}; None = one per core)")
            if n_threads > cores:
                warnings.warn(f"n_threads={n_threads} is more than the {cores} cores this process may use: "
                              "the threads will wait for each other", RuntimeWarning, stacklevel=2)
        if not _is_int(n_seq, 1, 4096):
            raise ValueError(f"n_seq must be an int in [1, 4096], got {n_seq!r}")
        if not _is_int(n_batch, 1, _INT32_MAX):
            raise ValueError(f"n_batch must be an int in [1, {_INT32_MAX}], got {n_batch!r}")
        if sparsity not in SPARSITY_CHOICES:
            raise ValueError(f"sparsity must be one of {SPARSITY_CHOICES}, got {sparsity!r}")
        if kv_type not in KV_TYPES:
            raise ValueError(f"kv_type must be one of {KV_TYPES}, got {kv_type!r}")
        if not isinstance(device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d{1,4})?", device):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
        if vram_budget is not None and not (_is_number(vram_budget) and vram_budget >= 0):
            raise ValueError(f"vram_budget must be a finite number of GiB >= 0 or None, got {vram_budget!r}")
        for name, v in (("activation_threshold", activation_threshold), ("predictor_threshold", predictor_threshold)):
            if v is not None and not _is_number(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        if layer_thresholds is not None:
            if isinstance(layer_thresholds, (str, bytes)) or not hasattr(layer_thresholds, "__iter__"):
                raise ValueError(f"layer_thresholds must be a list of numbers, one per layer, got {layer_thresholds!r}")
            layer_thresholds = list(layer_thresholds)
            bad = next((i for i, t in enumerate(layer_thresholds) if not (_is_number(t) and t >= 0)), None)
            if bad is not None:
                raise ValueError(f"layer_thresholds[{bad}] must be a finite number >= 0, got {layer_thresholds[bad]!r}")
            if not layer_thresholds:
                raise ValueError("layer_thresholds is empty (None keeps the file's)")
            layer_thresholds = [float(t) for t in layer_thresholds]
        self.verbose = verbose
        if verbose:
            logger.setLevel(logging.INFO)
            if not logger.hasHandlers():  # an application's (or the CLI's) handler shows it already
                handler = logging.StreamHandler()
                handler.setFormatter(logging.Formatter("prosparse_rt: %(message)s"))
                logger.addHandler(handler)
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
            layer_thresholds=layer_thresholds or [],
            kv_type=kv_type,
            device=device,
            vram_budget=-1.0 if vram_budget is None else float(vram_budget),
            n_seq=n_seq,
        )
        self.n_seq = n_seq
        self._cache: List[int] = []  # token ids whose keys/values are in the native KV cache
        self.n_batch = n_batch
        self.metadata: Dict[str, Any] = self._core.metadata
        self.chat_template: Optional[str] = self.metadata.get("tokenizer.chat_template")
        hp = self._core.hparams
        built = self._core.stats()["n_down_t_built"]
        logger.info(
            "loaded %s: %s, %d layers, n_embd %d, n_ff %d, activation %s, strategy %s%s, %d threads, kernels %s, %.2f s",
            self.model_path, hp["arch"], hp["n_layer"], hp["n_embd"], hp["n_ff"], hp["activation"],
            self._core.strategy, f" (ffn_down_t built for {built} layers)" if built else "",
            self._core.n_threads, _core.active_isa(), time.perf_counter() - t0)
        placement = self._core.stats()["placement"]
        logger.info("device %s%s", placement["device"], f": {placement['note']}" if placement["note"] else "")

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
        """Counters since load: tokens and seconds for prompt and decode (per sequence: a sequence's
        one token in a call is a decode token, several are prompt; a call mixing both splits its
        time by tokens), tokens/s, the bytes
        of weights the last decoded token read, and per layer (lists of n_layer, averaged over
        tokens): ``active_fraction`` (neurons whose activation is non-zero, where the strategy
        computes it), ``predicted_fraction`` and ``recall`` (predict; recall needs
        ``diag_recall=True``), ``ffn_bytes_per_token``; and ``n_interleaved``, the weight
        matrices re-laid out at load for faster matrix products (Q4_0, Q4_1 and Q8_0 matrices
        read whole; ``PROSPARSE_INTERLEAVE=0`` keeps the file's layout); ``n_down_t_built``, the
        layers whose neuron-major ``ffn_down_t`` was built at load (see ``layer_thresholds``);
        ``union_fraction_by_batch``, {n: the union of the active rows over a step's n tokens as a
        fraction of n_ff, averaged over layers and steps} (exact, predict: what a batch of several
        sequences reads, against the per-token ``active_fraction``); ``weight_bytes_per_step_by_batch``,
        {n: weight bytes a decode step of n sequences read, averaged over such steps} (the union
        once per step: what a server's aggregate GB/s is made of)."""
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
        try:  # the native tokenizer takes UTF-8, which cannot carry lone surrogates
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"text is not valid Unicode: {e.reason} {text[e.start:e.end]!r} at position "
                             f"{e.start}") from None
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
        stream: bool = False,
        **sampling: Any,
    ) -> Union[str, Iterator[str]]:
        """Continues ``prompt`` (text, special tokens parsed; or token ids) by up to ``max_tokens``
        tokens. Returns the text, or with ``stream=True`` an iterator of text pieces (break to
        cancel). Streamed and returned text are identical. ``sampling``: the options of
        :class:`SamplingParams` (``temperature``, ``top_k``, ``top_p``, ``min_p``,
        ``repeat_penalty``, ``seed``, ``stop``). Bad arguments raise here, also with ``stream=True``."""
        it = self._generate(prompt, max_tokens, SamplingParams(**sampling))
        if stream:
            return (piece for piece, _ in it if piece)
        return "".join(piece for piece, _ in it)

    def _generate(self, prompt, max_tokens: int, params: SamplingParams) -> Iterator[Tuple[str, Optional[str]]]:
        """Checks the arguments and tokenizes now; returns an iterator of (text piece, finish_reason
        or None) whose last item carries the reason."""
        _check_option("max_tokens", max_tokens)
        ids = self.prompt_ids(prompt)
        return self._decode(ids, self.sampler(params), max_tokens, params.stop)

    def prompt_ids(self, prompt: Union[str, Sequence[int]]) -> List[int]:
        """The token ids of a prompt (text, special tokens parsed; or ids), checked to leave room in
        the context for at least one generated token (ValueError otherwise)."""
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
        return ids

    @staticmethod
    def sampler(params: SamplingParams) -> "_core.Sampler":
        """A native sampler for ``params`` (seed None: a fresh random one)."""
        return _core.Sampler(
            temperature=float(params.temperature), top_k=params.top_k, top_p=float(params.top_p),
            min_p=float(params.min_p), repeat_penalty=float(params.repeat_penalty), repeat_last_n=64,
            seed=random.getrandbits(63) if params.seed is None else params.seed)

    def _decode(self, ids: List[int], sampler, max_tokens: int, stop) -> Iterator[Tuple[str, Optional[str]]]:
        core = self._native()
        dec = SequenceDecoder(ids, sampler, max_tokens, stop, self.n_ctx, core.is_eog, core.token_to_piece)
        logits = self._advance(dec.ids)
        while True:
            piece = dec.step(logits)
            if piece or not dec.finish:
                yield piece, None
            if dec.finish:
                break
            logits = self._advance(dec.ids)
        if dec.finish == "length" and len(dec.ids) < self.n_ctx:
            # the last token runs too: the cache then holds the whole text for the next call, and
            # stats count a decode step for every generated token
            self._advance(dec.ids)
        self.last_prompt_tokens = dec.n_prompt
        self.last_completion_tokens = dec.n_generated
        yield dec.flush(), dec.finish

    # ----------------------------------------------------------------- llama-cpp-python style
    def create_completion(
        self,
        prompt: Union[str, Sequence[int]],
        max_tokens: int = 16,
        stream: bool = False,
        **sampling: Any,
    ) -> Union[Dict[str, Any], Iterator[Dict[str, Any]]]:
        """llama-cpp-python's completion dict (or an iterator of chunks with ``stream=True``); the
        arguments are :meth:`generate`'s."""
        it = self._generate(prompt, max_tokens, SamplingParams(**sampling))
        cid, created = _openai.new_id("cmpl")
        if stream:
            return (_openai.completion(cid, created, self.model_path, piece, finish)
                    for piece, finish in it if piece or finish)
        pieces, finish = [], None
        for piece, finish in it:
            pieces.append(piece)
        return _openai.completion(cid, created, self.model_path, "".join(pieces), finish,
                                  _openai.usage(self.last_prompt_tokens, self.last_completion_tokens))

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
        """Generates the assistant's reply to ``messages`` ([{"role": ..., "content": ...}]); the other
        arguments are :meth:`generate`'s."""
        return self.generate(self._chat_prompt(messages), max_tokens=max_tokens, **kwargs)

    def create_chat_completion(
        self, messages: Sequence[Dict[str, str]], max_tokens: int = 256, stream: bool = False, **sampling: Any,
    ) -> Union[Dict[str, Any], Iterator[Dict[str, Any]]]:
        """llama-cpp-python's chat completion dict, or with ``stream=True`` an iterator of
        ``chat.completion.chunk`` dicts: the assistant role, then the text pieces, then an empty
        delta with the finish_reason. The other arguments are :meth:`generate`'s; bad ones raise
        here, also with ``stream=True``."""
        it = self._generate(self._chat_prompt(messages), max_tokens, SamplingParams(**sampling))
        cid, created = _openai.new_id("chatcmpl")
        if stream:
            return self._chat_chunks(it, cid, created)
        pieces, finish = [], None
        for piece, finish in it:
            pieces.append(piece)
        return _openai.chat_completion(cid, created, self.model_path, "".join(pieces), finish,
                                       _openai.usage(self.last_prompt_tokens, self.last_completion_tokens))

    def _chat_chunks(self, it, cid: str, created: int) -> Iterator[Dict[str, Any]]:
        name = self.model_path
        yield _openai.chat_chunk(cid, created, name, {"role": "assistant"}, None)
        for piece, finish in it:
            if piece:
                yield _openai.chat_chunk(cid, created, name, {"content": piece}, None)
            if finish:
                yield _openai.chat_chunk(cid, created, name, {}, finish)

    def _chat_prompt(self, messages) -> List[int]:
        text = self.apply_chat_template(messages)
        ids = self.tokenize(text, special=True)
        bos = self.token_bos()
        if len(ids) >= 2 and ids[0] == bos and ids[1] == bos:  # template already wrote the BOS
            ids = ids[1:]
        if not ids:
            raise ValueError("the chat template rendered an empty prompt")
        return ids
