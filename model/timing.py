"""Step times with the warm-up left out: one rule for train.py's run.json (StepTimer)
and the benchmark's timing windows (benchmarks/window.py). The first steps trace,
compile and touch memory for the first time; they measure start-up, not the step.
numpy only: the benchmark's framework baselines run without keras."""

from __future__ import annotations

import numpy as np

# Steps left out of train.py's median step time (the benchmark sets its own count).
WARMUP_STEPS = 5


def step_seconds(started: float, step_ends) -> np.ndarray:
    """Each step's time from the clock reads after every step (`started`: the read
    before the first step)."""
    return np.diff(np.concatenate([[started], np.asarray(step_ends, dtype=float)]))


def past_warmup(seconds, warmup_steps: int = WARMUP_STEPS) -> np.ndarray:
    """The step times after the first `warmup_steps`."""
    return np.asarray(seconds, dtype=float)[warmup_steps:]


def spread_over_steps(seconds: float, steps: int) -> list[float]:
    """Each step's time when one call ran `steps` steps in `seconds` (Keras' callbacks see
    only a call's last step when steps_per_execution > 1): an even share each."""
    if steps < 1:
        raise ValueError(f"a call that ran {steps} steps: its last step must follow the previous call's")
    return [seconds / steps] * steps
