"""predict against exact, window by window, on many windows: how often does predict's run leave
exact's (a window whose mean log-loss rises by more than 0.1 nats/token), and what does it cost?

    python bench/predict_windows_many.py TEXT N_WINDOWS OUT.json REF.gguf [OTHER.gguf ...]

exact is run on REF.gguf (every active neuron: the same function in each file, the neuron order
aside); predict on every file given. Per file: per-window mean log-loss difference (nats/token),
its quantiles, the windows above 0.1 nats, perplexity of exact and predict over all windows, and
predicted sparsity (the runtime's counters, diag_recall) with recall.
"""
import json
import sys

import numpy as np

from prosparse_convert.calibrate import evaluate, text as T
from prosparse_rt import _core

txt, nwin, out, files = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
ex = _core.Model(files[0], n_ctx=256, n_threads=1, sparsity="exact")
bos = ex.bos if ex.add_bos_default and ex.bos >= 0 else None
win = T.make_windows(lambda s: ex.tokenize(s, False, False), open(txt).read(), bos, 256, 256 * nwin,
                     held_out_every=0).calib[:nwin]


def nll(m, w):
    m.rewind(0)
    tgt = np.asarray(w[1:])
    lp = evaluate._log_softmax(m.eval(w, all_logits=True)[:-1])
    return -lp[np.arange(len(tgt)), tgt]


ref = [nll(ex, w) for w in win]
del ex
res = {"text": txt, "windows": len(win), "exact_ppl": float(np.exp(np.concatenate(ref).mean())), "files": {}}
print(f"{len(win)} windows; exact ppl {res['exact_ppl']:.2f}", flush=True)
for f in files:
    m = _core.Model(f, n_ctx=256, n_threads=1, sparsity="predict", diag_recall=True)
    d, allp = [], []
    for w, r in zip(win, ref):
        p = nll(m, w)
        allp.append(p)
        d.append(float((p - r).mean()))
    rows, pooled = evaluate.predict_stats(m)
    d = np.asarray(d)
    ppl = float(np.exp(np.concatenate(allp).mean()))
    r = {"per_window": d.tolist(), "quantiles": {q: float(np.quantile(d, q)) for q in (0.1, 0.5, 0.9, 1.0)},
         "diverged": [int(i) for i in np.nonzero(d > 0.1)[0]], "predict_ppl": ppl,
         "vs_exact": ppl / res["exact_ppl"] - 1, "pooled": pooled}
    res["files"][f] = r
    print(f"{f}: predict ppl {ppl:.2f} ({100 * r['vs_exact']:+.2f}%), windows > 0.1 nats: {len(r['diverged'])}/{len(d)} "
          f"{[(i, round(float(d[i]), 2)) for i in r['diverged']]}; per-window diff quantiles 10/50/90/max "
          f"{[round(v, 3) for v in r['quantiles'].values()]}; pooled {pooled}", flush=True)
    del m
json.dump(res, open(out, "w"), indent=1)
