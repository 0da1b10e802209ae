"""Where predict's perplexity cost comes from: the calibrated file's cut-offs kept in one group of
layers and every other layer computing every neuron (cut-off -1e30), perplexity of each against
exact on evaluation text (2048 tokens, windows of 256).

    python bench/predict_cost_by_layer.py FILE.gguf EVAL_TEXT OUT.json
"""
import sys, shutil, os, json, numpy as np
from gguf import GGUFReader
from prosparse_convert.calibrate import evaluate, text as T
from prosparse_convert.calibrate.write import patch_predictor_cutoffs
from prosparse_rt import _core
src, evtext = sys.argv[1], sys.argv[2]
cut = [float(v) for v in GGUFReader(src).fields["prosparse.predictor.layer_thresholds"].contents()]
m = _core.Model(src, n_ctx=256, n_threads=2, sparsity="exact")
bos = m.bos if m.add_bos_default and m.bos >= 0 else None
win = T.make_windows(lambda s: m.tokenize(s, False, False), open(evtext).read(), bos, 256, 2048, held_out_every=0).calib
ex = evaluate.perplexity(m, win); print("exact", ex, flush=True)
del m
out = {"exact": ex}
for name, layers in (("0-9", range(0, 10)), ("10-19", range(10, 20)), ("20-29", range(20, 30)), ("0-2", range(0, 3))):
    tmp = f"/tmp/grp-{os.getpid()}.gguf"
    shutil.copyfile(src, tmp)
    patch_predictor_cutoffs(tmp, [c if l in layers else -1e30 for l, c in enumerate(cut)])
    p = _core.Model(tmp, n_ctx=256, n_threads=2, sparsity="predict")
    pp = evaluate.perplexity(p, win); del p; os.unlink(tmp)
    out[name] = pp
    print(f"predict only in layers {name}: ppl {pp:.3f} ({100*(pp/ex-1):+.1f}%)", flush=True)
json.dump(out, open(sys.argv[3], "w"), indent=1)
