"""prosparse_convert.activations, the one Python copy of the FFN activations (calibration's profiler
and prosparse-sparsify use it), against the runtime's own (cpp/src/ffn.cpp): which neurons it zeroes
on the gates the runtime captured (numpy), and the logits of a tiny model whose reference uses it
(torch, in transformers). References: the runtime's active-neuron counts and logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import helpers_models as H
from prosparse_convert import convert
from prosparse_convert.activations import activation, active
from prosparse_rt import _core

# activation -> its threshold in each of the model's two layers: FATReLU's t from the checkpoint,
# SiLU's per-layer CATS thresholds on |SiLU(gate)| set in the runtime with set_layer_thresholds
CASES = {"relu": [0.0, 0.0], "fatrelu": [0.3, 0.3], "silu": [0.15, 0.3]}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """kind -> (transformers model, f32 GGUF of the same weights)."""
    root = tmp_path_factory.mktemp("act")
    out = {}
    for kind in CASES:
        if kind == "fatrelu":
            model, d = H.make_fatrelu_dir(root / kind, CASES[kind][0], seed=31)
        else:
            model, d = H.make_llama_dir(root / kind, hidden_act=kind, seed=31)
        out[kind] = (model, convert(d, root / f"{kind}.gguf", outtype="f32", progress=False))
    return out


def _runtime(path, kind):
    m = _core.Model(str(path), n_ctx=64, n_threads=1, sparsity="dense", kv_type="f32")
    if kind == "silu":
        m.set_layer_thresholds(CASES[kind])
    return m


class _Act(torch.nn.Module):
    """A layer's act_fn computing rule(gate, t)."""

    def __init__(self, rule, t):
        super().__init__()
        self.rule, self.t = rule, t

    def forward(self, g):
        return self.rule(g, self.t)


@pytest.mark.parametrize("kind", list(CASES))
def test_numpy_and_torch_give_the_same_values(kind):
    g = np.random.default_rng(0).normal(0, 1.5, 10_000).astype(np.float32)
    t = CASES[kind][1]
    a = activation(kind, g, t)
    b = activation(kind, torch.from_numpy(g), t)
    assert a.dtype == np.float32 and b.dtype == torch.float32
    np.testing.assert_allclose(a, b.numpy(), rtol=1e-6, atol=0)
    np.testing.assert_array_equal(active(kind, g, t), active(kind, torch.from_numpy(g), t).numpy())


def test_thresholds_keep_values_at_the_threshold_as_the_runtime_does():
    # ffn.cpp: FATReLU keeps g >= t; SiLU zeroes |SiLU(g)| < t (so |SiLU(g)| == t is kept); ReLU g > 0
    g = np.array([-1.0, 0.0, 0.25, 0.5, 1.0], np.float32)
    np.testing.assert_array_equal(activation("fatrelu", g, 0.5), [0, 0, 0, 0.5, 1.0])
    np.testing.assert_array_equal(activation("relu", g), [0, 0, 0.25, 0.5, 1.0])
    s = activation("silu", g)
    np.testing.assert_array_equal(activation("silu", g, float(s[3])), [0, 0, 0, s[3], s[4]])


def test_torch_keeps_the_gradient():
    g = torch.tensor([-1.0, 0.2, 2.0], requires_grad=True)
    activation("fatrelu", g, 0.5).sum().backward()
    np.testing.assert_array_equal(g.grad.numpy(), [0, 0, 1])


def test_unknown_activation_is_refused():
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        activation("gelu", np.zeros(3, np.float32))


@pytest.mark.parametrize("kind", list(CASES))
def test_active_neurons_match_the_runtimes_count_on_its_own_gates(models, kind):
    m = _runtime(models[kind][1], kind)
    m.set_capture(True)
    ids = H.prompt_ids(24)
    m.eval(ids)
    frac = m.stats()["active_fraction"]
    for layer, t in enumerate(CASES[kind]):
        _, gate = m.captured(layer)
        ours = int(active(kind, gate, t).sum())
        theirs = frac[layer] * gate.size
        assert ours == round(theirs), (layer, ours, theirs)
        assert 0.1 * gate.size < ours < 0.9 * gate.size  # the thresholds decide for many neurons


@pytest.mark.parametrize("kind", list(CASES))
def test_a_reference_using_it_reproduces_the_runtimes_logits(models, kind):
    ref, path = models[kind]
    thresholds = CASES[kind]
    ids = H.prompt_ids(20)
    ours = np.asarray(_runtime(path, kind).eval(ids, True))

    def logits_with(rule):
        for layer, t in zip(ref.model.layers, thresholds):
            layer.mlp.act_fn = _Act(rule, t)
        return H.hf_logits(ref, ids)

    assert H.rel_error(ours, logits_with(lambda g, t: activation(kind, g, t))) < 1e-4
    # and the comparison can tell rules apart: a threshold on the gate instead of the activation's
    # value (or none at all) gives other logits
    wrong = (lambda g, t: activation("fatrelu", g, t)) if kind == "silu" else (lambda g, t: g * (g > t + 0.1))
    assert H.rel_error(ours, logits_with(wrong)) > 1e-2
