"""prosparse-run, the llama.cpp-like command line."""
import pytest

from prosparse_rt.cli import main
from prosparse_rt.presets import DEFAULT_TARGET_SPARSITY


def test_run_generates_and_reports_speed_and_strategy(smollm2_path, capsys):
    assert main(["-m", str(smollm2_path), "-p", "The capital of France is", "-n", "8", "--temp", "0", "-t", "2"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("The capital of France is") and len(out) > len("The capital of France is") + 3
    assert "FFN strategy: dense" in err and "tok/s" in err


def test_chat_mode_uses_the_template(smollm2_path, capsys):
    assert main(["-m", str(smollm2_path), "-p", "Hi!", "--chat", "-n", "8", "--temp", "0"]) == 0
    out, _ = capsys.readouterr()
    assert "<|im_start|>" not in out and out.strip()


@pytest.mark.parametrize("args, message", [
    (["-m", "/nonexistent/model.gguf", "-p", "x"], "does not exist"),
    (["-p", "x", "--sparsity", "exact"], "needs a sparse activation"),
    (["-p", "word " * 40, "-c", "16"], "does not fit the context of 16"),
])
def test_bad_input_is_a_clear_error_and_exit_1(smollm2_path, capsys, args, message):
    if "-m" not in args:
        args = ["-m", str(smollm2_path)] + args
    assert main(args) == 1
    out, err = capsys.readouterr()
    assert message in err and out == ""  # nothing printed before the error, not even the prompt


@pytest.mark.parametrize("args, message", [
    (["-n", "0"], "-n (max_tokens) must be an int >= 1, got 0"),
    (["--top-p", "2"], "--top-p (top_p) must be a number in (0, 1], got 2.0"),
    (["--temp", "-1"], "--temp (temperature) must be a number >= 0"),
    (["--top-k", "-1"], "--top-k (top_k)"),
    (["--min-p", "1.5"], "--min-p (min_p)"),
    (["--repeat-penalty", "0"], "--repeat-penalty (repeat_penalty)"),
    (["-s", str(2**70)], "-s (seed) must be None or an int in [0, 2**64)"),
    (["-t", "0"], "-t must be >= 1"),
    (["-t", "1000000"], "-t 1000000 is more than 4x the"),
    (["-c", "-5"], "-c must be >= 0"),
    (["-b", "0"], "-b must be >= 1"),
    (["--target-sparsity", "1.5"], "--target-sparsity must be in (0, 1)"),
])
def test_bad_flags_are_named_before_anything_is_printed_or_loaded(capsys, args, message):
    """Checked before the model is fetched or loaded (the file here does not even exist)."""
    assert main(["-m", "/nonexistent/model.gguf", "-p", "Hi"] + args) == 1
    out, err = capsys.readouterr()
    assert out == "" and message in err, err


def test_threads_beyond_the_cores_warn_and_work(smollm2_path, capsys):
    from prosparse_rt.model import usable_cores

    n = usable_cores() + 1
    assert main(["-m", str(smollm2_path), "-p", "Hi", "-n", "2", "--temp", "0", "-t", str(n)]) == 0
    assert f"prosparse-run: warning: n_threads={n} is more than the" in capsys.readouterr().err


def test_verbose_prints_the_loaded_line_once(smollm2_path):
    """-v: the model's log line through the CLI's logging setup, once (a fresh process, since the
    test runner's own logging would hide a second handler)."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "prosparse_rt.cli", "-m", str(smollm2_path), "-p", "Hi", "-n", "2",
                          "--temp", "0", "-v"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    loaded = [line for line in res.stderr.splitlines() if "loaded " in line]
    assert len(loaded) == 1 and "strategy dense" in loaded[0] and "kernels " in loaded[0], res.stderr


# ---------------------------------------------------------------- the default model (README's first command)

@pytest.fixture
def cache(smollm2_path, tmp_path, monkeypatch):
    """An empty cache holding only the default model (a link to the real one)."""
    d = tmp_path / "cache"
    d.mkdir()
    (d / smollm2_path.name).symlink_to(smollm2_path)
    monkeypatch.setenv("PROSPARSE_CACHE", str(d))
    return d


def _reported_sparsity(err):
    import re

    m = re.search(r"\(sparsity (\d+\.\d)%\)", err)
    assert m, err
    return float(m.group(1)) / 100


def _nothing_written(cache, smollm2_path):
    return {p.name for p in cache.iterdir()} <= {smollm2_path.name, smollm2_path.name + ".verified"}


def test_default_command_runs_smollm2_densely_from_the_cached_file(cache, smollm2_path, capsys):
    """No arguments: the default model as downloaded, dense (at this size the fastest strategy)."""
    assert main(["-p", "The capital of France is", "-n", "16", "--temp", "0", "-t", "1"]) == 0
    out, err = capsys.readouterr()
    print(f"\n{out}{err}")
    assert f"{cache / smollm2_path.name} (llama, 30 layers, activation silu), FFN strategy: dense" in err
    assert out.startswith("The capital of France is") and len(out) > len("The capital of France is") + 10
    assert _reported_sparsity(err) == 0.0 and "decode: 16 tokens" in err and "tok/s" in err
    assert _nothing_written(cache, smollm2_path)


@pytest.mark.parametrize("args, target", [
    (["--sparsity", "exact"], DEFAULT_TARGET_SPARSITY),
    (["--sparsity", "exact", "--target-sparsity", "0.5"], 0.5),
    (["--target-sparsity", "0.5"], 0.5),  # auto: thresholds make the model sparse, so exact
])
def test_sparsity_exact_applies_the_shipped_thresholds_at_load(cache, smollm2_path, capsys, args, target):
    """The shipped thresholds for the target, applied at load to the cached original (no sparse copy
    on disk); the FFN sparsity reached on this text is near the target."""
    assert main(["-p", "The history of the printing press", "-n", "24", "--temp", "0", "-t", "1"] + args) == 0
    out, err = capsys.readouterr()
    print(f"\n{out}{err}")
    assert f"thresholds for {100 * target:.0f}% FFN sparsity), FFN strategy: exact" in err
    assert abs(_reported_sparsity(err) - target) < 0.1
    assert _nothing_written(cache, smollm2_path)


def test_thresholds_at_load_exact_equals_dense_with_the_same_thresholds(smollm2_path):
    """The README's sparse command computes the same model as dense with the same thresholds (both
    read the ffn_down_t built at load), and not the model without them."""
    import numpy as np

    from prosparse_rt import Model, presets

    thr = presets.layer_thresholds(smollm2_path, DEFAULT_TARGET_SPARSITY)
    logits = {}
    for name, kw in [("exact", dict(sparsity="exact", layer_thresholds=thr)),
                     ("dense", dict(sparsity="dense", layer_thresholds=thr)), ("plain", dict(sparsity="dense"))]:
        with Model(smollm2_path, n_ctx=128, n_threads=2, **kw) as m:
            ids = m.tokenize("The capital of France is Paris, and the capital of Germany is")
            logits[name] = m.logits(ids)
            logits[name + " stats"] = m.stats
    assert logits["exact stats"]["strategy"] == "exact" and logits["dense stats"]["strategy"] == "dense"
    rel = lambda a, b: np.abs(a - b).max() / np.abs(b).max()  # noqa: E731
    assert rel(logits["exact"], logits["dense"]) < 1e-5
    assert rel(logits["exact"], logits["plain"]) > 1e-3
    assert 0.2 < 1 - np.mean(logits["exact stats"]["active_fraction"]) < 0.4


@pytest.mark.parametrize("args, message", [
    (["--target-sparsity", "0.4"], "no shipped thresholds for target sparsity 0.40 on SmolLM2-135M-Instruct.Q4_1.gguf "
                                   "(shipped for this file: 0.30, 0.50)"),
    (["--sparsity", "predict"], "predictor tensors"),
])
def test_default_model_options_without_presets_are_clear_errors(cache, capsys, args, message):
    assert main(["-p", "x", "-n", "2"] + args) == 1
    out, err = capsys.readouterr()
    assert message in err and out == ""


def test_target_sparsity_on_a_file_without_presets_is_a_clear_error(cache, smollm2_path, tmp_path, capsys):
    other = tmp_path / "other.gguf"
    other.write_bytes(smollm2_path.read_bytes()[: 1 << 20])  # a different file: not the preset's size
    assert main(["-m", str(other), "-p", "x", "-n", "2", "--target-sparsity", "0.3"]) == 1
    assert "no shipped thresholds for target sparsity 0.30 on other.gguf (shipped for this file: none)" in \
        capsys.readouterr().err
