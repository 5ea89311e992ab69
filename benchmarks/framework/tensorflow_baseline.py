"""TensorFlow baseline: the CNN and Keras' Adam written directly in TensorFlow, no Keras.

One `tf.function` step over raw `tf.Variable`s, updated in place with `assign_*`, and one
running several steps as a graph loop of that step in one call (as Keras' steps_per_execution).
The step is compiled with XLA or not as the Keras path is on this machine (`default_jit_compile` in
backends/tensorflow_backend.py, by CPU), with the convolution and pooling that suit each,
as the Keras path computes them (`pooled_relu_conv` there): four strided convolutions and
their maximum under XLA on a CPU, the full convolution and TensorFlow's own MaxPool kernel
without XLA.

Measured on CPU (2 cores shared with other jobs, load average ~5, so absolute times
are inflated; compare within this table only). Variants ran interleaved in one
process, 10 steps at a time, so that the load hit them alike: per variant 30 warm-up
and 100 timed steps at batch 128, a device sync before every clock read; median (iqr),
ms/step. tensorflow 2.21.0:
    jit_compile=True,  reshape + reduce_max   59.1 (47-71)
    jit_compile=False, reshape + reduce_max  114.3 (100-133)  1.9x slower
    for reference, with tf.nn.max_pool2d: 193.8 (169-237) with XLA, 57.8 (48-73) without;
    with a strided pairwise maximum: 54.1 (42-71) with XLA (kept then: fastest, and what the
    Keras model's TiledMaxPooling2D does), 175.2 (158-215) without.
Later, under XLA on a CPU, four stride-2 convolutions (one per pooling offset) and their
maximum replaced the full convolution and its strided maximum (`pooled_relu_conv` in
backends/tensorflow_backend.py says why).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from backends.tensorflow_backend import default_jit_compile, pooled_relu_conv
from benchmarks.framework import BETA_1, BETA_2, EPSILON, PREDICT_BATCH_SIZE, TrainState

NAME = "tensorflow"
# The Keras path's choice on this machine (see the docstring).
JIT_COMPILE = default_jit_compile()


# ---------------------------------------------------------------------- network


def forward(params, images):
    """Logits (N,10) of NHWC `images`."""
    conv_kernel, conv_bias, dense_kernel, dense_bias, output_kernel, output_bias = params
    # The Keras path's own computation of the convolution, ReLU and pooling (XLA or not).
    x = pooled_relu_conv(images, conv_kernel, conv_bias, 2)
    # NHWC flatten, the order of Keras' channels_last Flatten, so dense_kernel fits as is.
    x = tf.reshape(x, (-1, x.shape[1] * x.shape[2] * x.shape[3]))
    x = tf.nn.relu(tf.matmul(x, dense_kernel) + dense_bias)
    return tf.matmul(x, output_kernel) + output_bias


def cross_entropy(logits, labels, label_smoothing: float = 0.0):
    """Mean sparse categorical cross-entropy, as Keras computes it on TensorFlow: from
    the logits. Keras' softmax leaves them on its output (`_keras_logits`) and its TF
    loss uses them, so unlike on JAX and torch nothing is clipped."""
    if label_smoothing:
        # Keras' categorical form: (1 - s) on the label plus s / classes on every class.
        targets = tf.one_hot(labels, logits.shape[-1]) * (1.0 - label_smoothing) + label_smoothing / logits.shape[-1]
        return tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(labels=targets, logits=logits))
    labels = tf.cast(labels, tf.int64)
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits))


def learning_rate(lr: float, decay_steps: int, iterations):
    """Keras' CosineDecay(lr, decay_steps) at `iterations` updates done (the count the
    optimizer passes to its schedule before incrementing), or `lr` when decay_steps=0."""
    if decay_steps <= 0:
        return tf.constant(lr, tf.float32)
    fraction = tf.minimum(tf.cast(iterations, tf.float32), float(decay_steps)) / float(decay_steps)
    return lr * (0.5 * (1.0 + tf.cos(np.pi * fraction)))


def train_step(state: TrainState, images, labels, lr: float, decay_steps: int, ema_momentum: float | None,
               label_smoothing: float = 0.0):
    """One Adam step; returns (loss, state), the state's variables updated in place."""

    # Forward pass
    with tf.GradientTape() as tape:
        loss = cross_entropy(forward(state.params, images), labels, label_smoothing)

    # Compute gradients
    gradients = tape.gradient(loss, state.params)

    # Update weights
    rate = learning_rate(lr, decay_steps, state.iterations)
    local_step = tf.cast(state.iterations + 1, tf.float32)
    alpha = rate * tf.sqrt(1 - tf.pow(BETA_2, local_step)) / (1 - tf.pow(BETA_1, local_step))
    for w, m, v, g in zip(state.params, state.momentums, state.velocities, gradients):
        m.assign_add((g - m) * (1 - BETA_1))
        v.assign_add((tf.square(g) - v) * (1 - BETA_2))
        w.assign_sub((m * alpha) / (tf.sqrt(v) + EPSILON))

    # Update the moving average (Keras: it starts as the first step's weights)
    if ema_momentum is not None:
        momentum = tf.cast(tf.not_equal(state.iterations, 0), tf.float32) * ema_momentum
        for a, w in zip(state.averages, state.params):
            a.assign(momentum * a + (1 - momentum) * w)
    state.iterations.assign_add(1)
    return loss, state


