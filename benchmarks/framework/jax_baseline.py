"""JAX baseline: the CNN and Keras' Adam written directly in JAX, no Keras.

One `jax.jit`-ed step whose weights and Adam state are donated, so XLA updates them in
place instead of allocating a second copy every step, and one running several steps in one
compiled call (`lax.scan`).

Measured on CPU (2 cores shared with other jobs, load average ~5, so absolute times
are inflated; compare within this table only). Variants ran interleaved in one
process, 10 steps at a time, so that the load hit them alike: per variant 30 warm-up
and 100 timed steps at batch 128, a device sync before every clock read; median (iqr),
ms/step. jax 0.10.2:
    pooling as reshape + max               79.6 (54-99)
    pooling as lax.reduce_window (stock)  192.7 (171-209)  2.4x slower
    pooling as a strided pairwise maximum  57.5 (45-70)   kept then: fastest, and what the
        Keras model's TiledMaxPooling2D does.
The convolution as one matrix product of the 3x3 patches (im2col) was tried too: faster
in isolation (conv, relu and their gradients: 18.4 -> 13.6 ms under load), but a whole
step was no faster (42.3 vs 41.7 ms, interleaved, quiet), so lax.conv stays.
Later (AVX-512 host, quiet, the jit-ed gradient from the convolution to a loss over the
dense layers alone, a one-off timing, median of 60 calls, not a results file): the strided
maximum over the full convolution 10.8 ms, the maximum of four stride-2 convolutions, one
per pooling offset (conv_relu_pool), 6.0 ms: kept, on CPUs. Then those four convolutions as
matrix products of their patches, with their own gradients (pooled_conv in
backends/jax_backend.py, which the Keras path calls too; its docstring has the timings).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from backends.jax_backend import pooled_conv
from backends.layers import pooled_conv_windows
from benchmarks.framework import BETA_1, BETA_2, EPSILON, PREDICT_BATCH_SIZE, PROBABILITY_EPSILON, TrainState

NAME = "jax"


# ---------------------------------------------------------------------- network


def conv_relu_pool(images, kernel, bias):
    """max_pool(relu(conv(images) + bias)) for a 2x2 pooling that tiles the "valid"
    convolution exactly, with the ReLU after the pooling and the bias, over a quarter of
    the values (the same numbers: max commutes with ReLU and with adding the same bias), as
    the Keras path computes it (conv_relu_pool in backends/jax_backend.py): on a CPU
    pooled_conv, the maximum of four stride-2 convolutions (one per pooling offset: the
    windows of backends/layers.py pooled_conv_windows) computed as matrix products,
    elsewhere the full convolution and its strided maximum."""
    if jax.default_backend() != "cpu" or pooled_conv_windows(images.shape, kernel.shape, 2) is None:
        features = jax.lax.conv_general_dilated(images, kernel, (1, 1), "VALID",
                                                dimension_numbers=("NHWC", "HWIO", "NHWC"))
        tiles = [features[:, row::2, column::2, :] for row in range(2) for column in range(2)]
        return jax.nn.relu(functools.reduce(jnp.maximum, tiles) + bias)
    return jax.nn.relu(pooled_conv(images, kernel, 2) + bias)


def forward(params, images):
    """Logits (N,10) of NHWC `images`."""
    conv_kernel, conv_bias, dense_kernel, dense_bias, output_kernel, output_bias = params
    x = conv_relu_pool(images, conv_kernel, conv_bias)
    # NHWC flatten, the order of Keras' channels_last Flatten, so dense_kernel fits as is.
    x = x.reshape(x.shape[0], -1)
    x = jax.nn.relu(x @ dense_kernel + dense_bias)
    return x @ output_kernel + output_bias


def cross_entropy(logits, labels, label_smoothing: float = 0.0):
    """Mean sparse categorical cross-entropy, as Keras computes it on JAX: from the
    softmax probabilities, renormalised and clipped, so a saturated softmax gives a
    bounded loss and no gradient."""
    probabilities = jax.nn.softmax(logits)
    probabilities = probabilities / jnp.sum(probabilities, axis=-1, keepdims=True)
    probabilities = jnp.clip(probabilities, PROBABILITY_EPSILON, 1.0 - PROBABILITY_EPSILON)
    if label_smoothing:
        # Keras' categorical form: (1 - s) on the label plus s / classes on every class.
        targets = jax.nn.one_hot(labels, logits.shape[-1]) * (1.0 - label_smoothing) + label_smoothing / logits.shape[-1]
        return -jnp.mean(jnp.sum(targets * jnp.log(probabilities), axis=-1))
    log_likelihood = jnp.take_along_axis(jnp.log(probabilities), labels[:, None].astype(jnp.int32), axis=-1)
    return -jnp.mean(log_likelihood)


def learning_rate(lr: float, decay_steps: int, iterations):
    """Keras' CosineDecay(lr, decay_steps) at `iterations` updates done (the count the
    optimizer passes to its schedule before incrementing), or `lr` when decay_steps=0."""
    if decay_steps <= 0:
        return jnp.float32(lr)
    fraction = jnp.minimum(iterations.astype(jnp.float32), jnp.float32(decay_steps)) / jnp.float32(decay_steps)
    return jnp.float32(lr) * (0.5 * (1.0 + jnp.cos(jnp.float32(np.pi) * fraction)))


def train_step(state: TrainState, images, labels, lr: float, decay_steps: int, ema_momentum: float | None,
               label_smoothing: float = 0.0):
    """One Adam step; returns (loss, new state)."""

    # Forward pass
    def compute_loss(params):
        return cross_entropy(forward(params, images), labels, label_smoothing)

    # Compute gradients
    loss, gradients = jax.value_and_grad(compute_loss)(state.params)

    # Update weights
    rate = learning_rate(lr, decay_steps, state.iterations)
    local_step = (state.iterations + 1).astype(jnp.float32)
    alpha = rate * jnp.sqrt(1 - jnp.float32(BETA_2) ** local_step) / (1 - jnp.float32(BETA_1) ** local_step)
    momentums = [m + (g - m) * (1 - BETA_1) for m, g in zip(state.momentums, gradients)]
    velocities = [v + (jnp.square(g) - v) * (1 - BETA_2) for v, g in zip(state.velocities, gradients)]
    params = [w - (m * alpha) / (jnp.sqrt(v) + EPSILON) for w, m, v in zip(state.params, momentums, velocities)]

    # Update the moving average (Keras: it starts as the first step's weights)
    averages = state.averages
    if ema_momentum is not None:
        momentum = jnp.where(state.iterations == 0, 0.0, ema_momentum).astype(jnp.float32)
        averages = [momentum * a + (1 - momentum) * w for a, w in zip(averages, params)]
    return loss, TrainState(params, momentums, velocities, state.iterations + 1, averages)


def train_steps(state: TrainState, images, labels, **settings):
    """One Adam step on each batch images[i], labels[i] in turn, as a loop inside one
    compiled call (`lax.scan`; Keras' steps_per_execution on JAX is a Python loop of its
    jitted step); returns (the last step's loss, new state)."""

    def step(state, batch):
        loss, state = train_step(state, *batch, **settings)
        return state, loss

    state, losses = jax.lax.scan(step, state, (images, labels))
    return losses[-1], state


# ---------------------------------------------------------------------- baseline


class Baseline:
    def __init__(self, state: TrainState, lr: float, decay_steps: int, ema_momentum: float | None,
                 label_smoothing: float = 0.0):
        self.state = state
        settings = {"lr": lr, "decay_steps": decay_steps, "ema_momentum": ema_momentum,
                    "label_smoothing": label_smoothing}
        # Donated: the step's outputs reuse the buffers of the state it consumed.
        self._step = jax.jit(functools.partial(train_step, **settings), donate_argnums=0)
        self._steps = jax.jit(functools.partial(train_steps, **settings), donate_argnums=0)
        self._predict = jax.jit(lambda params, images: jax.nn.softmax(forward(params, images)))

    def train_step(self, images, labels):
        """One Adam step on a batch; returns the loss, still on the device (no sync)."""
        loss, self.state = self._step(self.state, images, labels)
        return loss

    def train_steps(self, images, labels):
        """One Adam step on each batch of `images` (steps, batch, 28, 28, 1) and `labels`
        (steps, batch), all in one call; returns the last step's loss, still on the device."""
        loss, self.state = self._steps(self.state, images, labels)
        return loss

    def synchronize(self, value) -> None:
        # JAX dispatches asynchronously: block on the result before reading a clock.
        jax.block_until_ready(value)

    def loss_value(self, value) -> float:
        return float(value)

    def predict(self, images) -> np.ndarray:
        return np.concatenate([
            np.asarray(self._predict(self.trained_params(), images[start : start + PREDICT_BATCH_SIZE]))
            for start in range(0, len(images), PREDICT_BATCH_SIZE)
        ])

    def trained_params(self):
        """The weights training produced: the moving average with EMA on."""
        return self.state.params if self.state.averages is None else self.state.averages

    def get_weights(self) -> list[np.ndarray]:
        return [np.asarray(w) for w in self.trained_params()]

    def device_name(self) -> str:
        device = jax.devices()[0]
        return f"{device.platform}:{getattr(device, 'device_kind', device.platform)}"

    def peak_device_memory_mb(self) -> float | None:
        stats = jax.devices()[0].memory_stats() or {}
        peak = stats.get("peak_bytes_in_use")
        return None if peak is None else peak / 2**20


def build(weights: list[np.ndarray], lr: float, decay_steps: int = 0, ema_momentum: float | None = None,
          label_smoothing: float = 0.0) -> Baseline:
    """A baseline starting from `weights` (Keras order and layout) with Adam(lr), its
    learning rate on a cosine to 0 over `decay_steps` updates when decay_steps > 0, and
    a moving average of the weights with `ema_momentum`, and the cross-entropy against
    labels smoothed by `label_smoothing` (model/module.py sparse_crossentropy)."""
    params = [jnp.asarray(w, dtype=jnp.float32) for w in weights]
    state = TrainState(
        params=params,
        momentums=[jnp.zeros_like(w) for w in params],
        velocities=[jnp.zeros_like(w) for w in params],
        iterations=jnp.zeros((), dtype=jnp.int32),
        averages=None if ema_momentum is None else [jnp.zeros_like(w) for w in params],
    )
    return Baseline(state, lr, decay_steps, ema_momentum, label_smoothing)
