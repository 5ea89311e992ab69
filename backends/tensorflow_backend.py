"""TensorFlow: a GradientTape step, as in keras.io's "Customizing what happens in fit()
with TensorFlow". Keras wraps it in tf.function (XLA when jit_compile is on)."""

from __future__ import annotations

import contextlib
import functools
import itertools

import numpy as np
import tensorflow as tf
# What TensorFlow's own gradients use to tell an XLA-compiled function (no public API).
from tensorflow.python.ops import control_flow_util

from backends import KERAS_PREDICT, layers

NAME = "tensorflow"


# ---------------------------------------------------------------------- environment


def configure(deterministic: bool = False) -> None:
    if deterministic:
        tf.config.experimental.enable_op_determinism()
        tf.config.experimental.enable_tensor_float_32_execution(False)


def default_jit_compile(deterministic: bool = False) -> bool:
    """Whether Keras compiles the steps with XLA. Keras' "auto" turns XLA off on CPU-only
    machines; which is faster for this CNN depends on the CPU (measured, README's
    Benchmarks): on AVX-512 TensorFlow's own kernels (oneDNN, with its MaxPool), on
    AVX2 XLA with the strided pooling (the hand-written loop on an AVX2 host, 2026-12-08,
    one-off: 17.5 ms a step with its step under XLA, 28.5 without). GPUs keep XLA. TF's
    op determinism does not cover every XLA kernel, so deterministic runs skip it."""
    if deterministic:
        return False
    return bool(tf.config.list_physical_devices("GPU")) or not _cpu_has_avx512()


