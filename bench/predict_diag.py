"""Does the runtime's predict path do what calibration measured, and where do predict's misses
cost? For a calibrated ReLU/FATReLU file and a text:
- simulated: the file's stored predictors (dequantized), cut-offs and always-on prefix applied in
  numpy to the residual stream the dense model captures (teacher-forced: every layer sees the dense
  model's input), as calibration measures recall;
- runtime: predict's own counters (diag_recall), where each layer sees the input predict's earlier
  layers made;
- perplexity of exact and predict, and the share of the activation mass (|act|) the misses carry.

    python bench/predict_diag.py FILE.gguf TEXT [--tokens 2048] [--skip-tokens 0]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from gguf.quants import dequantize

from prosparse_convert import names as N
from prosparse_convert.activations import active
from prosparse_convert.calibrate import evaluate, text as text_mod
from prosparse_convert.gguf_file import open_gguf_file
from prosparse_rt import _core


def read_predictors(tens: dict, n_layer: int) -> list:
    """[[fc1, fc2] per layer] as float32 arrays ({out, in}) from a GGUF reader's tensors by name."""
    fc = []
    for l in range(n_layer):
        w = []
        for name in (N.FC1, N.FC2):
            t = tens[name.format(i=l)]
            shape = tuple(int(d) for d in reversed(t.shape))
            w.append(np.asarray(dequantize(np.asarray(t.data), t.tensor_type), np.float32).reshape(shape))
        fc.append(w)
    return fc


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("file")
    ap.add_argument("text")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--skip-chars", type=int, default=0, help="start this many characters into the text")
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    a = ap.parse_args()
    r = open_gguf_file(a.file)
    meta = {k: f.contents() for k, f in r.fields.items() if k.startswith("prosparse")}
    tens = {t.name: t for t in r.tensors}
    dense = _core.Model(a.file, n_ctx=a.ctx, n_threads=a.threads, sparsity="dense")
    hp = dense.hparams
    L, F = hp["n_layer"], hp["n_ff"]
    act, act_t = hp["activation"], float(hp["activation_threshold"])
    thr = list(meta[N.PS_PREDICTOR_LAYER_THRESHOLDS])
    on = list(meta.get(N.PS_PREDICTOR_ALWAYS_ON, [0] * L))
    fc = read_predictors(tens, L)
    text = open(a.text, errors="replace").read()[a.skip_chars:]
    bos = dense.bos if dense.add_bos_default and dense.bos >= 0 else None
    win = text_mod.make_windows(lambda s: dense.tokenize(s, False, False), text, bos, a.ctx, a.tokens,
                                held_out_every=0).calib
    hit = np.zeros(L); tot = np.zeros(L); comp = np.zeros(L); n = 0
    mass_hit = np.zeros(L); mass = np.zeros(L)
    dense.set_capture(True)
    for w in win:
        dense.rewind(0)
        dense.eval(w)
        for l in range(L):
            x, g = dense.captured(l)
            lg = np.maximum(x @ fc[l][0].T, 0) @ fc[l][1].T
            pred = lg > np.float32(thr[l])
            pred[:, :on[l]] = True
            y = active(act, g, act_t)
            hit[l] += (pred & y).sum(); tot[l] += y.sum(); comp[l] += pred.sum()
            av = np.abs(np.where(y, g, 0))
            mass[l] += av.sum(); mass_hit[l] += (av * pred).sum()
        n += len(w)
    dense.set_capture(False)
    del dense
    models = {s: _core.Model(a.file, n_ctx=a.ctx, n_threads=a.threads, sparsity=s, diag_recall=s == "predict")
              for s in ("exact", "predict")}
    res = evaluate.compare(models, win, "exact")
    rows, pooled = evaluate.predict_stats(models["predict"])
    out = {"tokens": n, "exact_ppl": res["exact"]["perplexity"], "predict_ppl": res["predict"]["perplexity"],
           "kl": res["predict"]["kl"], "top1": res["predict"]["top1"],
           "sim_recall": float(hit.sum() / tot.sum()), "sim_pred_sparsity": float(1 - comp.sum() / (n * F * L)),
           "sim_mass_recall": float(mass_hit.sum() / mass.sum()),
           "rt_recall": pooled["recall"], "rt_pred_sparsity": pooled["predicted_sparsity"],
           "true_sparsity": float(1 - tot.sum() / (n * F * L)),
           "layers": [{"sim_recall": float(hit[l] / tot[l]), "rt_recall": rows[l]["recall"],
                       "sim_pred_sparsity": float(1 - comp[l] / (n * F)),
                       "rt_pred_sparsity": rows[l]["predicted_sparsity"],
                       "sim_mass_recall": float(mass_hit[l] / mass[l])} for l in range(L)]}
    print(f"tokens {n}: exact ppl {out['exact_ppl']:.3f}, predict ppl {out['predict_ppl']:.3f} "
          f"({100 * (out['predict_ppl'] / out['exact_ppl'] - 1):+.1f}%), KL {out['kl']:.4f}, top-1 {out['top1']:.3f}")
    print(f"recall simulated (teacher-forced) {out['sim_recall']:.4f} (mass {out['sim_mass_recall']:.4f}), "
          f"runtime {out['rt_recall']:.4f}; predicted sparsity sim {out['sim_pred_sparsity']:.4f} "
          f"rt {out['rt_pred_sparsity']:.4f}; true {out['true_sparsity']:.4f}")
    print("| layer | sim recall | rt recall | sim mass recall | sim pred sp | rt pred sp |\n|---|---|---|---|---|---|")
    for l, row in enumerate(out["layers"]):
        print(f"| {l} | {row['sim_recall']:.4f} | {row['rt_recall']:.4f} | {row['sim_mass_recall']:.4f} | "
              f"{row['sim_pred_sparsity']:.4f} | {row['rt_pred_sparsity']:.4f} |")
    if a.json:
        open(a.json, "w").write(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