def train_steps(step, images, labels):
    """`step(images[i], labels[i])` on each batch in turn, as a graph loop inside one call
    (what Keras' steps_per_execution runs), where `step` is the compiled one-step function
    (Baseline's: under XLA only the step is compiled, as Keras compiles it, see there);
    returns the last step's loss. Unlike JAX's and torch's train_steps it takes the
    compiled step rather than the state and settings: the step must be its own
    `tf.function` for XLA to compile it alone, outside the loop."""
    loss = tf.constant(0.0)
    for i in tf.range(tf.shape(images)[0]):
        loss = step(images[i], labels[i])
    return loss


# ---------------------------------------------------------------------- baseline


class Baseline:
    def __init__(self, state: TrainState, lr: float, decay_steps: int, ema_momentum: float | None,
                 label_smoothing: float = 0.0, jit_compile: bool = JIT_COMPILE):
        self.state = state
        settings = {"lr": lr, "decay_steps": decay_steps, "ema_momentum": ema_momentum,
                    "label_smoothing": label_smoothing}
        # A tf.function returns the values of variables, not the variables: keep the loss only.
        self._step = tf.function(lambda images, labels: train_step(state, images, labels, **settings)[0],
                                 jit_compile=jit_compile, reduce_retracing=True)
        # The loop itself is never compiled by XLA, as in Keras' own multi-step function:
        # under XLA on an AVX2 CPU, 10 steps as one XLA program (its while loop) took 39.4
        # ms a step against 17.5 for this graph loop calling the XLA-compiled step (one
        # process, interleaved, 15 medians of 10 steps, batch 128; without XLA 28.8 and 28.5).
        self._steps = tf.function(lambda images, labels: train_steps(self._step, images, labels),
                                  reduce_retracing=True)
        self._predict = tf.function(lambda images: tf.nn.softmax(forward(self.trained_params(), images)),
                                    jit_compile=jit_compile, reduce_retracing=True)

    def train_step(self, images, labels):
        """One Adam step on a batch; returns the loss, still on the device (no sync)."""
        return self._step(images, labels)

    def train_steps(self, images, labels):
        """One Adam step on each batch of `images` (steps, batch, 28, 28, 1) and `labels`
        (steps, batch), all in one call; returns the last step's loss, still on the device."""
        return self._steps(images, labels)

    def synchronize(self, value) -> None:
        # Reading a tensor to host waits for the device to finish computing it.
        value.numpy()

    def loss_value(self, value) -> float:
        return float(value.numpy())

    def predict(self, images) -> np.ndarray:
        return np.concatenate([
            self._predict(images[start : start + PREDICT_BATCH_SIZE]).numpy()
            for start in range(0, len(images), PREDICT_BATCH_SIZE)
        ])

    def trained_params(self):
        """The weights training produced: the moving average with EMA on."""
        return self.state.params if self.state.averages is None else self.state.averages

    def get_weights(self) -> list[np.ndarray]:
        return [w.numpy() for w in self.trained_params()]

    def device_name(self) -> str:
        gpus = tf.config.list_logical_devices("GPU")
        return f"gpu:{gpus[0].name}" if gpus else "cpu"

    def peak_device_memory_mb(self) -> float | None:
        if not tf.config.list_logical_devices("GPU"):
            return None
        return tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20


def build(weights: list[np.ndarray], lr: float, decay_steps: int = 0, ema_momentum: float | None = None,
          label_smoothing: float = 0.0, jit_compile: bool | None = None) -> Baseline:
    """A baseline starting from `weights` (Keras order and layout) with Adam(lr), its
    learning rate on a cosine to 0 over `decay_steps` updates when decay_steps > 0, and
    a moving average of the weights with `ema_momentum`, and the cross-entropy against
    labels smoothed by `label_smoothing` (model/module.py sparse_crossentropy), its step
    compiled by XLA when `jit_compile` (None: as the Keras path on this machine); the loop
    of several steps a call is never compiled by XLA."""
    params = [tf.Variable(np.asarray(w, dtype=np.float32)) for w in weights]
    state = TrainState(
        params=params,
        momentums=[tf.Variable(tf.zeros_like(w)) for w in params],
        velocities=[tf.Variable(tf.zeros_like(w)) for w in params],
        iterations=tf.Variable(0, dtype=tf.int64),
        averages=None if ema_momentum is None else [tf.Variable(tf.zeros_like(w)) for w in params],
    )
    return Baseline(state, lr, decay_steps, ema_momentum, label_smoothing,
                    JIT_COMPILE if jit_compile is None else jit_compile)