def _cpu_has_avx512(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether the CPU has AVX-512 (the kernel's `avx512f` flag; False where unreadable)."""
    try:
        with open(cpuinfo) as lines:
            flags = next((line for line in lines if line.startswith("flags")), "")
    except OSError:
        return False
    return "avx512f" in flags.split(":", 1)[-1].split()


def most_steps_per_execution() -> int:
    """The most training steps Keras may run per call of its step function (compile's
    steps_per_execution; the Trainer takes the largest that divides an epoch). Keras runs
    them as a graph loop inside one tf.function, so the per-step Python of the call, the
    logs and the callbacks is paid once per call. Measured on a 2-core AVX-512 CPU, 10 steps
    a call against 1: the keras-fit step 0.78x [0.71-0.92], time to 99% with the fast recipe
    0.93x [0.89-0.99] (`steps-per-execution-ab/`), the same weights bit for bit."""
    return 16


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


# ---------------------------------------------------------------------- data


def training_data(datamodule, first_epoch: int, stop_epoch: int):
    """What fit() is fed: the data module's batches of epochs first_epoch to stop_epoch - 1,
    as a tf.data pipeline that calls Python once per piece of whole batches (the pieces
    `datamodule.stream` makes ahead) and slices the batches natively: the same batches, in
    the same order, as the generator `datamodule.batches_from` JAX is fed (torch: as tensors).
    Keras' adapter for a generator (tf.data's from_generator, a Python call per batch)
    measured 38-41 ms/step against 21-23 for this, batch 128, CPU, jit_compile on."""
    image_shape, batch_size = (None, *datamodule.x_train.shape[1:]), datamodule.batch_size
    per_epoch = datamodule.pieces_per_epoch
    # Made ahead by the data module's background thread, in order; the Trainer stops it.
    streamed = datamodule.stream(first_epoch, stop_epoch).pieces()
    ahead = []  # a streamed piece beyond the one asked for, kept for its call

    def piece_arrays(number):
        wanted = (first_epoch + int(number) // per_epoch, int(number) % per_epoch)
        for epoch, index, images, labels in itertools.chain(ahead, streamed):
            ahead.clear()
            if (epoch, index) >= wanted:
                break
        else:
            epoch = index = None
        if (epoch, index) != wanted:  # not from the stream (tf.data started an iterator again)
            if epoch is not None:
                ahead.append((epoch, index, images, labels))
            images, labels = datamodule.epoch_piece(*wanted)
        return images.astype(np.float32, copy=False), labels.astype(np.int32, copy=False)

    def piece_batches(number):
        # stateful=False: the values are a function of `number` alone, from the stream or not.
        images, labels = tf.numpy_function(piece_arrays, [number], (tf.float32, tf.int32), stateful=False)
        images.set_shape(image_shape)
        labels.set_shape((None,))
        # The whole batches as slices of one reshaped tensor, one copy each, where batching
        # the piece's images copies them one at a time (0.31 -> 0.14 ms of CPU a batch on
        # tf.data's threads, one-off); the epoch's last piece may end in a partial batch.
        whole = tf.shape(labels)[0] // batch_size * batch_size
        batches = tf.data.Dataset.from_tensor_slices((tf.reshape(images[:whole], (-1, batch_size, *image_shape[1:])),
                                                      tf.reshape(labels[:whole], (-1, batch_size))))
        rest = tf.data.Dataset.from_tensor_slices((images[whole:], labels[whole:])).batch(batch_size)
        return batches.concatenate(rest)

    return tf.data.Dataset.range((stop_epoch - first_epoch) * per_epoch).flat_map(piece_batches).prefetch(2)


# ---------------------------------------------------------------------- optimizer


def fuse_optimizer(optimizer) -> None:
    """Nothing to do: Keras' per-weight optimizer updates (the weight average included) run
    inside the step's graph, fused by XLA where it compiles the step (default_jit_compile),
    as graph ops without per-op Python elsewhere."""


def fuse_loss_and_metrics(module) -> None:
    """Nothing to do: tf.function traces Keras' loss and metric updates into the step's graph,
    where their Python runs once."""


# ---------------------------------------------------------------------- layer kernels


def max_pool(inputs, pool_size: int):
    """Exact-tiling max pooling of NHWC `inputs` (TiledMaxPooling2D). Compiled by XLA: the
    elementwise maximum of the pool_size**2 strided sub-grids, because XLA lowers the stock
    op's gradient to select_and_scatter, a scalar loop nest on CPU, and this one's is a
    compare-and-mask. Otherwise (no jit_compile, eager): TensorFlow's own MaxPool kernel,
    whose gradient is a native kernel too, where the sub-grids would be separate ops."""
    if not control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()):
        return tf.nn.max_pool2d(inputs, pool_size, pool_size, "VALID")
    tiles = [inputs[:, row::pool_size, column::pool_size, :] for row in range(pool_size) for column in range(pool_size)]
    return functools.reduce(tf.maximum, tiles)


# ---------------------------------------------------------------------- forward pass


def calls_eagerly(images) -> bool:
    """Whether a model called on `images` runs its Python at every step: not in this
    project's steps (tf.function traces a step once, and Keras' `Layer.__call__` runs while
    tracing only; `run_eagerly`, which would run it every step, is not used)."""
    return False


def forward(network, images, training: bool = False):
    """`network(images, training=training)`, each layer's own `call` in turn and the ReLU
    convolution with its pooling as one call (backends/layers.py; tf.function traces it
    once). The same forward values, gradients within float32 rounding (tested)."""
    plain = isinstance(images, tf.Tensor) and images.dtype == tf.float32
    return layers.forward(network, images, training, conv_relu_pool, plain)


def conv_relu_pool(conv, pool_size: int, inputs):
    """max_pool(relu(conv(inputs) + bias)) of NHWC `inputs` for a biased ReLU Conv2D layer
    `conv`: pooled_relu_conv of its kernel and bias."""
    return pooled_relu_conv(inputs, conv.kernel.value, conv.bias.value, pool_size)


def pooled_relu_conv(inputs, kernel, bias, pool_size: int):
    """max_pool(relu(conv(inputs, kernel) + bias)) of NHWC `inputs`, a stride-1 "valid"
    convolution whose output pool_size tiles exactly, computed with the ReLU after the
    pooling (max commutes with ReLU and with adding the same bias: the same values), so the
    ReLU and its gradient run over a quarter of the values; the TF baseline calls it too.
    - Without XLA: the convolution, the bias as a vector (Keras adds it reshaped to 4-D) and
      TensorFlow's own MaxPool. On the AVX-512 host (shared, interleaved), the Keras step
      took 0.74x its own time with the vector bias alone, 0.71x with the ReLU moved too.
    - Compiled by XLA on a CPU: relu(max(conv_rc) + bias), conv_rc the stride-p convolution
      of the input window whose output is the full convolution's strided sub-grid (r, c)
      (pooled_conv_windows), as the JAX backend does: XLA's gradients of the four strided
      convolutions cost much less than the full one's plus its sub-grids'. A one-off
      timing on the AVX-512 host (the jit-compiled gradient from the convolution to a loss
      over the dense layers alone, median of 60 calls, not a results file): 10.0-11.0 ms ->
      7.0-7.8 ms; without XLA, the full convolution and MaxPool, 7.2-7.5 ms either way.
    - Compiled by XLA elsewhere (GPUs, not measured: none was lent): the full convolution
      and max_pool's strided sub-grids."""
    windows = pooled_conv_windows(inputs, kernel, pool_size)
    if windows is None:
        return tf.nn.relu(max_pool(tf.nn.conv2d(inputs, kernel, strides=1, padding="VALID") + bias, pool_size))
    tiles = [tf.nn.conv2d(inputs[:, rows, columns, :], kernel, strides=pool_size, padding="VALID")
             for rows, columns in windows]
    return tf.nn.relu(functools.reduce(tf.maximum, tiles) + bias)


def pooled_conv_windows(inputs, kernel, pool_size: int):
    """layers.pooled_conv_windows where the strided convolutions were measured faster: in
    a graph XLA compiles, with no GPU; else None. (The XLA check first: an eager step calls
    this at every step and stops there.)"""
    if not control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()) \
            or tf.config.list_physical_devices("GPU"):
        return None
    return layers.pooled_conv_windows(inputs.shape, kernel.shape, pool_size)


# ---------------------------------------------------------------------- serving


def predictor(model, fused_network):
    """(path, predict) serving the loaded network `model`: `model.predict_on_batch`, the
    stock layers in one compiled call; the fused network's pooling measured the same
    (one-off on the AVX2 host, batch 1024: 9,300 and 9,400 images/s); `fused_network` is
    not used."""
    return KERAS_PREDICT, model.predict_on_batch


# ---------------------------------------------------------------------- steps


def train_step(module, data):
    images, labels = data[0], data[1]

    # Forward pass
    with tf.GradientTape() as tape:
        loss, probabilities = module.training_step((images, labels))
        # Under MirroredStrategy the optimizer sums the replicas' gradients: each takes
        # its share of the mean, as Keras' own losses do (one replica: unchanged).
        replica_share = loss / tf.distribute.get_strategy().num_replicas_in_sync

    # Compute gradients
    gradients = tape.gradient(replica_share, module.trainable_variables)

    # Update weights
    module.optimizer.apply(gradients, module.trainable_variables)

    # Update metrics
    return _update_metrics(module, loss, labels, probabilities)


def test_step(module, data):
    images, labels = data[0], data[1]

    # Forward pass
    loss, probabilities = module.validation_step((images, labels))

    # Update metrics
    return _update_metrics(module, loss, labels, probabilities)


def loss_and_gradients(module, batch):
    """Loss of one training batch and the gradient of every trainable variable."""

    # Forward pass
    with tf.GradientTape() as tape:
        loss, _ = module.training_step(batch)

    # Compute gradients
    gradients = tape.gradient(loss, module.trainable_variables)
    return loss, gradients


def _update_metrics(module, loss, labels, probabilities):
    # Keras' own trainers feed the loss tracker this way (it has no public setter).
    module._loss_tracker.update_state(loss, sample_weight=tf.shape(labels)[0])
    return module.compute_metrics(None, labels, probabilities)


# ---------------------------------------------------------------------- data parallel


class DataParallel:
    """tf.distribute.MirroredStrategy: the module is built and compiled in its scope, and
    Keras' fit splits each global batch over the replicas and all-reduces the gradients.
    One machine only: MultiWorkerMirroredStrategy fails under Keras 3 (keras-team/keras#20585).
    (keras.distribution is a DTensor prototype on TensorFlow in Keras 3.15 and is ignored.)"""

    ENGINE = "tf.distribute.MirroredStrategy"

    def __init__(self, accelerator: str, devices: int, num_nodes: int = 1, node_rank: int = 0,
                 coordinator: str | None = None, timeout_s: float = 300.0):
        if num_nodes > 1:
            raise RuntimeError("TensorFlow cannot train on several machines with Keras 3 (keras-team/keras#20585)")
        gpus = tf.config.list_physical_devices("GPU") if accelerator != "cpu" else []
        if accelerator == "gpu" and len(gpus) < devices:
            raise RuntimeError(f"--devices {devices}: TensorFlow sees {len(gpus)} GPU(s); lower --devices")
        if gpus:
            names = [device.name for device in tf.config.list_logical_devices("GPU")][:devices]
        else:
            # N logical CPU devices over the one physical CPU; allowed only before TF starts.
            cpu = tf.config.list_physical_devices("CPU")[0]
            tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * devices)
            names = [device.name for device in tf.config.list_logical_devices("CPU")][:devices]
        self.device_names = names
        self.strategy = tf.distribute.MirroredStrategy(names)
        self.replicas = self.strategy.num_replicas_in_sync
        self.is_main = True

    def scope(self):
        return self.strategy.scope()

    def jit_compile(self, requested):
        # XLA cannot compile a step over mirrored variables on several devices ("Trying to
        # access resource ... located in device CPU:1 from device CPU:0", measured here).
        return False

    def steps_per_execution(self, requested: int) -> int:
        # Keras' graph loop of several steps over the strategy's distributed iterator fails
        # here ("You must feed a value for placeholder tensor 'while/body/.../Placeholder'",
        # measured with Keras 3.15 and TensorFlow 2.21): one step per call.
        return 1

    def replicate(self, module) -> None:
        """Nothing to wrap: variables made in the strategy's scope are mirrored."""

    def local_batches(self, batches):
        # tf.distribute cuts each global batch into per-replica batches itself.
        return batches

    def unsharded(self):
        # tf.distribute evaluates a last batch that does not split evenly as it is.
        return contextlib.nullcontext()

    def replica_difference(self, module) -> tuple[int, float]:
        """(copies of the weights, largest difference between any copy and the first)."""
        copies, worst = 1, 0.0
        for variable in module.network.weights:
            values = [value.numpy() for value in getattr(variable.value, "values", (variable.value,))]
            copies = max(copies, len(values))
            worst = max([worst] + [float(np.abs(value - values[0]).max()) for value in values])
        return copies, worst


def launch(function, args, config) -> int:
    """Run function(0, *args) here: MirroredStrategy drives every device from one process."""
    return function(0, *args)
