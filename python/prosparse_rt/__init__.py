"""prosparse-rt: a llama.cpp-style runtime for activation-sparse LLMs."""
from . import _core  # noqa: F401
