"""prosparse-calibrate's pipeline: profile the model over calibration text, train predictors (ReLU
and FATReLU models) or allocate per-layer thresholds (SiLU models), write the new GGUF, and measure
what the sparsity costs."""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

from .. import names as N
from .. import quant
from ..errors import ConvertError
from . import cutoffs, evaluate, predictor, profile as prof_mod, text as text_mod, thresholds as thr_mod
from .write import Additions, InputFile, write

log = logging.getLogger(__name__)

MIN_CALIB_TOKENS = 64


@dataclass
class Options:
    text: Sequence[Path] = ()             # calibration text files; none: the model writes its own
    tokens: int = 8192                    # calibration tokens
    ctx: int = 256                        # tokens per window
    target_sparsity: Optional[float] = None  # SiLU: mean fraction of FFN neurons zeroed
    allocation: str = "greedy"            # greedy | uniform
    probe_tokens: int = 256               # tokens on which layer sensitivities are measured
    predictors: Optional[bool] = None     # None: yes for relu/fatrelu models
    rank: Union[None, int, Sequence[int]] = None  # None: predictor.default_rank(n_embd)
    epochs: int = 10
    pos_weight: Optional[float] = None
    recall: Union[float, Sequence[float]] = 0.95  # predictors: recall target on the tuning windows (or one per layer)
    always_on: str = "auto"               # auto (chosen on the tuning windows, frequency order) | none
    pin_first: float = 0.01               # sink neurons always on where at most this fraction of a layer (0: off)
    policy_rounds: int = 2                # cut-offs re-chosen on the written file's own predict runs
    predictor_type: str = "q8_0"
    neuron_order: str = "original"
    down_type: str = "auto"               # ffn_down_t made from ffn_down: auto | f16 | q8_0
    max_samples: int = 20000              # reservoir slots (token positions)
    max_memory: int = 1 << 30             # bytes the reservoir may take
    eval_text: Optional[Path] = None
    eval_tokens: int = 4096
    n_threads: int = 0
    seed: int = 0
    progress: bool = True


