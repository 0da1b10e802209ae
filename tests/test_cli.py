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
