"""TensorFlow: a GradientTape step, as in keras.io's "Customizing what happens in fit()
with TensorFlow". Keras wraps it in tf.function (XLA when jit_compile is on)."""

from __future__ import annotations

import functools

import tensorflow as tf

NAME = "tensorflow"


# ---------------------------------------------------------------------- environment


def configure(deterministic: bool = False) -> None:
    if deterministic:
        tf.config.experimental.enable_op_determinism()
        tf.config.experimental.enable_tensor_float_32_execution(False)


def default_jit_compile(deterministic: bool = False) -> bool:
    # Keras' "auto" turns XLA off on CPU-only machines, but for this CNN with the strided
    # pooling XLA measured faster on CPU as well (37 vs 59+ ms/step at batch 128).
    # TF's op determinism does not cover every XLA kernel, so deterministic runs skip it.
    return not deterministic


def device_name() -> str:
    gpus = tf.config.list_logical_devices("GPU")
    return f"gpu:{gpus[0].name}" if gpus else "cpu"


def versions() -> dict:
    return {"tensorflow": tf.__version__}


def synchronize(value=None) -> None:
    # Eager TF returns finished tensors; reading one to host waits for the device.
    if value is not None:
        tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t, value)


def peak_device_memory_mb() -> float | None:
    if not tf.config.list_logical_devices("GPU"):
        return None
    return tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20


# ---------------------------------------------------------------------- layer kernels


def max_pool(inputs, pool_size: int):
    """Exact-tiling max pooling of NHWC `inputs` (TiledMaxPooling2D): the elementwise
    maximum of the pool_size**2 strided sub-grids. Under XLA the stock layer's gradient
    becomes select_and_scatter, a scalar loop nest on CPU; this one's is a compare-and-mask."""
    tiles = [inputs[:, row::pool_size, column::pool_size, :] for row in range(pool_size) for column in range(pool_size)]
    return functools.reduce(tf.maximum, tiles)


# ---------------------------------------------------------------------- steps


def train_step(module, data):
    images, labels = data[0], data[1]

    # Forward pass
    with tf.GradientTape() as tape:
        loss, probabilities, _ = module.training_step((images, labels))

    # Compute gradients
    gradients = tape.gradient(loss, module.trainable_variables)

    # Update weights
    module.optimizer.apply(gradients, module.trainable_variables)

    # Update metrics
    return _update_metrics(module, loss, labels, probabilities)


def test_step(module, data):
    images, labels = data[0], data[1]

    # Forward pass
    loss, probabilities, _ = module._common_step((images, labels), "test")

    # Update metrics
    return _update_metrics(module, loss, labels, probabilities)


def loss_and_gradients(module, batch):
    """Loss of one training batch and the gradient of every trainable variable."""

    # Forward pass
    with tf.GradientTape() as tape:
        loss, _, _ = module.training_step(batch)

    # Compute gradients
    gradients = tape.gradient(loss, module.trainable_variables)
    return loss, gradients


def _update_metrics(module, loss, labels, probabilities):
    # Keras' own trainers feed the loss tracker this way (it has no public setter).
    module._loss_tracker.update_state(loss, sample_weight=tf.shape(labels)[0])
    return module.compute_metrics(None, labels, probabilities)
