"""Seeded initial weights drawn with numpy alone (no keras import), so the Keras model
on every backend and the hand-written framework baselines start from the same numbers."""

from __future__ import annotations

import numpy as np


def seeded_weight_arrays(shapes, seed: int) -> list[np.ndarray]:
    """Keras' glorot_uniform for kernels, limit sqrt(6 / (fan_in + fan_out)), drawn in
    order from one generator; zeros for biases (1-D shapes)."""
    rng = np.random.default_rng(seed)
    weights = []
    for shape in map(tuple, shapes):
        if len(shape) == 1:
            weights.append(np.zeros(shape, dtype="float32"))
            continue
        receptive_field = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
        fan_in, fan_out = shape[-2] * receptive_field, shape[-1] * receptive_field
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        weights.append(rng.uniform(-limit, limit, size=shape).astype("float32"))
    return weights
