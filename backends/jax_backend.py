"""JAX: stateless steps (stateless_call, jax.value_and_grad, optimizer.stateless_apply),
as in keras.io's "Customizing what happens in fit() with JAX". Keras jit-compiles them."""

from __future__ import annotations

import contextlib
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from backends import KERAS_PREDICT, layers

NAME = "jax"


# ---------------------------------------------------------------------- environment


def configure(deterministic: bool = False) -> None:
    # XLA:CPU is deterministic already; on GPU, TF32 would change float32 matmuls.
    jax.config.update("jax_default_matmul_precision", "highest" if deterministic else None)


def default_jit_compile(deterministic: bool = False) -> bool:
    # Keras always compiles JAX steps; said here so every backend answers the question.
    return True


def most_steps_per_execution() -> int:
    """The most training steps Keras may run per call of its step function (compile's
    steps_per_execution; the Trainer takes the largest that divides an epoch). Keras' JAX
    trainer runs them as a Python loop of the compiled step: the callbacks, among them the
    loss read that waits for the step to end, run once per call, and the steps in between
    are dispatched while the previous one runs. Measured on a 2-core AVX-512 CPU: the
    keras-fit step 0.93x [0.75-1.09], not significant (`steps-per-execution-ab/`), with
    the same weights bit for bit; kept for the dispatch ahead, which should matter most
    for a GPU's short steps (not measured: no GPU was lent)."""
    return 16


def device_name() -> str:
    device = jax.devices()[0]
    return f"{device.platform}:{getattr(device, 'device_kind', device.platform)}"


def versions() -> dict:
    import jaxlib

    return {"jax": jax.__version__, "jaxlib": jaxlib.__version__}


def synchronize(value=None) -> None:
    # JAX dispatches asynchronously: block on the last result before reading a clock.
    if value is not None:
        jax.block_until_ready(value)
    else:
        jax.effects_barrier()


def peak_device_memory_mb() -> float | None:
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**20


# ---------------------------------------------------------------------- data


def training_data(datamodule, first_epoch: int, stop_epoch: int):
    """What fit() is fed: the data module's batches of epochs first_epoch to stop_epoch - 1,
    as a Python generator (Keras moves each batch to the device as it comes)."""
    return datamodule.batches_from(first_epoch, stop_epoch)


# ---------------------------------------------------------------------- optimizer


def fuse_optimizer(optimizer) -> None:
    """Nothing to do: XLA fuses Keras' per-weight optimizer updates (the weight average
    included) into the compiled step."""


def fuse_loss_and_metrics(module) -> None:
    """Nothing to do: jax.jit traces Keras' loss and metric updates into the compiled step, where
    their Python runs once."""


# ---------------------------------------------------------------------- layer kernels


def max_pool(inputs, pool_size: int):
    """Exact-tiling max pooling of NHWC `inputs` (TiledMaxPooling2D): the elementwise
    maximum of the pool_size**2 strided sub-grids. Why: XLA:CPU lowers the stock layer's
    gradient (of reduce_window) to select_and_scatter, a scalar loop nest; this one's is a
    compare-and-mask (the step times: benchmarks/results, keras-fit vs keras-fit-stock)."""
    tiles = [inputs[:, row::pool_size, column::pool_size, :] for row in range(pool_size) for column in range(pool_size)]
    return functools.reduce(jnp.maximum, tiles)


# ---------------------------------------------------------------------- forward pass


def calls_eagerly(images) -> bool:
    """Whether a model called on `images` runs its Python at every step: not in this
    project's steps (jax.jit traces a step once, and Keras' `Layer.__call__` runs while
    tracing only; `run_eagerly`, which would run it every step, is not used)."""
    return False


def forward(network, images, training: bool = False):
    """`network(images, training=training)`, each layer's own `call` in turn and the ReLU
    convolution with its pooling as one call (backends/layers.py; jax.jit traces it once).
    The same forward values, gradients within float32 rounding (tested)."""
    plain = isinstance(images, jax.Array) and images.dtype == jnp.float32
    return layers.forward(network, images, training, conv_relu_pool, plain)


