"""A copy of a calibrated file (frequency order, predictors) in which the given neurons are always
computed under predict: per layer they move to the front of the neuron order (rows of ffn_gate,
ffn_up, ffn_down_t, fc2 and ffn_act_freq together; quantized rows are moved, not re-quantized) and
the always-on prefix grows by their number. Cut-offs and the other neurons are unchanged.

    python bench/pin_neurons.py SRC.gguf OUT.gguf LAYER:NEURON[,NEURON...] [LAYER:...]
"""
import shutil
import sys

import numpy as np
from gguf import GGUFReader

from prosparse_convert import names as N

src, out, specs = sys.argv[1], sys.argv[2], sys.argv[3:]
pins = {}
for s in specs:
    l, ns = s.split(":")
    pins[int(l)] = [int(n) for n in ns.split(",")]
shutil.copyfile(src, out)
r = GGUFReader(out, "r+")
tens = {t.name: t for t in r.tensors}
f = r.fields[N.PS_PREDICTOR_ALWAYS_ON]
on = [int(v) for v in f.contents()]
for l, ps in pins.items():
    F = tens[N.blk(N.FFN_GATE, l)].data.shape[0]
    moved = [p for p in ps if p >= on[l]]
    perm = np.array(moved + [i for i in range(F) if i not in set(moved)])
    for k in (N.FFN_GATE, N.FFN_UP, N.FFN_DOWN_T, N.FC2, N.FFN_ACT_FREQ):
        d = tens[N.blk(k, l)].data
        d[...] = np.array(d)[perm]
    f.parts[f.data[l]][...] = np.int32(on[l] + len(moved))
    print(f"layer {l}: neurons {moved} to the front, always_on {on[l]} -> {on[l] + len(moved)}")
r.data.flush()
