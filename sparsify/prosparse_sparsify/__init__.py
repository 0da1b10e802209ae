"""prosparse-sparsify: the ProSparse training recipe (arXiv 2402.13516) for LLaMA-family and
MiniCPM checkpoints. Needs the ``train`` extra (PyTorch, transformers, matplotlib)."""
from .schedule import PAPER_SCHEDULES, Schedule, ScheduleError, parse as parse_schedule  # noqa: F401

__all__ = ["PAPER_SCHEDULES", "Schedule", "ScheduleError", "parse_schedule"]