def conv_relu_pool(conv, pool_size: int, inputs):
    """max_pool(relu(conv(inputs) + bias)) of NHWC `inputs`, with the ReLU after the
    pooling and the bias (max commutes with both: the same values), so that the ReLU, the
    bias and their gradients run over a quarter of the values. On a CPU, the pooled
    convolution is `pooled_conv` (matrix products of the input's patches): the full
    convolution is never made. Elsewhere (GPUs, not measured: none was lent), and for
    shapes the pooling does not tile exactly, Keras' own convolution and max_pool."""
    kernel = conv.kernel.value
    windows = layers.pooled_conv_windows(inputs.shape, kernel.shape, pool_size) if on_cpu() else None
    if windows is None:
        import keras

        features = keras.ops.conv(inputs, kernel, padding="valid", data_format="channels_last")
        return jax.nn.relu(max_pool(features + conv.bias.value, pool_size))
    return jax.nn.relu(pooled_conv(inputs, kernel, pool_size) + conv.bias.value)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def pooled_conv(inputs, kernel, pool_size: int):
    """max_pool(conv(inputs, kernel), pool_size) of NHWC `inputs`, for a stride-1 "valid"
    convolution whose output pool_size tiles exactly (layers.pooled_conv_windows is not
    None): the elementwise maximum of the pool_size**2 tiles, tile (r, c) the stride-p
    convolution of the input window whose output is the full convolution's strided
    sub-grid (r, c), each computed as `conv_as_product`.

    Forward values: the stock layers' exactly where XLA:CPU computes matrix products with
    Eigen, as this project's XLA flags have it (backends.FRAMEWORK_FLAGS): Eigen's product
    and its convolution sum each output's kernel taps in the same order (tested against the
    stock network), for this CNN's 9 taps on AVX2 and AVX-512 hosts alike; a shape with 75
    taps (3 channels, 5x5) differed by about one float32 ulp on an AVX2 host. Gradients:
    `pooled_conv_gradients` (reverse mode only: a custom_vjp has no forward-mode rule, so
    jax.jvp and jax.jacfwd through it are refused).

    Why: XLA:CPU's convolutions of this CNN (one input channel) ran at ~17 GFLOP/s, 0.7 ms
    per stride-2 tile, and their kernel gradients as convolutions too. One-off timings on
    the AVX-512 host (the jit-compiled gradient from the convolution to a loss over the
    dense layers, medians of 15 x 20 calls, not results files): 9.2-10.3 ms with the four
    stride-2 convolutions and their own gradients, 8.2-9.4 with these gradients, 6.8-6.9
    with the products forward as well (and Eigen's products, 3.3 ms of it the dense layers'
    part against 3.6-3.7 with YNNPACK's)."""
    return _pooled_conv_forward(inputs, kernel, pool_size)[0]


def conv_as_product(inputs, kernel, stride: int):
    """keras.ops.conv(inputs, kernel, strides=stride, padding="valid") of NHWC inputs as
    one matrix product, conv_patches(inputs, ...) @ kernel.reshape(-1, out)."""
    patches = conv_patches(inputs, kernel.shape[0], kernel.shape[1], stride)
    rows, columns = (inputs.shape[1] - kernel.shape[0]) // stride + 1, (inputs.shape[2] - kernel.shape[1]) // stride + 1
    return (patches @ kernel.reshape(-1, kernel.shape[-1])).reshape(inputs.shape[0], rows, columns, kernel.shape[-1])


def conv_patches(inputs, kernel_height: int, kernel_width: int, stride: int):
    """The patches a "valid" stride-`stride` convolution of NHWC `inputs` multiplies by a
    (kernel_height, kernel_width, in, out) kernel: one row per output position (batch,
    row, column), its taps in the order of the kernel reshaped to (-1, out)."""
    rows = (inputs.shape[1] - kernel_height) // stride + 1
    columns = (inputs.shape[2] - kernel_width) // stride + 1
    taps = [inputs[:, row : row + stride * (rows - 1) + 1 : stride, column : column + stride * (columns - 1) + 1 : stride, :]
            for row in range(kernel_height) for column in range(kernel_width)]
    return jnp.stack(taps, axis=3).reshape(-1, kernel_height * kernel_width * inputs.shape[3])


def _pooled_conv_forward(inputs, kernel, pool_size: int):
    windows = layers.pooled_conv_windows(inputs.shape, kernel.shape, pool_size)
    if windows is None:
        raise ValueError(f"pooled_conv needs a 'valid' convolution output that pool_size={pool_size} tiles exactly; "
                         f"got inputs of shape {tuple(inputs.shape)} and a kernel of shape {tuple(kernel.shape)}. "
                         "Use keras.ops.conv and keras.ops.max_pool for these shapes.")
    tiles = [conv_as_product(inputs[:, rows, columns, :], kernel, pool_size) for rows, columns in windows]
    pooled = functools.reduce(jnp.maximum, tiles)
    return pooled, (inputs, kernel, tiles, pooled)


