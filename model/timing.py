"""Step times with the warm-up left out, and steps grouped into calls: one rule for
train.py's run.json (StepTimer) and the benchmark's timing windows (benchmarks/window.py).
The first steps trace, compile and touch memory for the first time; they measure
start-up, not the step. numpy only: the benchmark's framework baselines run without keras."""

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


def whole_calls(steps: int, per_call: int) -> int:
    """`steps` rounded up to whole calls of `per_call` steps."""
    return -(-steps // per_call) * per_call


def step_range(first: int, last: int) -> str:
    """How an error names the steps one call ran: "step 5", or "steps 1-10"."""
    return f"step {last}" if first == last else f"steps {first}-{last}"


def whole_executions(steps_per_epoch: int, most: int) -> int:
    """The most steps per call of a step function, up to `most`, that divides an epoch: Keras
    takes a call's steps from the feed, which here runs on over every epoch, so a call
    crossing an epoch's end would train on the next epoch's first batches before this
    epoch's validation and checkpoint (the benchmark's hand-written loops take the same
    count, benchmarks/window.py)."""
    return max(count for count in range(1, max(min(most, steps_per_epoch), 1) + 1) if steps_per_epoch % count == 0)
