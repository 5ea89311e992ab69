"""Hand-written baselines: the project's CNN and Keras' Adam written directly in each
framework, with no Keras import, to measure what Keras' own step costs on top.

Each baseline file mirrors the others: the same public names in the same order, the
same section comments, so that diffing two of them shows only framework lines. Each
exposes `build(weights, lr, decay_steps=0, ema_momentum=None, label_smoothing=0.0) -> Baseline`, where
`weights` are in Keras' order and layout (`model.cnn.seeded_weights`): conv kernel (3,3,1,32) HWIO, conv bias
(32,), dense kernel (5408,128), dense bias (128,), output kernel (128,10), output bias
(10,). Images are float32 NHWC (N,28,28,1) in [0, 1], labels int32 (N,). With
ema_momentum, a baseline keeps Keras' exponential moving average of the weights
(`Adam(use_ema=True)`), and its trained weights (`get_weights`, `predict`) are the average,
as Keras puts the average in place when fit() ends. A Baseline's `train_step(images, labels)`
runs one step on a batch, its `train_steps(images, labels)` one step on each of a stack of
batches (steps, batch, ...) in one call, where Keras runs several steps per call
(steps_per_execution; Keras itself runs a graph loop of its step on TensorFlow, a Python
loop of its jitted step on JAX, and one step per call on torch). The baselines: a graph
loop of the step inside one `tf.function` (where XLA is on, it compiles only the step, as
Keras does; TensorFlow's `train_steps` therefore takes the compiled step), `lax.scan` inside
one jitted call,
a Python loop; both methods return the last loss unread.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, NamedTuple

BASELINE_MODULES = {
    "jax": "benchmarks.framework.jax_baseline",
    "tensorflow": "benchmarks.framework.tensorflow_baseline",
    "torch": "benchmarks.framework.torch_baseline",
}

# keras.optimizers.Adam's defaults; the baselines compute its update (torch's fused kernel up to rounding).
BETA_1 = 0.9
BETA_2 = 0.999
EPSILON = 1e-7
# keras.backend.epsilon(): Keras clips probabilities to [this, 1 - this] before the log.
PROBABILITY_EPSILON = 1e-7
# Predicting 10,000 images at once would hold a 0.9 GB conv activation.
PREDICT_BATCH_SIZE = 1000


class TrainState(NamedTuple):
    """Weights (Keras order), Adam's first and second moments, how many updates were
    done (what Keras' `optimizer.iterations` counts) and the weights' moving average
    (None without EMA)."""

    params: Any
    momentums: Any
    velocities: Any
    iterations: Any
    averages: Any = None


def load_baseline(backend: str) -> ModuleType:
    """The baseline file for `backend` ("jax", "tensorflow" or "torch")."""
    if backend not in BASELINE_MODULES:
        raise ValueError(
            f"Unsupported backend. Received: backend={backend!r}; valid: {', '.join(BASELINE_MODULES)}"
        )
    return importlib.import_module(BASELINE_MODULES[backend])
