"""One runtime, one model, one process: the timed loops of prosparse-bench.

Run as `python -m prosparse_bench.worker ...` by the CLI, with the peer venv's interpreter for
llama-cpp-python, so that both runtimes are measured the same way and neither's threads, memory
or page cache state leak into the other's figures. The last stdout line is a JSON object.

Method (llama-bench's): one warm-up pass; `depth` tokens of context evaluated once, untimed
(llama-bench's -d); then per repetition, with the KV cache cut back to those `depth` tokens,
  pp: one eval of `pp` prompt tokens, timed;
  tg: `tg` one-token evals, each fed the argmax of the previous logits (greedy decoding with a
      fixed number of steps: EOS does not stop it), timed as a whole.
The number of tokens counted is what the runtime reports as processed (its KV position less the
depth), not what was asked for.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np


class Ours:
    name = "prosparse-rt"

    def __init__(self, path, n_ctx, n_threads, n_batch, sparsity, extra_bufts, cache_type="f16", flash_attn=False,
                 device="cpu", vram_budget=None):
        from prosparse_rt import _core
        kw = dict(n_ctx=n_ctx, n_threads=n_threads, n_batch=n_batch, kv_type=cache_type, device=device,
                  vram_budget=-1.0 if vram_budget is None else vram_budget)
        if sparsity:
            kw["sparsity"] = sparsity
        self.m = _core.Model(str(path), **kw)
        self.n_vocab = self.m.n_vocab
        try:
            from importlib.metadata import version
            self.version = version("prosparse-rt")
        except Exception:
            self.version = "in-tree"
        self.strategy = getattr(self.m, "strategy", None)

    def reset(self, n=0):
        self.m.rewind(n)

    def eval(self, tokens):
        return np.asarray(self.m.eval(list(tokens)))

    def n_past(self):
        return self.m.n_past

    def stats(self):
        try:
            return dict(self.m.stats())
        except Exception:
            return {}


GGML_TYPES = {"f32": 0, "f16": 1, "q8_0": 8}  # ggml_type ids of the cache types, for type_k/type_v


class LlamaCpp:
    name = "llama.cpp"

    def __init__(self, path, n_ctx, n_threads, n_batch, sparsity, extra_bufts, cache_type="f16", flash_attn=False):
        import llama_cpp
        import llama_cpp.llama_cpp as ll
        if not extra_bufts:
            # The extra buffer types (AMX / repacked weights) crash on first decode on this CPU
            # in the native build; llama-cpp-python exposes no argument for them, so the default
            # model parameters are patched before Llama() reads them.
            orig = ll.llama_model_default_params

            def patched():
                p = orig()
                if hasattr(p, "use_extra_bufts"):
                    p.use_extra_bufts = False
                return p
            ll.llama_model_default_params = patched
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_batch,
                                   n_ubatch=n_batch, n_threads=n_threads,
                                   n_threads_batch=n_threads, verbose=False, seed=0,
                                   type_k=GGML_TYPES[cache_type], type_v=GGML_TYPES[cache_type],
                                   flash_attn=flash_attn)
        self.n_vocab = self.llm.n_vocab()
        self.version = llama_cpp.__version__
        self.strategy = "dense"

    def reset(self, n=0):
        self.llm.n_tokens = n  # eval() then drops the KV cells from n on

    def eval(self, tokens):
        self.llm.eval(list(tokens))
        # llama-cpp-python's Llama.eval copies logits only with logits_all; read the last token's
        # row (the only one requested) from the context, as our eval returns it
        return np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.n_vocab,)).copy()

    def n_past(self):
        return self.llm.n_tokens

    def stats(self):
        return {}


def run(rt, pp, tg, reps, depth=0, batch=512, seed=0):
    rng = np.random.default_rng(seed)
    lo = 3 if rt.n_vocab > 300 else 0  # skip <unk> <s> </s>
    # two tokens at least: the tg warm-up evals two single tokens (an empty eval is refused)
    prompt = [int(t) for t in rng.integers(lo, rt.n_vocab, size=max(pp, 2))]
    context = [int(t) for t in rng.integers(lo, rt.n_vocab, size=depth)]
    finite = True

    def one_pp():
        nonlocal finite
        rt.reset(depth)
        t0 = time.perf_counter()
        logits = rt.eval(prompt[:pp])
        dt = time.perf_counter() - t0
        finite = finite and bool(np.isfinite(logits).all())
        return dt, rt.n_past() - depth

    def one_tg():
        nonlocal finite
        rt.reset(depth)
        tok = prompt[0]
        generated = []
        t0 = time.perf_counter()
        for _ in range(tg):
            logits = rt.eval([tok])
            tok = int(np.argmax(logits))
            generated.append(tok)
        dt = time.perf_counter() - t0
        finite = finite and bool(np.isfinite(logits).all())
        return dt, rt.n_past() - depth, generated

    # warm-up: page the weights in, let the thread pools and allocators settle
    if pp:
        rt.reset(); rt.eval(prompt[:min(pp, 32)])
    if tg:
        rt.reset(); rt.eval(prompt[:1]); rt.eval(prompt[1:2])
    rt.reset()
    for i in range(0, depth, batch):
        rt.eval(context[i:i + batch])
    out = {"depth": depth}
    if pp:
        res = [one_pp() for _ in range(reps)]
        out["pp"] = {"n_tokens": [n for _, n in res], "seconds": [s for s, _ in res]}
    if tg:
        res = [one_tg() for _ in range(reps)]
        out["tg"] = {"n_tokens": [n for _, n, _ in res], "seconds": [s for s, _, _ in res],
                     "tokens_first_rep": res[0][2][:16]}
        out["stats_after_tg"] = {k: v for k, v in rt.stats().items()
                                 if isinstance(v, (int, float, str))}
        if "placement" in rt.stats():  # ours: where the weights are, per device
            out["placement"] = rt.stats()["placement"]
    out["logits_finite"] = finite
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--runtime", choices=["ours", "llama.cpp"], required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pp", type=int, default=512)
    ap.add_argument("--tg", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--sparsity", default=None)
    ap.add_argument("--extra-bufts", action="store_true")
    ap.add_argument("--depth", type=int, default=0)
    ap.add_argument("--cache-type", default="f16", choices=sorted(GGML_TYPES))
    ap.add_argument("--flash-attn", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--vram-budget", type=float, default=None)
    a = ap.parse_args(argv)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    args = (a.model, a.depth + a.pp + a.tg + 16, a.threads, a.batch, a.sparsity, a.extra_bufts, a.cache_type,
            a.flash_attn)
    rt = Ours(*args, a.device, a.vram_budget) if a.runtime == "ours" else LlamaCpp(*args)
    load_s = time.perf_counter() - t0
    res = run(rt, a.pp, a.tg, a.reps, a.depth, a.batch)
    res.update(runtime=rt.name, version=rt.version, strategy=rt.strategy, threads=a.threads,
               cache_type=a.cache_type, flash_attn=a.flash_attn,
               load_seconds=load_s, loadavg_before=load, python=sys.executable)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