@dataclass
class Report:
    activation: str
    n_calib_tokens: int = 0
    n_held_out_tokens: int = 0
    layers: List[Dict[str, float]] = field(default_factory=list)
    mean: Dict[str, float] = field(default_factory=dict)
    allocation: Optional[str] = None
    allocation_kl: Dict[str, float] = field(default_factory=dict)
    down_type: Optional[str] = None
    down_check: Dict[str, float] = field(default_factory=dict)
    eval: List[Dict[str, object]] = field(default_factory=list)
    eval_layers: List[Dict[str, float]] = field(default_factory=list)
    overall: Dict[str, float] = field(default_factory=dict)   # predictors: pooled over layers (test split)
    n_tune_tokens: int = 0
    n_test_tokens: int = 0
    seconds: float = 0.0

    def table(self) -> str:
        if not self.layers:
            return ""
        keys = list(self.layers[0])
        lines = ["| layer | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
        for i, row in enumerate(self.layers):
            lines.append(f"| {i} | " + " | ".join(fmt(row[k]) for k in keys) + " |")
        lines.append("| mean | " + " | ".join(fmt(self.mean.get(k, float("nan"))) for k in keys) + " |")
        return "\n".join(lines)


def _check(o: Options) -> None:
    if o.target_sparsity is not None and not (0.0 < o.target_sparsity < thr_mod.MAX_LEVEL):
        raise ConvertError(f"--target-sparsity must be in (0, {thr_mod.MAX_LEVEL}), got {o.target_sparsity}")
    if o.allocation not in ("greedy", "uniform"):
        raise ConvertError(f"--allocation must be greedy or uniform, got {o.allocation!r}")
    if o.tokens < MIN_CALIB_TOKENS:
        raise ConvertError(f"--tokens must be at least {MIN_CALIB_TOKENS}, got {o.tokens}")
    if o.epochs < 1:
        raise ConvertError(f"--epochs must be >= 1, got {o.epochs}")
    if o.down_type not in ("auto", "f16", "q8_0"):
        raise ConvertError(f"--down-type must be auto, f16 or q8_0, got {o.down_type!r}")
    if o.predictor_type not in ("f32", "f16", "q8_0", "q4_0"):
        raise ConvertError(f"--predictor-type must be f32, f16, q8_0 or q4_0, got {o.predictor_type!r}")
    for r in ([o.recall] if isinstance(o.recall, (int, float)) else list(o.recall)):
        if not 0.0 < r < 1.0:
            raise ConvertError(f"--recall must be in (0, 1), got {r}")
    if o.policy_rounds < 0:
        raise ConvertError(f"--policy-rounds must be >= 0, got {o.policy_rounds}")
    if not (0.0 <= o.pin_first <= 1.0):
        raise ConvertError(f"--pin-first must be a fraction in [0, 1] (0: off), got {o.pin_first}")
    if o.always_on not in ("auto", "none"):
        raise ConvertError(f"--always-on must be auto or none, got {o.always_on!r}")
    if o.neuron_order not in ("original", "frequency"):
        raise ConvertError(f"--neuron-order must be original or frequency, got {o.neuron_order!r}")


def _open_model(path, ctx: int, n_threads: int):
    from prosparse_rt import _core

    try:
        return _core.Model(str(path), n_ctx=ctx, n_threads=n_threads, sparsity="dense")
    except ValueError as e:
        raise ConvertError(str(e)) from None


def _roundtrip(a: np.ndarray, type_name: str) -> np.ndarray:
    """The weights the runtime will see once stored at type_name."""
    from gguf.quants import dequantize

    qt = quant.tensor_type(a.shape, quant.outtype(type_name))
    return np.asarray(dequantize(quant.encode(a, qt), qt), np.float32).reshape(a.shape)


def _recalls(o: Options, n_layer: int) -> List[float]:
    if isinstance(o.recall, (int, float)):
        return [float(o.recall)] * n_layer
    r = [float(v) for v in o.recall]
    if len(r) != n_layer:
        raise ConvertError(f"--recall lists {len(r)} targets for {n_layer} layers")
    return r


def _ranks(o: Options, n_layer: int, n_embd: int) -> List[int]:
    if o.rank is None:
        return [predictor.default_rank(n_embd)] * n_layer
    if isinstance(o.rank, int):
        return [o.rank] * n_layer
    r = list(o.rank)
    if len(r) != n_layer:
        raise ConvertError(f"--rank lists {len(r)} ranks for {n_layer} layers")
    return r


def calibrate(model_path, out_path, options: Optional[Options] = None, **kw) -> Report:
    o = options or Options(**kw)
    _check(o)
    t_start = time.perf_counter()
    model_path, out_path = Path(model_path), Path(out_path)
    if not model_path.is_file():
        raise ConvertError(f"input model {model_path} does not exist or is not a file")
    if out_path.resolve() == model_path.resolve():
        raise ConvertError("the output must be a new file, not the input")
    inp = InputFile(model_path)
    model = _open_model(model_path, o.ctx, o.n_threads)
    hp = model.hparams
    L, E, F = hp["n_layer"], hp["n_embd"], hp["n_ff"]
    act, act_t = hp["activation"], float(hp["activation_threshold"])
    sparse = act in N.SPARSE_ACTIVATIONS
    want_pred = sparse if o.predictors is None else o.predictors
    if want_pred and not sparse:
        raise ConvertError(f"predictors need a sparse activation (relu or fatrelu); {model_path.name} "
                           f"uses {act}. For SiLU models use --target-sparsity (thresholds, exact strategy)")
    if o.target_sparsity is not None and sparse:
        raise ConvertError(f"--target-sparsity sets SiLU thresholds; {model_path.name} is a {act} model "
                           f"(already sparse)")
    if not sparse and o.target_sparsity is None:
        raise ConvertError(f"{model_path.name} is a SiLU model: give --target-sparsity (e.g. 0.5) to "
                           f"calibrate per-layer thresholds")
    ranks = _ranks(o, L, E) if want_pred else []
    report = Report(activation=act)

    # ---- calibration text and windows
    if o.text:
        text = text_mod.read_texts(o.text)
    else:
        n_want = int(o.tokens * 1.3) + o.probe_tokens  # a fifth of the windows is held out
        text = text_mod.generate_text(str(model_path), n_want, seed=o.seed,
                                      n_threads=o.n_threads or None, progress=o.progress)
    bos = model.bos if model.add_bos_default and model.bos >= 0 else None
    tokenize = lambda s: model.tokenize(s, False, False)  # noqa: E731
    win = text_mod.make_windows(tokenize, text, bos, o.ctx, o.tokens)
    report.n_calib_tokens, report.n_held_out_tokens = win.n_calib_tokens, win.n_held_out_tokens
    report.n_tune_tokens, report.n_test_tokens = win.n_tune_tokens, win.n_test_tokens
    if win.n_calib_tokens < MIN_CALIB_TOKENS:
        raise ConvertError(f"the calibration text gives {win.n_calib_tokens} tokens; at least "
                           f"{MIN_CALIB_TOKENS} are needed")
    if want_pred:
        # fewer samples than a few per hidden unit only teaches the predictor this text
        need = max(512, 8 * max(ranks))
        if win.n_calib_tokens < need or not win.tune or not win.test:
            raise ConvertError(
                f"the calibration text gives {win.n_calib_tokens} calibration tokens and "
                f"{win.n_held_out_tokens} held-out tokens: too few to train rank-{max(ranks)} predictors "
                f"for {L} layers (need at least {need}, one window to choose the cut-offs on and one "
                f"to test on; give more text or a lower --rank)")
    if win.n_calib_tokens < o.tokens:
        log.warning("the calibration text gives %d tokens of the %d asked for", win.n_calib_tokens, o.tokens)

    # ---- profiling
    p = prof_mod.profile(model, win.calib, act, act_t, max_samples=o.max_samples, max_bytes=o.max_memory,
                         seed=o.seed, progress=o.progress)
    add = Additions(activation=act, act_threshold=act_t, predictor_type=o.predictor_type,
                    neuron_order=o.neuron_order, down_type="q8_0" if o.down_type == "auto" else o.down_type)
    if sparse:
        add.act_freq = p.freq()
        if want_pred:
            in_freq_order = o.neuron_order == "frequency" or inp.get(N.PS_NEURON_ORDER) == "frequency"
            _train_predictors(model, p, win, act, act_t, ranks, o, add, report, in_freq_order, pinned(p, o))
        else:
            report.layers = [{"sparsity": 1.0 - float(f.mean())} for f in add.act_freq]
    else:
        _silu_thresholds(model, p, win, o, add, report)
    if report.layers:
        report.mean = {k: float(np.mean([r[k] for r in report.layers])) for k in report.layers[0]}

    # ---- write, checking the down projection's type
    has_down = N.blk(N.FFN_DOWN, 0) in inp.tensors
    if has_down and o.down_type == "auto":
        # thresholds are cleared for the check, so the calibration windows are as good as held-out ones
        check = _take_tokens(win.held_out + win.calib, DOWN_CHECK_TOKENS)
        _write_choosing_down_type(inp, out_path, add, L, F, check, o, report)
    else:
        write(inp, out_path, add, L, F, progress=o.progress)
        report.down_type = add.down_type if has_down else None

    if want_pred and o.policy_rounds:
        _cutoffs_on_policy(out_path, win, act, act_t, o, report)

    if o.eval_text is not None:
        report.eval = evaluate_file(model_path, out_path, o.eval_text, ctx=o.ctx, max_tokens=o.eval_tokens,
                                    n_threads=o.n_threads, progress=o.progress, layers=report.eval_layers)
    report.seconds = time.perf_counter() - t_start
    return report


DOWN_Q8_0_MAX_CHANGE = 0.005  # docs/design.md "The down projection": Q8_0 only when perplexity moves < 0.5%
# On SmolLM2 the change is 0.5-0.8%, with a spread of 0.6-0.9% between 256-token windows: one
# window would decide by chance; 16 give a standard error of ~0.2%.
DOWN_CHECK_TOKENS = 4096


def _write_choosing_down_type(inp: InputFile, out_path: Path, add: Additions, L: int, F: int,
                              windows, o: Options, report: Report) -> None:
    """--down-type auto: writes the file with F16 and with Q8_0 ffn_down_t (made from the dequantized
    ffn_down) beside the output, measures both densely with the thresholds cleared, and keeps Q8_0 if
    perplexity moves by less than 0.5%. The reference is the F16 file, the input model unchanged and
    computed through the same kernel (axpy on float coefficients); the input file itself would not
    do: its ffn_down runs through the matmul on 8-bit quantized activations, a difference that is
    not the requantization's and that ffn_down_t removes whatever its type. The output appears only
    once chosen (renamed), and the candidates are removed whatever happens."""
    cand = {t: out_path.with_name(f"{out_path.name}.down-{t}-{os.getpid()}") for t in ("f16", "q8_0")}
    try:
        ppl = {}
        for t, path in cand.items():
            add.down_type = t
            write(inp, path, add, L, F, progress=o.progress)
            m = _open_model(path, o.ctx, o.n_threads)
            if add.activation == "silu":
                m.set_layer_thresholds([])
            ppl[t] = evaluate.perplexity(m, windows)
            del m
        change = ppl["q8_0"] / ppl["f16"] - 1.0
        add.down_type = "q8_0" if abs(change) < DOWN_Q8_0_MAX_CHANGE else "f16"
        if add.down_type == "f16":
            log.warning("ffn_down_t at Q8_0 moves perplexity by %.2f%% against F16: writing F16", 100 * change)
        os.replace(cand[add.down_type], out_path)
    finally:
        for path in cand.values():
            path.unlink(missing_ok=True)
    report.down_type = add.down_type
    report.down_check = {"f16_ppl": ppl["f16"], "q8_0_ppl": ppl["q8_0"], "rel_change": change,
                         "tokens": float(sum(len(w) for w in windows))}


SINK_FIRST_FREQ = 0.5   # fires on at least half of the windows' first tokens
SINK_CONTRAST = 10.0    # and at least 10x as often as on an average token


def pinned(p, o: Options) -> Optional[List[np.ndarray]]:
    """Per layer, the sink neurons: those firing on the first token of at least half of the
    calibration windows and at least 10x as often there as on an average token, most specific first;
    none in a layer that has more than o.pin_first of its neurons so (there the first token's FFN
    is dense-like and the predictor is left to it). None: off. On the sparsified SmolLM2 a missed
    sink neuron of layer 0 made predict's whole window diverge (docs/calibrate.md)."""
    if p.first_counts is None or not o.pin_first > 0:
        return None
    out = []
    for f0, f in zip(p.first_freq(), p.freq()):
        sel = np.nonzero((f0 >= SINK_FIRST_FREQ) & (f0 >= SINK_CONTRAST * f))[0]
        if len(sel) > o.pin_first * len(f):
            sel = sel[:0]
        out.append(sel[np.argsort(-(f0[sel] / np.maximum(f[sel], 1e-9)), kind="stable")].astype(np.int64))
    return out


def order_with_pins(freq: np.ndarray, pins: Optional[np.ndarray]) -> np.ndarray:
    """New position -> neuron: the pinned neurons first, then the rest hottest first (stable)."""
    hot = np.argsort(-np.asarray(freq), kind="stable")
    if pins is None or not len(pins):
        return hot
    return np.concatenate([np.asarray(pins, np.int64), hot[~np.isin(hot, pins)]])


def _train_predictors(model, p, win, act, act_t, ranks, o: Options, add: Additions, report: Report,
                      in_freq_order: bool, pins: Optional[List[np.ndarray]] = None) -> None:
    """Trains each layer's predictor on the calibration windows, chooses its cut-off (and always-on
    prefix) on the tuning windows to reach o.recall there, and reports its quality on the test
    windows, which neither saw (cutoffs.py). `pins`: per layer, neurons that are always computed
    (first in the order, inside the always-on prefix; frequency order only)."""
    from tqdm import tqdm

    L, F = model.hparams["n_layer"], model.hparams["n_ff"]

    def held(windows, desc, seed):
        return prof_mod.profile(model, windows, act, act_t, max_samples=max(256, o.max_samples // 4),
                                max_bytes=max(1 << 24, o.max_memory // 4), seed=seed, progress=o.progress,
                                desc=desc)

    tune, test = held(win.tune, "profiling tuning windows", o.seed + 1), held(win.test, "profiling test windows", o.seed + 2)
    # always-on neurons are a prefix of the output's order, so only a file in frequency order has them
    if pins is not None and o.neuron_order != "frequency":
        if any(len(q) for q in pins):
            log.warning("%d sink neurons (--pin-first) can be pinned only in frequency order (--neuron-order "
                        "frequency): not pinned", sum(len(q) for q in pins))
        pins = None
    n_pin = [len(q) for q in pins] if pins is not None else [0] * L
    orders = [order_with_pins(add.act_freq[l], pins[l] if pins is not None else None) for l in range(L)] \
        if o.neuron_order == "frequency" else [np.arange(F)] * L
    if pins is not None:
        add.neuron_perms = orders
        # pinned neurons run on every token under predict: the file stores them as hot as the layer's
        # hottest, so that its frequencies stay non-increasing (the runtime's GPU placement reads them
        # as a hot prefix, and refuses a file whose frequencies are not in order)
        add.act_freq = [f.copy() for f in add.act_freq]
        for f, q in zip(add.act_freq, pins):
            if len(q):
                f[q] = f.max()
    use_on = (o.always_on == "auto" and in_freq_order) or any(n_pin)
    recalls = _recalls(o, L)

    def fit(l: int):
        x, y = p.x[l, :p.n_samples].astype(np.float32), p.masks(l, F)
        fc1, fc2 = predictor.train(x, y, ranks[l], epochs=o.epochs, pos_weight=o.pos_weight, seed=o.seed + l)
        del x, y
        fc1q, fc2q = _roundtrip(fc1, o.predictor_type), _roundtrip(fc2, o.predictor_type)
        if o.always_on == "auto" and in_freq_order:
            # the pinned neurons, then prefixes of the rest (hottest first)
            cand = [n_pin[l] + k for k in cutoffs.prefix_candidates(add.act_freq[l], orders[l][n_pin[l]:])]
        else:
            cand = [n_pin[l]]
        t1, t2 = (quant.tensor_type(w.shape, quant.outtype(o.predictor_type)).name.lower() for w in (fc1, fc2))
        lg = lambda x: predictor.runtime_logits(fc1q, fc2q, x.astype(np.float32), t1, t2)  # noqa: E731
        ch = cutoffs.choose(lg(tune.x[l, :tune.n_samples]),
                            tune.masks(l, F), recalls[l], orders[l] if use_on else None, cand)
        q = cutoffs.quality(lg(test.x[l, :test.n_samples]),
                            test.masks(l, F), ch.cutoff, ch.always_on, orders[l])
        return (fc1, fc2), ch, q

    # Layers are independent: one per worker thread (numpy releases the GIL in its loops and matrix
    # products, so the workers share the cores); each layer is seeded by its index, so the result does
    # not depend on the number of workers. BLAS stays single-threaded meanwhile: its own threads on
    # these small products made a training step 12x slower on a loaded 2-core host (137 ms, 11 ms).
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"), _workers(o.n_threads) as pool:
        done = list(tqdm(pool.map(fit, range(L)), total=L, desc="training predictors", disable=not o.progress))
    trained, thr, on, tests = [], [], [], []
    for l, (fc, ch, q) in enumerate(done):
        report.layers.append({"rank": ranks[l], "cutoff": ch.cutoff, "always_on": ch.always_on, "pinned": n_pin[l],
                              "tune_recall": ch.recall, **q.as_dict()})
        trained.append(fc)
        thr.append(ch.cutoff)
        on.append(ch.always_on)
        tests.append(q)
    add.predictors, add.predictor_layer_thresholds = trained, thr
    add.predictor_always_on = on if use_on else None
    report.overall = cutoffs.Quality.pooled(tests).as_dict()


def _stored_predictors(path: Path) -> tuple:
    """Per layer (fc1, fc2) as stored in `path` (dequantized, the file's neuron order), their type
    names, and the always-on counts."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    r = GGUFReader(str(path))
    tens = {t.name: t for t in r.tensors}
    L = sum(1 for k in tens if k.endswith(".fc1.weight"))
    fc, types = [], []
    for l in range(L):
        w, ty = [], []
        for name in (N.FC1, N.FC2):
            t = tens[name.format(i=l)]
            shape = tuple(int(d) for d in reversed(t.shape))
            w.append(np.asarray(dequantize(np.asarray(t.data), t.tensor_type), np.float32).reshape(shape))
            ty.append(t.tensor_type.name.lower())
        fc.append(w)
        types.append(ty)
    f = r.fields.get(N.PS_PREDICTOR_ALWAYS_ON)
    on = [int(v) for v in f.contents()] if f is not None else [0] * L
    return fc, types, on


def _cutoffs_on_policy(out_path: Path, win, act: str, act_t: float, o: Options, report: Report) -> None:
    """The cut-offs were chosen on the dense model's residual stream; under predict each layer sees
    the stream predict's earlier layers made, where the predictors miss more (on the sparsified
    SmolLM2, recall 95% teacher-forced became 92% in predict's own run). So, `policy_rounds` times:
    run the written file under predict over the tuning windows with capture on (the runtime's
    residual stream entering each FFN, and the full gate on it), choose each layer's cut-off there
    for the recall target (always-on prefix kept), and rewrite the file's cut-offs. The test windows
    are then measured the same way, by the runtime's own counters: recall, predicted and true
    sparsity as predict meets them."""
    from prosparse_rt import _core

    from ..activations import active
    from .write import patch_predictor_cutoffs

    fc, types, on = _stored_predictors(out_path)
    L = len(fc)
    recalls = _recalls(o, L)
    F = fc[0][1].shape[0]
    order = np.arange(F)
    for _ in range(o.policy_rounds):
        m = _core.Model(str(out_path), n_ctx=o.ctx, n_threads=o.n_threads, sparsity="predict")
        xs, ys = [[] for _ in range(L)], [[] for _ in range(L)]
        m.set_capture(True)
        for w in win.tune:
            m.rewind(0)
            m.eval(w)
            for l in range(L):
                x, g = m.captured(l)
                xs[l].append(x)
                ys[l].append(active(act, g, act_t))
        del m
        cut, tune_recall = [], []
        for l in range(L):
            lg = predictor.runtime_logits(fc[l][0], fc[l][1], np.concatenate(xs[l]), *types[l])
            ch = cutoffs.choose(lg, np.concatenate(ys[l]), recalls[l], order if on[l] else None, [on[l]])
            cut.append(ch.cutoff)
            tune_recall.append(ch.recall)
            xs[l] = ys[l] = None
        patch_predictor_cutoffs(out_path, cut)
    m = _core.Model(str(out_path), n_ctx=o.ctx, n_threads=o.n_threads, sparsity="predict", diag_recall=True)
    for w in win.test:
        m.rewind(0)
        m.eval(w)
    rows, pooled = evaluate.predict_stats(m)
    del m
    for l, row in enumerate(report.layers):
        row["tf_recall"] = row.pop("recall")  # teacher-forced, the dense stream
        row.update(cutoff=cut[l], tune_recall=tune_recall[l], recall=rows[l]["recall"],
                   predicted_sparsity=rows[l]["predicted_sparsity"], actual_sparsity=rows[l]["actual_sparsity"])
    report.overall = {**pooled, "tf_recall": report.overall["recall"]}
    report.mean = {k: float(np.mean([r[k] for r in report.layers])) for k in report.layers[0]}


def _workers(n_threads: int):
    """A thread pool of n_threads workers (0: one per core this process may use)."""
    from concurrent.futures import ThreadPoolExecutor

    if not n_threads:
        n_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return ThreadPoolExecutor(max_workers=max(1, n_threads))


def _silu_thresholds(model, p, win, o: Options, add: Additions, report: Report) -> None:
    L = model.hparams["n_layer"]
    probe = _take_tokens(win.held_out or win.calib, o.probe_tokens)
    alloc = thr_mod.allocate(model, p.act_abs, p.n_samples, o.target_sparsity, probe, o.allocation,
                             progress=o.progress)
    report.allocation, report.allocation_kl = alloc.method, alloc.kl
    thr = thr_mod.quantile_thresholds(p.act_abs, p.n_samples, alloc.levels)
    # The thresholds were read off the dense model's activations; sparsifying early layers shifts
    # later layers' distributions, so read them again off the sparse model's own activations.
    model.set_layer_thresholds(thr)
    p2 = prof_mod.profile(model, win.calib, "silu", 0.0, max_samples=o.max_samples, max_bytes=o.max_memory,
                          seed=o.seed + 2, progress=o.progress, desc="re-profiling sparse")
    model.set_layer_thresholds([])
    thr = thr_mod.quantile_thresholds(p2.act_abs, p2.n_samples, alloc.levels)
    add.layer_thresholds = thr
    add.act_freq = [(p2.act_abs[l, :p2.n_samples].astype(np.float32) >= thr[l]).mean(0).astype(np.float32)
                    for l in range(L)]
    for l in range(L):
        report.layers.append({"level": alloc.levels[l], "threshold": thr[l],
                              "calib_sparsity": 1.0 - float(add.act_freq[l].mean())})


def _take_tokens(windows, n: int) -> List[List[int]]:
    out, got = [], 0
    for w in windows:
        if got >= n:
            break
        w = w[: n - got] if n - got >= 8 else w
        out.append(w)
        got += len(w)
    return out


def evaluate_file(model_path, out_path, eval_text: Path, *, ctx: int = 256, max_tokens: int = 4096,
                  n_threads: int = 0, progress: bool = True, layers: Optional[list] = None) -> List[Dict[str, object]]:
    """Held-out perplexity of the input (dense) and of the calibrated file under each strategy it
    supports, with the sparsity each reaches; predict also with its recall, the true sparsity, and
    its KL divergence from exact and top-1 agreement with exact (the cost of the predictors alone).
    `layers`, when given, receives predict's per-layer recall and sparsities."""
    from prosparse_rt import _core

    base = _open_model(model_path, ctx, n_threads)
    text = text_mod.read_texts([eval_text])
    bos = base.bos if base.add_bos_default and base.bos >= 0 else None
    win = text_mod.make_windows(lambda s: base.tokenize(s, False, False), text, bos, ctx, max_tokens,
                                held_out_every=0).calib
    rows = [{"model": "input", "strategy": "dense", "perplexity": evaluate.perplexity(base, win, progress,
                                                                                       "eval input dense"),
             "sparsity": 0.0 if base.hparams["activation"] == "silu" else evaluate.sparsity_of(base)}]
    del base
    models = {}
    for strategy in ("exact", "predict"):
        try:
            models[strategy] = _core.Model(str(out_path), n_ctx=ctx, n_threads=n_threads, sparsity=strategy,
                                           diag_recall=strategy == "predict")
        except ValueError:
            continue  # the file does not support this strategy
    res = evaluate.compare(models, win, "exact" if "exact" in models else None, progress, "eval exact, predict")
    for strategy, m in models.items():
        row = {"model": "calibrated", "strategy": strategy, "perplexity": res[strategy]["perplexity"],
               "sparsity": evaluate.sparsity_of(m)}
        if strategy == "predict":
            per_layer, pooled = evaluate.predict_stats(m)
            row.update(sparsity=pooled["predicted_sparsity"], recall=pooled["recall"],
                       true_sparsity=pooled["actual_sparsity"])
            if "kl" in res[strategy]:
                row.update(kl_vs_exact=res[strategy]["kl"], top1_vs_exact=res[strategy]["top1"])
            if layers is not None:
                layers[:] = per_layer
        rows.append(row)
    del models
    ref = rows[0]["perplexity"]
    for r in rows:
        r["ppl_change"] = r["perplexity"] / ref - 1.0
        r["tokens"] = sum(len(w) for w in win)
    return rows