def pooled_conv_gradients(pool_size: int, residuals, gradient):
    """pooled_conv's gradients (inputs', kernel's) for the pooled output's `gradient`,
    each output's going to the first tile (in pooled_conv_windows' order) that holds its
    maximum, as keras.layers.MaxPooling2D's does: the kernel's conv_patches(window)^T @
    the tile's gradient, summed over the tiles; the inputs' through each product's own
    gradient (XLA drops it where the inputs are data, as the network's images are).
    TiledMaxPooling2D's `max_pool` above, a chain of maxima, splits the gradient among
    equal maxima instead; where equal maxima come from equal patches, as in the images'
    blank background, the kernel's gradient is the same either way."""
    inputs, kernel, tiles, pooled = residuals
    windows = layers.pooled_conv_windows(inputs.shape, kernel.shape, pool_size)
    taken = jnp.zeros(pooled.shape, bool)
    inputs_gradient, kernel_gradient = jnp.zeros_like(inputs), jnp.zeros(kernel.shape, kernel.dtype)
    for (rows, columns), tile in zip(windows, tiles):
        first = (tile == pooled) & ~taken
        taken = taken | first
        tile_gradient = jnp.where(first, gradient, 0.0)
        window = inputs[:, rows, columns, :]
        patches = conv_patches(window, kernel.shape[0], kernel.shape[1], pool_size)
        kernel_gradient += (patches.T @ tile_gradient.reshape(-1, kernel.shape[-1])).reshape(kernel.shape)
        _, window_vjp = jax.vjp(lambda window: conv_as_product(window, kernel, pool_size), window)
        inputs_gradient = inputs_gradient.at[:, rows, columns, :].add(window_vjp(tile_gradient)[0])
    return inputs_gradient, kernel_gradient


pooled_conv.defvjp(_pooled_conv_forward, pooled_conv_gradients)


def on_cpu() -> bool:
    """Whether JAX computes on the CPU (its default backend)."""
    return jax.default_backend() == "cpu"


# ---------------------------------------------------------------------- serving


def predictor(model, fused_network):
    """(path, predict) serving the loaded network `model`: `model.predict_on_batch`, one
    XLA-compiled forward of the stock layers, the fastest measured here (one-off on the
    AVX2 host, batch 1024: 29,800 images/s, against 7,300 for the fused network's
    pooling); `fused_network` is not used."""
    return KERAS_PREDICT, model.predict_on_batch


# ---------------------------------------------------------------------- steps


def train_step(module, state, data):
    trainable, non_trainable, optimizer_state, metrics_state = state
    images, labels = data[0], data[1]

    # Forward pass
    def compute_loss(trainable, non_trainable):
        probabilities, non_trainable = module.stateless_call(trainable, non_trainable, images, training=True)
        loss, probabilities = module.training_step((images, labels), probabilities)
        return loss, (probabilities, non_trainable)

    # Compute gradients
    grad_fn = jax.value_and_grad(compute_loss, has_aux=True)
    (loss, (probabilities, non_trainable)), gradients = grad_fn(trainable, non_trainable)

    # Update weights
    trainable, optimizer_state = module.optimizer.stateless_apply(optimizer_state, gradients, trainable)

    # Update metrics
    logs, metrics_state = _update_metrics(module, metrics_state, loss, labels, probabilities)
    return logs, (trainable, non_trainable, optimizer_state, metrics_state)


def test_step(module, state, data):
    trainable, non_trainable, metrics_state = state
    images, labels = data[0], data[1]

    # Forward pass
    probabilities, non_trainable = module.stateless_call(trainable, non_trainable, images, training=False)
    loss, probabilities = module.validation_step((images, labels), probabilities)

    # Update metrics
    logs, metrics_state = _update_metrics(module, metrics_state, loss, labels, probabilities)
    return logs, (trainable, non_trainable, metrics_state)


def loss_and_gradients(module, batch):
    """Loss of one training batch and the gradient of every trainable variable."""
    trainable = [variable.value for variable in module.trainable_variables]
    non_trainable = [variable.value for variable in module.non_trainable_variables]

    # Forward pass
    def compute_loss(trainable):
        probabilities, _ = module.stateless_call(trainable, non_trainable, batch[0], training=True)
        return module.training_step(batch, probabilities)[0]

    # Compute gradients
    loss, gradients = jax.value_and_grad(compute_loss)(trainable)
    return loss, gradients


