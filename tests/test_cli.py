"""prosparse-run, the llama.cpp-like command line."""
import pytest

from prosparse_rt.cli import main


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
    (["-p", "x", "-n", "0"], "max_tokens"),
    (["-p", "x", "--top-p", "2"], "top_p"),
    (["-p", "x", "--sparsity", "exact"], "sparse activation"),
])
def test_bad_input_is_a_clear_error_and_exit_1(smollm2_path, capsys, args, message):
    if "-m" not in args:
        args = ["-m", str(smollm2_path)] + args
    assert main(args) == 1
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------- the default model (README's first command)

@pytest.fixture(scope="module")
def built_sparse(smollm2_path, tmp_path_factory):
    """The default sparse model as default_sparse_model() writes it, built once for this module."""
    import os

    import prosparse_convert.calibrate as C

    cache = tmp_path_factory.mktemp("built")
    (cache / smollm2_path.name).symlink_to(smollm2_path)
    old = os.environ.get("PROSPARSE_CACHE")
    os.environ["PROSPARSE_CACHE"] = str(cache)
    try:
        return C.default_sparse_model(progress=False)
    finally:
        if old is None:
            del os.environ["PROSPARSE_CACHE"]
        else:
            os.environ["PROSPARSE_CACHE"] = old


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


def test_default_command_runs_smollm2_with_calibrated_thresholds(cache, capsys):
    """No -m: SmolLM2 with the shipped thresholds for the default target, written once into the
    cache, run `exact`; stderr says the strategy, the FFN sparsity reached and the decode speed."""
    from prosparse_convert.calibrate import DEFAULT_TARGET_SPARSITY, sparse_model_path

    assert main(["-p", "The capital of France is", "-n", "16", "--temp", "0", "-t", "1"]) == 0
    out, err = capsys.readouterr()
    print(f"\n{out}{err}")
    path = sparse_model_path(DEFAULT_TARGET_SPARSITY)
    assert path.parent == cache and path.is_file()
    assert str(path) in err and "FFN strategy: exact" in err
    assert out.startswith("The capital of France is") and len(out) > len("The capital of France is") + 10
    assert abs(_reported_sparsity(err) - DEFAULT_TARGET_SPARSITY) < 0.1
    assert "decode: 16 tokens" in err and "tok/s" in err


def test_sparsity_dense_runs_the_original_default_model(cache, smollm2_path, capsys):
    assert main(["-p", "The capital of France is", "-n", "4", "--temp", "0", "-t", "1", "--sparsity", "dense"]) == 0
    _, err = capsys.readouterr()
    assert f"{cache / smollm2_path.name} (" in err and "FFN strategy: dense" in err
    assert _reported_sparsity(err) == 0.0
    assert not any(".sparse" in p.name for p in cache.iterdir())  # nothing sparsified


def _truncate(p):
    with open(p, "r+b") as f:
        f.truncate(p.stat().st_size // 2)


def _garbage_header(p):
    with open(p, "r+b") as f:
        f.write(b"\0" * 4096)


def _other_thresholds(p):
    """A complete file, but with thresholds that are not the preset's (an older preset)."""
    from prosparse_convert.calibrate.write import Additions, InputFile, write

    src = InputFile(p)
    thr = [2 * t for t in src.get("prosparse.layer_thresholds")]
    tmp = p.with_name("other.gguf")
    write(src, tmp, Additions(activation="silu", layer_thresholds=thr, down_type="f16"), 30, 1536, progress=False)
    tmp.replace(p)


@pytest.mark.parametrize("damage", [_truncate, lambda p: p.write_bytes(b""), _garbage_header, _other_thresholds],
                         ids=["truncated", "empty", "garbage-header", "stale-thresholds"])
def test_a_damaged_cached_sparse_model_is_rebuilt(cache, built_sparse, damage, caplog):
    import json
    import shutil

    import gguf
    import numpy as np

    import prosparse_convert.calibrate as C

    cached = cache / built_sparse.name
    shutil.copyfile(built_sparse, cached)
    damage(cached)
    assert main(["-p", "Hello", "-n", "4", "--temp", "0", "-t", "1"]) == 0
    assert any("rebuilding" in r.getMessage() for r in caplog.records)
    assert cached.stat().st_size == built_sparse.stat().st_size
    preset = json.loads(C._PRESETS.read_text())[cache.joinpath(
        "SmolLM2-135M-Instruct.Q4_1.gguf").resolve().name]["thresholds"][f"{C.DEFAULT_TARGET_SPARSITY:.2f}"]
    got = gguf.GGUFReader(str(cached)).fields["prosparse.layer_thresholds"].contents()
    np.testing.assert_allclose(got, preset, rtol=1e-6)
    assert not [p for p in cache.iterdir() if "tmp" in p.name]  # written atomically


@pytest.mark.parametrize("args, message", [
    (["--target-sparsity", "1.5"], "--target-sparsity must be in (0, 1)"),
    (["--target-sparsity", "0.3", "--sparsity", "dense"], "runs the original"),
    (["-m", "model.gguf", "--target-sparsity", "0.3"], "applies to the default model"),
])
def test_bad_default_model_options_are_clear_errors(cache, capsys, args, message):
    assert main(["-p", "x", "-n", "2"] + args) == 1
    assert message in capsys.readouterr().err
