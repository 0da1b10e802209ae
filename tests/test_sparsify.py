"""prosparse-sparsify: the ProSparse recipe (arXiv 2402.13516) on tiny random checkpoints.

References: the paper's λ schedule table and cosine ramp η = ½(1 − cos(π f)); transformers'
LlamaForCausalLM (with FATReLU x·(x >= t) as docs/design.md says) for the written checkpoint; docs/design.md's
folded LlamaForCausalLM for MiniCPM; prosparse-convert + prosparse_rt for the end to end check.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from helpers_models import (_use_fatrelu, hf_logits, make_llama_dir, make_minicpm_dir,  # noqa: E402
                            prompt_ids, rel_error)

from prosparse_sparsify import schedule as S  # noqa: E402
from prosparse_sparsify import data as D  # noqa: E402
from prosparse_sparsify import model as M  # noqa: E402
from prosparse_sparsify import train as T  # noqa: E402
from prosparse_sparsify.cli import main as cli_main  # noqa: E402


# ---------------------------------------------------------------- λ schedule

# The paper's 7B schedule (λ, cumulative step) and hand-computed values: constant in stages 0
# and 1, and at a cosine stage's midpoint η(½) = ½, i.e. the mean of its two λ.
PAPER_7B_POINTS = [
    (0, 0.0), (2500, 0.0), (4999, 0.0),          # stage 0: ReLU only
    (5000, 5e-3), (5500, 5e-3),                  # stage 1: warm-up, constant
    (6000, 5e-3), (8000, (5e-3 + 5e-2) / 2),     # stage 2: 5e-3 → 5e-2, starts at f = 0
    (10000, 5e-2), (11000, 5e-2),                # stage 3: flat
    (12000, 5e-2), (14000, (5e-2 + 2e-1) / 2),   # stage 4: 5e-2 → 2e-1
    (16000, 2e-1), (16250, 2e-1), (16500, 2e-1),  # stage 5: flat, and past the end
]


@pytest.mark.parametrize("step,expected", PAPER_7B_POINTS)
def test_prosparse_7b_schedule_matches_paper_table(step, expected):
    sched = S.parse("prosparse-7b", None)
    assert sched.stages == ((0.0, 5000), (5e-3, 6000), (5e-2, 10000), (5e-2, 12000), (2e-1, 16000), (2e-1, 16500))
    assert sched.value(step) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_cosine_ramp_follows_eta():
    sched = S.parse("prosparse-7b", None)
    # a quarter into stage 2: η = ½(1 − cos(π/4))
    eta = 0.5 * (1 - math.cos(math.pi / 4))
    assert sched.value(7000) == pytest.approx(5e-3 + eta * (5e-2 - 5e-3), rel=1e-12)
    # continuous at the end of a ramp: the last step is within a hair of the target λ
    assert sched.value(9999) == pytest.approx(5e-2, rel=1e-5)


def test_preset_scales_to_user_steps():
    assert S.parse("prosparse-7b", 1650).stages == (
        (0.0, 500), (5e-3, 600), (5e-2, 1000), (5e-2, 1200), (2e-1, 1600), (2e-1, 1650))
    assert S.parse("minicpm-1b", 350).stages == (
        (0.0, 100), (1e-3, 150), (5e-3, 200), (5e-3, 250), (5e-2, 350))


def test_default_schedule_spends_most_steps_regularizing():
    sched = S.parse(S.DEFAULT, 1000)
    assert sched.stages[0] == (0.0, 100)            # 10% at λ = 0, not the 7B preset's 30%
    assert sum(sched.value(s) > 0 for s in range(1000)) == 900


def test_custom_schedule_absolute_and_percent():
    assert S.parse("0@10, 0.01@20, 0.1@50", None).stages == ((0.0, 10), (0.01, 20), (0.1, 50))
    assert S.parse("0@10%,0.01@20%,0.1@100%", 200).stages == ((0.0, 20), (0.01, 40), (0.1, 200))


def test_rescaled_schedule_keeps_shape():
    s = S.parse("prosparse-7b", 1650).scaled_lambda(1.0)
    assert [lam for lam, _ in s.stages] == pytest.approx([0, 0.025, 0.25, 0.25, 1.0, 1.0])


@pytest.mark.parametrize("spec,steps,msg", [
    ("0@100,0.01@50,0.1@200", None, "out of order"),
    ("0@100,0.01@100", None, "out of order"),
    ("0@100,-1@200", None, ">= 0"),
    ("0@100,0.1@200", 300, "--steps is 300"),
    ("prosparse-70b", 100, "unknown schedule"),
    ("0@10,abc@20", None, "bad schedule item"),
    ("prosparse-7b", 3, "too few"),
])
def test_bad_schedules_are_refused_clearly(spec, steps, msg):
    with pytest.raises(S.ScheduleError, match=msg):
        S.parse(spec, steps)


# ---------------------------------------------------------------- data


def test_jsonl_and_text_are_packed(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one two"}\n\n"three"\n')
    (tmp_path / "b.txt").write_text("four five six")
    assert sorted(D.read_documents([str(tmp_path)])) == ["four five six", "one two", "three"]
    blocks = D.pack([[1, 2, 3], [4, 5, 6, 7], [8]], 3)
    assert blocks.tolist() == [[1, 2, 3], [4, 5, 6]]  # the ragged tail [7, 8] is dropped


def test_empty_data_is_refused(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n\n")
    with pytest.raises(ValueError, match="no text found"):
        D.read_documents([str(tmp_path / "empty.txt")])


def test_bad_jsonl_names_the_line(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(ValueError, match="x.jsonl:2"):
        D.read_documents([str(tmp_path / "x.jsonl")])


# ---------------------------------------------------------------- models


def _corpus(tmp_path, n_chars=120_000) -> Path:
    from pydoc_data import topics

    f = tmp_path / "corpus.jsonl"
    with open(f, "w") as fh:
        total = 0
        for text in topics.topics.values():
            fh.write(json.dumps({"text": text}) + "\n")
            total += len(text)
            if total > n_chars:
                break
    return f


def test_unknown_architecture_is_refused(tmp_path):
    _, d = make_llama_dir(tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported architecture.*GPT2LMHeadModel"):
        M.load(d)


def test_unknown_activation_is_refused(tmp_path):
    _, d = make_llama_dir(tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["hidden_act"] = "gelu"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported hidden_act 'gelu'"):
        M.load(d)


def test_cli_reports_bad_input_without_traceback(tmp_path, capsys):
    _, d = make_llama_dir(tmp_path / "m")
    rc = cli_main([str(d), str(tmp_path / "out"), "--data", str(tmp_path / "nope.txt"), "--steps", "10"])
    assert rc == 1
    assert "data file not found" in capsys.readouterr().err
    rc = cli_main([str(d), str(tmp_path / "out"), "--data", str(d / "config.json"),
                   "--schedule", "0@20,1@10"])
    assert rc == 1
    assert "out of order" in capsys.readouterr().err


def test_loaded_llama_computes_transformers_logits(tmp_path):
    ref, d = make_llama_dir(tmp_path / "m", n_head_kv=2, tied=True)
    loaded = M.load(d)
    ids = prompt_ids()
    assert rel_error(hf_logits(loaded.model.eval(), ids), hf_logits(ref, ids)) < 1e-6


def test_minicpm_hooks_match_folded_llama(tmp_path):
    folded, d = make_minicpm_dir(tmp_path / "cpm", n_head_kv=2)
    loaded = M.load(d)
    assert loaded.arch == "minicpm" and loaded.tied
    ids = prompt_ids()
    assert rel_error(hf_logits(loaded.model.eval(), ids), hf_logits(folded, ids)) < 1e-5


def test_fatrelu_keeps_values_at_or_above_threshold():
    act = M.FATReLU(0.5)
    x = torch.tensor([-1.0, 0.0, 0.49, 0.5, 2.0])
    assert act(x).tolist() == [0.0, 0.0, 0.0, 0.5, 2.0]


def test_l1_is_mean_over_tokens_and_neurons_summed_over_layers(tmp_path):
    _, d = make_llama_dir(tmp_path / "m", n_layer=3)
    loaded = M.load(d)
    sp = M.Sparsifier(loaded.model)
    captured = []
    for layer in loaded.model.model.layers:
        layer.mlp.down_proj.register_forward_pre_hook(lambda m, i: captured.append(i[0].detach()))
    sp.start(l1=True)
    loaded.model(input_ids=torch.tensor([prompt_ids(12)]))
    expected = sum(float(x.abs().mean()) for x in captured)
    assert float(sp.l1().detach()) == pytest.approx(expected, rel=1e-6)
    assert len(captured) == 3


# ---------------------------------------------------------------- training


def _tiny_setup(tmp_path, seed=0):
    _, d = make_llama_dir(tmp_path / "m", seed=seed)
    loaded = M.load(d)
    train, evals = D.load_blocks(loaded.tokenizer, [str(_corpus(tmp_path))], 64, eval_fraction=0.1)
    return loaded, train, evals[:16]


def _train(loaded, train, spec, steps, tmp_path, **kw):
    cfg = T.Config(model="", out_dir=str(tmp_path), data=[], steps=steps, schedule=spec, seq_len=64,
                   batch_size=4, lr=2e-3, progress=False, **kw)
    sp = M.Sparsifier(loaded.model)
    tr = T.Trainer(loaded, sp, cfg, S.parse(spec, steps), train, torch.device("cpu"), None)
    tr.run()
    return sp, tr


def test_regularized_stages_are_sparser_than_relu_only(tmp_path):
    steps = 40
    base, train, evals = _tiny_setup(tmp_path)
    sp0, tr0 = _train(base, train, f"0@{steps}", steps, tmp_path)
    relu_only = T.evaluate(base.model, evals, torch.device("cpu"), None, 8, sp0)

    reg, _, _ = _tiny_setup(tmp_path)
    sp1, tr1 = _train(reg, train, "0@10%,0.5@20%,2@80%,2@100%", steps, tmp_path)
    regularized = T.evaluate(reg.model, evals, torch.device("cpu"), None, 8, sp1)

    assert all(math.isfinite(h["loss"]) for h in tr0.history + tr1.history)
    assert regularized["sparsity"] > relu_only["sparsity"] + 0.15, (relu_only, regularized)
    assert math.isfinite(regularized["ppl"])


def test_resumed_training_equals_uninterrupted(tmp_path):
    steps, spec = 6, "0@2,0.1@3,1@6"
    a, train, _ = _tiny_setup(tmp_path)
    _, tr_a = _train(a, train, spec, steps, tmp_path)

    b, _, _ = _tiny_setup(tmp_path)
    cfg = T.Config(model="", out_dir=str(tmp_path), data=[], steps=steps, schedule=spec, seq_len=64,
                   batch_size=4, lr=2e-3, progress=False)
    sp = M.Sparsifier(b.model)
    tr_b = T.Trainer(b, sp, cfg, S.parse(spec, steps), train, torch.device("cpu"), None,
                     ckpt_dir=tmp_path / "ckpt")
    tr_b.run(stop_at=3)  # stop half way, as a killed run would after its checkpoint
    tr_b.save_checkpoint()

    c, _, _ = _tiny_setup(tmp_path)
    tr_c = T.Trainer(c, M.Sparsifier(c.model), cfg, S.parse(spec, steps), train, torch.device("cpu"), None)
    tr_c.load_checkpoint(tmp_path / "ckpt" / "state.pt")
    assert tr_c.step == 3
    tr_c.run()
    for (k, va), vc in zip(a.model.state_dict().items(), c.model.state_dict().values()):
        assert torch.allclose(va, vc, atol=1e-6), k
    assert [h["lambda"] for h in tr_c.history] == [h["lambda"] for h in tr_a.history]


def _run_tiny(tmp_path, model_dir, **kw):
    cfg = T.Config(model=str(model_dir), out_dir=str(tmp_path / "out"), data=[str(_corpus(tmp_path))],
                   steps=12, schedule="0@2,0.5@4,2@12", seq_len=64, batch_size=4, lr=2e-3,
                   max_eval_seqs=8, progress=False, dtype="fp32", **kw)
    return T.run(cfg, log=lambda *a: None), Path(cfg.out_dir)


def test_output_directory_is_a_prosparse_release(tmp_path):
    _, d = make_llama_dir(tmp_path / "m", tied=True)
    report, out = _run_tiny(tmp_path, d, threshold="0.02")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["SparseLlamaForCausalLM"] and cfg["model_type"] == "sparsellama"
    assert cfg["hidden_act"] == "fatrelu" and cfg["hidden_act_param"] == 0.02
    for name in ("model.safetensors", "tokenizer.model", "sparsify_report.json", "sparsify_plot.png"):
        assert (out / name).is_file(), name
    assert report["tokens_trained"] == 12 * 4 * 64
    assert [r["threshold"] for r in report["threshold_sweep"]] == list(T.DEFAULT_THRESHOLDS)

    # the written weights, loaded by transformers with FATReLU(0.02), give the trained model's logits
    from transformers import LlamaConfig, LlamaForCausalLM

    ref = LlamaForCausalLM.from_pretrained(
        out, config=LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "hidden_act")}))
    _use_fatrelu(ref, 0.02)
    trained = M.load(d)
    from safetensors.torch import load_file
    trained.model.load_state_dict(load_file(str(out / "model.safetensors")), strict=False)
    trained.model.tie_weights()
    M.Sparsifier(trained.model).set_threshold(0.02)
    ids = prompt_ids()
    assert rel_error(hf_logits(ref.eval(), ids), hf_logits(trained.model.eval(), ids)) < 1e-6


def test_auto_threshold_is_largest_within_ppl_budget():
    rows = [{"threshold": 0.0, "ppl": 10.0}, {"threshold": 0.01, "ppl": 10.05},
            {"threshold": 0.02, "ppl": 10.09}, {"threshold": 0.05, "ppl": 10.5}]
    assert T.choose_threshold(rows, 0.01) == 0.02


def test_existing_checkpoint_needs_resume(tmp_path):
    _, d = make_llama_dir(tmp_path / "m")
    (tmp_path / "out" / "checkpoint").mkdir(parents=True)
    (tmp_path / "out" / "checkpoint" / "state.pt").write_bytes(b"x")
    with pytest.raises(ValueError, match="--resume"):
        _run_tiny(tmp_path, d)


def test_minicpm_output_keeps_minicpm_config(tmp_path):
    _, d = make_minicpm_dir(tmp_path / "cpm")
    _, out = _run_tiny(tmp_path, d, threshold="0.03")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["MiniCPMForCausalLM"] and cfg["scale_emb"] == 12.0
    assert cfg["hidden_act"] == "fatrelu" and cfg["hidden_act_param"] == 0.03


def test_lambda_sweep_picks_smallest_reaching_target(tmp_path):
    _, d = make_llama_dir(tmp_path / "m")
    report, _ = _run_tiny(tmp_path, d, sweep_lambdas=[0.0001, 5.0], target_sparsity=0.6,
                          sweep_steps=12, sweep_only=True)
    rows = {r["final_lambda"]: r["sparsity"] for r in report["lambda_sweep"]["rows"]}
    assert rows[5.0] > rows[0.0001]
    expected = 0.0001 if rows[0.0001] >= 0.6 else 5.0
    assert report["lambda_sweep"]["chosen"] == expected


# ---------------------------------------------------------------- end to end


def test_sparsified_checkpoint_converts_and_runtime_matches_transformers(tmp_path):
    """prosparse-convert takes the output directory as is; prosparse_rt's logits equal
    transformers' LlamaForCausalLM on the same weights with FATReLU(t)."""
    convert = pytest.importorskip("prosparse_convert.convert")
    rt = pytest.importorskip("prosparse_rt")
    from transformers import LlamaConfig, LlamaForCausalLM

    _, d = make_llama_dir(tmp_path / "m", n_head_kv=2)
    t = 0.05
    report, out = _run_tiny(tmp_path, d, threshold=str(t))
    assert report["after"]["sparsity"] > report["relu_zero_shot"]["sparsity"]
    gguf = convert.convert(str(out), str(tmp_path / "sparse.gguf"), outtype="f32", progress=False)

    cfg = json.loads((out / "config.json").read_text())
    ref = LlamaForCausalLM.from_pretrained(
        out, config=LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "hidden_act")}))
    _use_fatrelu(ref, t)
    ids = prompt_ids()
    ours = rt.Model(str(gguf), n_threads=1, kv_type="f32").logits(ids)
    assert rel_error(ours, hf_logits(ref.eval(), ids)) < 1e-4


