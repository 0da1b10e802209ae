"""prosparse-rt: a llama.cpp-style runtime for activation-sparse LLMs.

>>> from prosparse_rt import Model
>>> m = Model("model.gguf")
>>> print(m.generate("The capital of France is", max_tokens=16, temperature=0.0))
"""
from ._core import cuda_devices, cuda_status
from .model import Model, SamplingParams

__all__ = ["Model", "SamplingParams", "cuda_devices", "cuda_status"]
__version__ = "0.1.0"