def _update_metrics(module, metrics_state, loss, labels, probabilities):
    import keras

    # Keras' metrics are stateful objects; a stateless scope lets them run on JAX values.
    mapping = list(zip(module.metrics_variables, metrics_state))
    with keras.StatelessScope(state_mapping=mapping) as scope:
        # Keras' own trainers feed the loss tracker this way (it has no public setter).
        module._loss_tracker.update_state(loss, sample_weight=labels.shape[0])
        logs = module.compute_metrics(None, labels, probabilities)
    metrics_state = [scope.get_current_value(v) for v in module.metrics_variables]
    return logs, metrics_state


# ---------------------------------------------------------------------- data parallel


class DataParallel:
    """keras.distribution.DataParallel: Keras' fit shards each global batch over the
    devices and keeps weights, optimizer and metric state replicated; XLA inserts the
    all-reduce. Several machines: one process each, joined by keras.distribution.initialize."""

    ENGINE = "keras.distribution.DataParallel"

    def __init__(self, accelerator: str, devices: int, num_nodes: int = 1, node_rank: int = 0,
                 coordinator: str | None = None, timeout_s: float = 300.0):
        import keras

        if num_nodes > 1:
            # Not reachable from train.py yet (model/devices.py refuses it): on 2 local
            # processes the steps ran, but saving from rank 0 alone hangs in Keras'
            # gather of weights that span processes. Every process must join before the first collective: the coordinator (node
            # rank 0) waits for the others (jax.distributed.initialize).
            keras.distribution.initialize(coordinator, num_processes=num_nodes, process_id=node_rank)
        platform = {"auto": None, "cpu": "cpu", "gpu": "gpu"}[accelerator]
        found = keras.distribution.list_devices(platform)
        wanted = devices * num_nodes
        if len(found) < wanted:
            raise RuntimeError(f"--devices {devices} --num-nodes {num_nodes}: JAX sees {len(found)} "
                               f"{accelerator if platform else ''} device(s) ({', '.join(found)}); "
                               "on CPU set --accelerator cpu, on GPU lower --devices")
        self.device_names = found[:wanted]
        self.distribution = keras.distribution.DataParallel(devices=self.device_names)
        # local_batches gives each process its rows of the global batch already.
        self.distribution.auto_shard_dataset = False
        # Before the module is built: its variables take the distribution's (replicated) layout.
        keras.distribution.set_distribution(self.distribution)
        self.replicas = wanted
        self.is_main = jax.process_index() == 0

    def scope(self):
        return contextlib.nullcontext()

    def jit_compile(self, requested):
        return requested

    def steps_per_execution(self, requested: int) -> int:
        return requested

    def replicate(self, module) -> None:
        """Nothing to wrap: set_distribution already laid the variables out."""

    def local_batches(self, batches):
        """This process's rows of each global batch (all of them on one machine): Keras
        cuts them into per-device shards itself (jax.make_array_from_process_local_data)."""
        processes, index = jax.process_count(), jax.process_index()
        for images, labels in batches:
            size = len(labels) // processes
            yield images[index * size:(index + 1) * size], labels[index * size:(index + 1) * size]

    @contextlib.contextmanager
    def unsharded(self):
        """Evaluation with the distribution off: the replicated weights run on whole,
        unsharded batches, so a last batch that does not split over the devices (5,000
        validation images) is evaluated as it is (a sharded one raises IndivisibleError)."""
        import keras

        keras.distribution.set_distribution(None)
        try:
            yield
        finally:
            keras.distribution.set_distribution(self.distribution)

    def replica_difference(self, module) -> tuple[int, float]:
        """(copies of the weights, largest difference between any copy and the first)."""
        copies, worst = 1, 0.0
        for variable in module.network.weights:
            shards = [np.asarray(shard.data) for shard in variable.value.addressable_shards]
            copies = max(copies, len(shards))
            worst = max([worst] + [float(np.abs(shard - shards[0]).max()) for shard in shards])
        return copies, worst


def launch(function, args, config) -> int:
    """Run function(0, *args) here: JAX drives every local device from one process
    (several machines: this command once on each, with its --node-rank)."""
    return function(0, *args)
