"""prosparse-bench: prompt-processing and decode speed of prosparse-rt beside llama.cpp
(llama-cpp-python) on the same GGUF with the same thread count, llama-bench style."""
__all__ = ["synth", "worker", "report", "cli"]