def test_baseline_trains_the_original_activation_without_l1(tmp_path):
    # the fair baseline for the sparse model's cost: same data order, steps and LR, SiLU kept, λ = 0
    _, d = make_llama_dir(tmp_path / "m")
    report, out = _run_tiny(tmp_path, d, baseline=True)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["hidden_act"] == "silu"
    assert "hidden_act_param" not in cfg and "threshold_sweep" not in report
    assert report["tokens_trained"] == 12 * 4 * 64
    assert all(h["lambda"] == 0.0 and h["l1"] == 0.0 for h in report["history"])
    assert report["after"]["ppl"] < report["before"]["ppl"]  # it did train

    # the written weights are the trained SiLU model: transformers' LLaMA loads them as they are
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    ref = LlamaForCausalLM.from_pretrained(
        out, config=LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")}))
    trained = M.load(d)
    trained.model.load_state_dict(load_file(str(out / "model.safetensors")), strict=False)
    ids = prompt_ids()
    assert rel_error(hf_logits(ref.eval(), ids), hf_logits(trained.model.eval(), ids)) < 1e-6


def test_baseline_refuses_a_lambda_sweep(tmp_path):
    _, d = make_llama_dir(tmp_path / "m")
    with pytest.raises(ValueError, match="--baseline"):
        _run_tiny(tmp_path, d, baseline=True, sweep_lambdas=[0.1], target_sparsity=0.5)
