"""Per window of 256 tokens: mean log-loss of exact and predict on the same text, and the tokens
where predict loses most (is predict's cost spread evenly or one event?).

    python bench/predict_per_window.py FILE.gguf TEXT
"""
import sys, numpy as np
from prosparse_convert.calibrate import evaluate, text as T
from prosparse_rt import _core
f, txt = sys.argv[1], sys.argv[2]
ms = {s: _core.Model(f, n_ctx=256, n_threads=2, sparsity=s) for s in ("exact", "predict")}
m = ms["exact"]; bos = m.bos if m.add_bos_default and m.bos >= 0 else None
win = T.make_windows(lambda s: m.tokenize(s, False, False), open(txt).read(), bos, 256, 2048, held_out_every=0).calib
for i, w in enumerate(win):
    tgt = np.asarray(w[1:]); r = {}
    for k, mm in ms.items():
        mm.rewind(0); lp = evaluate._log_softmax(mm.eval(w, all_logits=True)); r[k] = -lp[np.arange(len(tgt)), tgt]
    d = r["predict"] - r["exact"]
    top = np.argsort(-d)[:3]
    print(f"window {i}: exact nll {r['exact'].mean():.3f} predict {r['predict'].mean():.3f} diff {d.mean():+.3f}; top token diffs {[(int(t), round(float(d[t]),2)) for t in top]}", flush=True)
