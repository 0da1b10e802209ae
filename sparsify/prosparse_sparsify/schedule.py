"""Progressive sparsity regularization: the λ schedule of ProSparse (arXiv 2402.13516, §3.2).

A schedule is a list of stages, each ``(λ_i, end_step_i)`` with cumulative end steps:

- stage 0 (activation substitution, SiLU → ReLU): λ = λ_0 (0 in every schedule of the paper);
- stage 1 (warm-up): λ = λ_1, constant;
- stage i >= 2: λ rises from λ_(i-1) to λ_i along η = ½(1 − cos(π f)), f the fraction of the
  stage done, so λ = λ_(i-1) + η (λ_i − λ_(i-1)); a stage with λ_i = λ_(i-1) is flat.

Steps are 0-based optimizer steps: step s belongs to the stage whose interval [start, end)
contains it, so a boundary step is the first step of the next stage (f = 0 there) and the value
is continuous across boundaries. Past the last stage λ stays at its final value.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import List, Sequence, Tuple

# The paper's schedules (arXiv 2402.13516, training settings): (λ, cumulative step).
PAPER_SCHEDULES = {
    "prosparse-7b": [(0.0, 5000), (5e-3, 6000), (5e-2, 10000), (5e-2, 12000), (2e-1, 16000), (2e-1, 16500)],
    "prosparse-13b": [(0.0, 5500), (5e-3, 6750), (1e-2, 10750), (1e-2, 11000), (2e-2, 15000), (2e-2, 16000)],
    "minicpm-1b": [(0.0, 10000), (1e-3, 15000), (5e-3, 20000), (5e-3, 25000), (5e-2, 35000)],
}

# The default for short runs: the 7B preset's λ values, but stage 0 shortened to 10% of the run
# (the 7B preset scaled down spends 30% of a short run at λ = 0, where nothing gets sparser).
# Fractions of the user's step count.
SHORT_SCHEDULE = [(0.0, 0.10), (5e-3, 0.20), (5e-2, 0.50), (5e-2, 0.60), (2e-1, 0.90), (2e-1, 1.00)]

PRESETS = sorted(PAPER_SCHEDULES) + ["short"]
DEFAULT = "short"

HELP = (
    "λ schedule: a preset name, scaled to --steps, or a custom list 'λ@step,λ@step,...' "
    "(cumulative end step of each stage; 'N%%' means N percent of --steps; stage 0 is the "
    "ReLU-only stage, stage 1 a constant warm-up, later stages cosine ramps). "
    f"Presets: {', '.join(PRESETS)}. Default '{DEFAULT}': "
    + ", ".join(f"{lam:g}@{int(frac * 100)}%%" for lam, frac in SHORT_SCHEDULE)
    + " (10%% at λ=0, then 90%% regularizing, the 7B preset's λ values)."
)


class ScheduleError(ValueError):
    pass


@dataclass(frozen=True)
class Schedule:
    stages: Tuple[Tuple[float, int], ...]  # (λ_i, cumulative end step), end steps strictly increasing

    def __post_init__(self):
        validate(self.stages)

    @property
    def total_steps(self) -> int:
        return self.stages[-1][1]

    @property
    def final_lambda(self) -> float:
        return self.stages[-1][0]

    def stage_of(self, step: int) -> int:
        for i, (_, end) in enumerate(self.stages):
            if step < end:
                return i
        return len(self.stages) - 1

    def value(self, step: int) -> float:
        if step >= self.total_steps:
            return self.stages[-1][0]
        i = self.stage_of(step)
        lam = self.stages[i][0]
        if i <= 1:
            return lam  # stage 0 (ReLU substitution) and stage 1 (warm-up) are constant
        prev_lam, start = self.stages[i - 1]
        end = self.stages[i][1]
        f = (step - start) / (end - start)
        eta = 0.5 * (1.0 - math.cos(math.pi * f))
        return prev_lam + eta * (lam - prev_lam)

    def scaled_lambda(self, final_lambda: float) -> "Schedule":
        """The same shape with every λ multiplied so that the last one is ``final_lambda``."""
        if self.final_lambda <= 0:
            raise ScheduleError("cannot rescale a schedule whose final λ is 0")
        c = final_lambda / self.final_lambda
        return Schedule(tuple((lam * c, end) for lam, end in self.stages))

    def describe(self) -> str:
        return ", ".join(f"{lam:g}@{end}" for lam, end in self.stages)


def validate(stages: Sequence[Tuple[float, int]]) -> None:
    if len(stages) < 1:
        raise ScheduleError("a schedule needs at least one stage")
    prev = 0
    for i, (lam, end) in enumerate(stages):
        if not math.isfinite(lam) or lam < 0:
            raise ScheduleError(f"stage {i}: λ must be a finite number >= 0, got {lam}")
        if end <= prev:
            raise ScheduleError(
                f"schedule steps out of order: stage {i} ends at step {end}, "
                f"which is not after the previous boundary {prev} (end steps are cumulative and must increase)")
        prev = end


def scale_stages(stages: Sequence[Tuple[float, float]], total: float, steps: int) -> List[Tuple[float, int]]:
    """Boundaries b (out of ``total``) mapped to round(b / total * steps); a stage that would get
    no steps is refused rather than silently dropped."""
    out = []
    for i, (lam, b) in enumerate(stages):
        end = int(round(b / total * steps))
        if out and end <= out[-1][1]:
            raise ScheduleError(
                f"--steps {steps} is too few for this schedule: stage {i} would get no steps")
        if end <= 0:
            raise ScheduleError(f"--steps {steps} is too few for this schedule: stage 0 would get no steps")
        out.append((lam, end))
    return out


_ITEM = re.compile(r"^\s*([0-9.eE+-]+)\s*@\s*([0-9.]+)\s*(%?)\s*$")


def parse(spec: str, steps: int | None) -> Schedule:
    """A preset name or 'λ@step,...'. Presets and percentages need ``steps``; a custom schedule in
    absolute steps defines the run length itself when ``steps`` is None."""
    spec = spec.strip()
    if spec in PAPER_SCHEDULES or spec == "short":
        if steps is None:
            if spec == "short":
                raise ScheduleError("the 'short' schedule needs --steps")
            return Schedule(tuple((lam, int(e)) for lam, e in PAPER_SCHEDULES[spec]))
        if spec == "short":
            return Schedule(tuple(scale_stages(SHORT_SCHEDULE, 1.0, steps)))
        paper = PAPER_SCHEDULES[spec]
        return Schedule(tuple(scale_stages(paper, paper[-1][1], steps)))
    if "@" not in spec:
        raise ScheduleError(f"unknown schedule '{spec}': give one of {', '.join(PRESETS)} or 'λ@step,λ@step,...'")
    stages: List[Tuple[float, int]] = []
    for item in spec.split(","):
        m = _ITEM.match(item)
        if not m:
            raise ScheduleError(f"bad schedule item '{item.strip()}': expected λ@step or λ@N%")
        try:
            lam = float(m.group(1))
        except ValueError:
            raise ScheduleError(f"bad λ '{m.group(1)}' in schedule item '{item.strip()}'") from None
        if m.group(3):
            if steps is None:
                raise ScheduleError(f"schedule item '{item.strip()}' is a percentage: give --steps")
            end = int(round(float(m.group(2)) / 100.0 * steps))
        else:
            if not re.fullmatch(r"[0-9]+", m.group(2)):
                raise ScheduleError(f"schedule item '{item.strip()}': step must be an integer (or N%)")
            end = int(m.group(2))
        stages.append((lam, end))
    sched = Schedule(tuple(stages))
    if steps is not None and sched.total_steps != steps:
        raise ScheduleError(
            f"schedule ends at step {sched.total_steps} but --steps is {steps}: make them agree "
            "(or give the boundaries as percentages)")
    return sched
