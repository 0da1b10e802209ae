"""What predict costs at higher recall targets, without retraining: the calibrated file's predictors
(as stored), cut-offs re-chosen per layer on tuning text for each target (cutoffs.choose, the
file's always-on prefix kept), written into a copy of the file, then exact and predict on
evaluation text (perplexity, KL and top-1 against exact, the runtime's recall and sparsities).

    python bench/recall_sweep.py FILE.gguf TUNE_TEXT EVAL_TEXT --targets 0.95,0.97,0.98,0.99
        [--tune-skip-chars N] [--tune-tokens 4096] [--eval-tokens 2048] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

import numpy as np
from gguf import GGUFReader

from prosparse_convert import names as N
from prosparse_convert.activations import active
from prosparse_convert.calibrate import cutoffs, evaluate, predictor, text as text_mod
from prosparse_convert.calibrate.write import patch_predictor_cutoffs
from prosparse_rt import _core

from predict_diag import read_predictors  # bench/ is the script's folder, first on sys.path


def windows(model, path, skip, tokens, ctx):
    text = open(path, errors="replace").read()[skip:]
    bos = model.bos if model.add_bos_default and model.bos >= 0 else None
    return text_mod.make_windows(lambda s: model.tokenize(s, False, False), text, bos, ctx, tokens,
                                 held_out_every=0).calib


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("file")
    ap.add_argument("tune_text")
    ap.add_argument("eval_text")
    ap.add_argument("--targets", default="0.95,0.97,0.98,0.99")
    ap.add_argument("--tune-skip-chars", type=int, default=0)
    ap.add_argument("--tune-tokens", type=int, default=4096)
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    a = ap.parse_args()
    r = GGUFReader(a.file)
    fields = r.fields
    dense = _core.Model(a.file, n_ctx=a.ctx, n_threads=a.threads, sparsity="dense")
    hp = dense.hparams
    L, F = hp["n_layer"], hp["n_ff"]
    act, act_t = hp["activation"], float(hp["activation_threshold"])
    on = [int(v) for v in fields[N.PS_PREDICTOR_ALWAYS_ON].contents()] if N.PS_PREDICTOR_ALWAYS_ON in fields else [0] * L
    tens = {t.name: t for t in r.tensors}
    types = [[tens[name.format(i=l)].tensor_type.name.lower() for name in (N.FC1, N.FC2)] for l in range(L)]
    fc = read_predictors(tens, L)
    del r, tens, fields
    tune = windows(dense, a.tune_text, a.tune_skip_chars, a.tune_tokens, a.ctx)
    lg = [[] for _ in range(L)]
    ys = [[] for _ in range(L)]
    dense.set_capture(True)
    for w in tune:
        dense.rewind(0)
        dense.eval(w)
        for l in range(L):
            x, g = dense.captured(l)
            lg[l].append(predictor.runtime_logits(fc[l][0], fc[l][1], x, *types[l]))
            ys[l].append(active(act, g, act_t))
    dense.set_capture(False)
    ev = windows(dense, a.eval_text, 0, a.eval_tokens, a.ctx)
    del dense
    order = np.arange(F)
    out = []
    tmp = a.file + f".sweep-{os.getpid()}"
    try:
        for target in [float(t) for t in a.targets.split(",")]:
            cut = []
            for l in range(L):
                lgl, yl = np.concatenate(lg[l]), np.concatenate(ys[l])
                ch = cutoffs.choose(lgl, yl, target, order if on[l] else None, [on[l]])
                cut.append(ch.cutoff)
            shutil.copyfile(a.file, tmp)
            patch_predictor_cutoffs(tmp, cut)
            models = {s: _core.Model(tmp, n_ctx=a.ctx, n_threads=a.threads, sparsity=s, diag_recall=s == "predict")
                      for s in ("exact", "predict")}
            res = evaluate.compare(models, ev, "exact")
            rows, pooled = evaluate.predict_stats(models["predict"])
            del models
            row = {"target": target, "exact_ppl": res["exact"]["perplexity"], "predict_ppl": res["predict"]["perplexity"],
                   "kl": res["predict"]["kl"], "top1": res["predict"]["top1"], **pooled,
                   "layer_recall": [x["recall"] for x in rows], "cutoffs": cut}
            out.append(row)
            print(f"target {target}: eval recall {row['recall']:.4f}, predicted sparsity {row['predicted_sparsity']:.4f} "
                  f"(true {row['actual_sparsity']:.4f}), exact ppl {row['exact_ppl']:.3f}, predict ppl "
                  f"{row['predict_ppl']:.3f} ({100 * (row['predict_ppl'] / row['exact_ppl'] - 1):+.1f}%), "
                  f"KL {row['kl']:.4f}, top-1 {row['top1']:.3f}", flush=True)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    if a.json:
        open(a.json, "w").write(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
