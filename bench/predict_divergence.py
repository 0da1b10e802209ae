"""Where predict's hidden state leaves exact's in one window, and which missed neurons did it.

    python bench/predict_divergence.py FILE.gguf TEXT WINDOW [--ctx 256] [--tokens 2048]

Runs the window under `exact` and under `predict` with capture on (the residual stream entering
each FFN and the full gate on it), and prints:
- per layer, the relative distance ||x_predict - x_exact|| / ||x_exact|| of the FFN input at each
  position: the first (layer, position) where it exceeds 0.05, 0.2 and 1.0;
- per layer and position of predict's run, the FFN output error that predict's misses made
  (||sum over missed active neurons of h_i down_i||, relative to ||x||), the largest ones, and the
  neuron that carries most of each (its contribution |h_i| ||down_i||, the rank of that
  contribution among the token's active neurons, its predictor logit against the cut-off, and how
  often it fires).
"""
import argparse
import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from prosparse_convert import names as N
from prosparse_convert.activations import active
from prosparse_convert.calibrate import text as T, predictor
from prosparse_convert.calibrate.calibrate import _stored_predictors
from prosparse_rt import _core

ap = argparse.ArgumentParser()
ap.add_argument("file"); ap.add_argument("text"); ap.add_argument("window", type=int)
ap.add_argument("--ctx", type=int, default=256); ap.add_argument("--tokens", type=int, default=2048)
ap.add_argument("--top", type=int, default=12)
a = ap.parse_args()

ms = {s: _core.Model(a.file, n_ctx=a.ctx, n_threads=1, sparsity=s) for s in ("exact", "predict")}
m = ms["exact"]
hp = m.hparams
L, E, F, eps = hp["n_layer"], hp["n_embd"], hp["n_ff"], float(hp.get("rms_eps", hp.get("norm_eps", 1e-5)))
act_kind, act_t = hp["activation"], float(hp["activation_threshold"])
bos = m.bos if m.add_bos_default and m.bos >= 0 else None
win = T.make_windows(lambda s: m.tokenize(s, False, False), open(a.text).read(), bos, a.ctx, a.tokens,
                     held_out_every=0).calib
w = win[a.window]
cap = {}
for s, mm in ms.items():
    mm.set_capture(True); mm.rewind(0); mm.eval(w)
    cap[s] = [tuple(np.array(v) for v in mm.captured(l)) for l in range(L)]
    mm.set_capture(False)

r = GGUFReader(a.file)
tens = {t.name: t for t in r.tensors}
def deq(name):
    t = tens[name]
    return np.asarray(dequantize(np.asarray(t.data), t.tensor_type), np.float32).reshape(
        tuple(int(d) for d in reversed(t.shape)))
cut = [float(v) for v in r.fields[N.PS_PREDICTOR_LAYER_THRESHOLDS].contents()]
fc, types, on = _stored_predictors(a.file)
freq = [deq(N.blk(N.FFN_ACT_FREQ, l)) if N.blk(N.FFN_ACT_FREQ, l) in tens else np.full(F, np.nan) for l in range(L)]

print(f"window {a.window}: {len(w)} tokens; text: {m.detokenize(w[:40], False)!r}...")
for th in (0.05, 0.2, 1.0):
    first = None
    for l in range(L):
        xe, xp = cap["exact"][l][0], cap["predict"][l][0]
        rel = np.linalg.norm(xp - xe, axis=1) / np.linalg.norm(xe, axis=1)
        pos = np.nonzero(rel > th)[0]
        if len(pos) and (first is None or pos[0] < first[1]):
            first = (l, int(pos[0]), float(rel[pos[0]]))
            break
    print(f"first layer with a position whose FFN input is > {th} away: {first}")
print("per layer: max relative distance of the FFN input over positions (position)")
print(" ".join(f"{l}:{np.max(d):.2f}@{int(np.argmax(d))}" for l in range(L)
               for d in [np.linalg.norm(cap['predict'][l][0] - cap['exact'][l][0], axis=1)
                         / np.linalg.norm(cap['exact'][l][0], axis=1)]))

rows = []
for l in range(L):
    x, g = cap["predict"][l]
    nw = deq(N.blk(N.FFN_NORM, l))
    up = deq(N.blk(N.FFN_UP, l))  # [F, E]
    dn = deq(N.blk(N.FFN_DOWN_T, l)) if N.blk(N.FFN_DOWN_T, l) in tens else deq(N.blk(N.FFN_DOWN, l)).T  # [F, E]
    dnorm = np.linalg.norm(dn, axis=1)
    xn = x / np.sqrt((x * x).mean(1, keepdims=True) + eps) * nw
    act = np.where(active(act_kind, g, act_t), g, 0.0) * (xn @ up.T)  # h [n, F]
    lg = predictor.runtime_logits(fc[l][0], fc[l][1], x, *types[l])
    pred = lg > np.float32(cut[l]); pred[:, :on[l]] = True
    missed = (act != 0) & ~pred
    err = (np.where(missed, act, 0.0)) @ dn  # [n, E]
    rel = np.linalg.norm(err, axis=1) / np.linalg.norm(x, axis=1)
    contrib = np.abs(act) * dnorm
    for t in range(len(w)):
        if missed[t].any():
            i = int(np.argmax(np.where(missed[t], contrib[t], -1)))
            rank = int((contrib[t] > contrib[t, i]).sum())
            rows.append((float(rel[t]), l, t, i, float(contrib[t, i]), rank, float(np.median(contrib[t][act[t] != 0])),
                         float(lg[t, i]), cut[l], int(missed[t].sum()), int((act[t] != 0).sum()), float(freq[l][i])))
rows.sort(reverse=True)
print(f"largest FFN output errors from misses (predict's run): rel_err layer pos | neuron contribution "
      f"rank_among_active median_active_contribution logit cutoff freq | n_missed n_active | token")
for row in rows[:a.top]:
    rel, l, t, i, c, rank, med, lgv, cu, nm, na, fr = row
    print(f"{rel:.3f} L{l} pos {t} | n{i} {c:.2f} #{rank} med {med:.3f} logit {lgv:.2f} cut {cu:.2f} freq {fr:.4f} | "
          f"{nm}/{na} | {m.token_to_piece(w[t], False)!r}")
