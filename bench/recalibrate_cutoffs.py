"""Re-chooses a calibrated file's predictor cut-offs for new recall targets without retraining: the
same windows of the same calibration text as `prosparse-calibrate --text TEXT --tokens N`, and the
same step as its `--policy-rounds` (calibrate._cutoffs_on_policy: cut-offs chosen on the file's own
predict runs over the tuning windows, the test windows measured by the runtime's counters). Writes a
copy; prints the per-layer table. The numbers of docs/calibrate.md's per-layer targets come from it.

    python bench/recalibrate_cutoffs.py IN.gguf OUT.gguf TEXT N_TOKENS CALIBRATE_REPORT.json RECALL
    (RECALL: one target or one per layer, comma-separated)
"""
import json
import shutil
import sys
from pathlib import Path
from prosparse_convert.calibrate import text as T
from prosparse_convert.calibrate.calibrate import Options, Report, _cutoffs_on_policy, _open_model
src, dst, text, tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
rep = json.load(open(sys.argv[5]))
shutil.copyfile(src, dst)
o = Options(text=[Path(text)], tokens=tokens, recall=([float(v) for v in sys.argv[6].split(",")] if "," in sys.argv[6] else float(sys.argv[6])) if len(sys.argv) > 6 else 0.95)
m = _open_model(src, o.ctx, 0)
bos = m.bos if m.add_bos_default and m.bos >= 0 else None
win = T.make_windows(lambda s: m.tokenize(s, False, False), T.read_texts(o.text), bos, o.ctx, o.tokens)
act_t = float(m.hparams["activation_threshold"]); del m
r = Report(activation="fatrelu", layers=rep["layers"], overall=rep["overall"])
_cutoffs_on_policy(Path(dst), win, "fatrelu", act_t, o, r)
print(r.table()); print(r.overall)
