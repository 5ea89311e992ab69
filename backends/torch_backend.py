"""PyTorch: a loss.backward() step under zero_grad(), as in keras.io's "Customizing what
happens in fit() with PyTorch". Runs eagerly (torch.compile only with jit_compile)."""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
import socket
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from backends import KERAS_PREDICT, layers

NAME = "torch"


# ---------------------------------------------------------------------- environment


def configure(deterministic: bool = False) -> None:
    if deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


def default_jit_compile(deterministic: bool = False) -> bool:
    # torch.compile measured slower here: 56 ms/step after a 108 s compile vs 50 eager, and
    # again after the channels_last pooling, 56.6 vs 27-30 eager (dynamo hit its recompile limit).
    return False


def most_steps_per_execution() -> int:
    """The most training steps Keras may run per call of its step function (compile's
    steps_per_execution): Keras' torch trainer takes only 1."""
    return 1


def device_name() -> str:
    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(0)}"
    return "cpu"


def versions() -> dict:
    return {"torch": torch.__version__}


def synchronize(value=None) -> None:
    # CUDA kernels run asynchronously: wait for them before reading a clock.
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_device_memory_mb() -> float | None:
    if not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated() / 2**20


# ---------------------------------------------------------------------- data


def training_data(datamodule, first_epoch: int, stop_epoch: int):
    """What fit() is fed: the data module's batches of epochs first_epoch to stop_epoch - 1,
    as a Python generator of CPU tensors sharing the batches' memory (Keras moves each batch
    to the device as it comes). Why tensors: Keras turns a numpy batch into a tensor through
    np.array(batch), a copy of every batch (`keras.src.backend.torch.core.convert_to_tensor`),
    and passes a tensor through (the feed's 0.30 -> 0.20 ms a step in fit, one-off)."""
    with contextlib.closing(datamodule.batches_from(first_epoch, stop_epoch)) as batches:
        for images, labels in batches:
            yield torch.from_numpy(images), torch.from_numpy(labels)


# ---------------------------------------------------------------------- optimizer


def fuse_optimizer(optimizer) -> None:
    """Replace three of `optimizer`'s eager Python paths (two per-weight loops and the
    learning-rate schedule) with fused kernels or host arithmetic, on this instance only
    (a subclass would lose Keras' `_foreach` Adam on torch, which `TorchOptimizer.__new__`
    picks for the exact Adam class only); nothing is saved differently.

    - Adam's update (plain Adam, weights on the CPU): torch's fused Adam kernel
      (`torch._fused_adam_`, what `torch.optim.Adam(fused=True)` runs, and the torch
      baseline), one pass over each weight, where Keras' `_foreach` form makes nine (on
      the CPU each `_foreach` op is one kernel per weight: 57 ops a step). Keras adds
      epsilon to sqrt(v) before the bias correction, torch after it: epsilon /
      sqrt(1 - beta_2**t) makes the two the same update, within float32 rounding (tested).
      The step count is read on the host, which costs nothing on the CPU; on a GPU it would
      wait for the device, so GPU weights keep Keras' update.
    - The moving average of the weights (Adam use_ema): Keras' own formula, momentum *
      average + (1 - momentum) * weight with momentum 0 on the first update, as `_foreach`
      kernels for all weights, where Keras runs five eager ops per weight (2.3 of the 5.6 ms
      of an Adam step here, against 0.3 ms fused). On the CPU one lerp per weight with the
      momentum read on the host; on a GPU the momentum stays on the device: no host sync.
    - The learning rate of a Keras CosineDecay schedule (warm-up included), weights on the
      CPU: its formula in float32 numpy from the count read on the host, where Keras runs
      it as a dozen eager scalar ops (0.27 ms a step in fit); Keras' values exactly
      (tested). On a GPU the count stays on the device, and a schedule set on the
      optimizer later is not this one: Keras' schedule runs."""
    schedule = optimizer._learning_rate
    host_rate = _host_learning_rate(schedule)
    if host_rate is not None:
        keras_rate = optimizer._get_current_learning_rate

        def current_learning_rate():
            count = optimizer.iterations.value
            if count.device.type != "cpu" or optimizer._learning_rate is not schedule:
                return keras_rate()
            return host_rate(int(count))

        optimizer._get_current_learning_rate = current_learning_rate
    if _plain_adam(optimizer):
        keras_update = optimizer._parallel_update_step

        def update_step(grads, variables, learning_rate):
            weights = [variable.value for variable in variables]
            if weights[0].device.type != "cpu":
                return keras_update(grads, variables, learning_rate)
            index = optimizer._get_variable_index
            momentums = [optimizer._momentums[index(variable)].value for variable in variables]
            velocities = [optimizer._velocities[index(variable)].value for variable in variables]
            # Keras' count, in float32 as Keras computes the bias corrections.
            step = np.float32(int(optimizer.iterations.value) + 1)
            epsilon = np.float32(optimizer.epsilon) / np.sqrt(np.float32(1) - np.float32(optimizer.beta_2) ** step)
            steps = [torch.full((), float(step))] * len(weights)
            torch._fused_adam_(weights, list(grads), momentums, velocities, [], steps, lr=float(learning_rate),
                               beta1=float(optimizer.beta_1), beta2=float(optimizer.beta_2), weight_decay=0.0,
                               eps=float(epsilon), amsgrad=False, maximize=False)

        optimizer._parallel_update_step = update_step
    if not getattr(optimizer, "use_ema", False):
        return

    def update_moving_average(variables):
        pairs = [(average.value, variable.value)
                 for variable, average in zip(variables, optimizer._model_variables_moving_average)
                 if average is not None]
        if not pairs:
            return
        averages, weights = [average for average, _ in pairs], [weight for _, weight in pairs]
        if weights[0].device.type == "cpu":
            # The count read on the host (free on the CPU) and one lerp kernel per weight:
            # average + (1 - momentum) * (weight - average), one pass where the form below
            # makes three (0.39 -> 0.17 ms a step in fit); the same values within float32
            # rounding (tested), exactly the weights on the first update.
            momentum = np.float32(optimizer.ema_momentum if int(optimizer.iterations.value) else 0.0)
            torch._foreach_lerp_(averages, weights, float(np.float32(1) - momentum))
            return
        momentum = (optimizer.iterations.value != 0).to(torch.float32) * optimizer.ema_momentum
        torch._foreach_mul_(averages, momentum)
        torch._foreach_add_(averages, torch._foreach_mul(weights, 1 - momentum))

    optimizer._update_model_variables_moving_average = update_moving_average


def _host_learning_rate(schedule):
    """Keras' CosineDecay `schedule` as a function of the update count, computed on the host
    in float32 in the order Keras computes it (keras/src/optimizers/schedules/
    learning_rate_schedule.py); None for any other learning rate, and for a CosineDecay
    that Keras computes in another dtype (an int initial rate: int32; floatx float64)."""
    from keras import ops
    from keras.src.optimizers.schedules.learning_rate_schedule import CosineDecay

    if type(schedule) is not CosineDecay:
        return None
    if ops.convert_to_tensor(schedule.initial_learning_rate).dtype != torch.float32:
        return None
    f32 = np.float32
    initial, decay_steps = f32(schedule.initial_learning_rate), f32(schedule.decay_steps)
    # Keras multiplies its float32 tensors by these Python floats.
    kept, floor = f32(1 - schedule.alpha), f32(schedule.alpha)

    def decayed(step, start):
        # torch's cosine, which Keras' runs: numpy's rounds differently in 1 value of 20.
        angle = f32(np.pi) * (step / decay_steps)
        cosine = f32(0.5) * (f32(1) + f32(torch.cos(torch.tensor(angle, dtype=torch.float32)).item()))
        return start * (kept * cosine + floor)

    if schedule.warmup_target is None:
        return lambda count: decayed(min(f32(count), decay_steps), initial)
    target, warmup_steps = f32(schedule.warmup_target), f32(schedule.warmup_steps)

    def rate(count):
        step = min(f32(count), decay_steps + warmup_steps)
        if step < warmup_steps:
            return (target - initial) * (step / warmup_steps) + initial
        return decayed(step - warmup_steps, target)

    return rate


def fuse_loss_and_metrics(module) -> None:
    """Replace the eager Python around the step's loss and metrics with the same torch ops
    called directly, on this module and its metrics' instances only; nothing is saved
    differently. Keras' ops on torch convert and check every argument, and its loss and
    metric wrappers flatten structures and open scopes, at every step (one-off on an AVX2
    host, batch 128: compile's loss 0.44-0.48 ms against 0.14-0.18 fused; the loss
    tracker's update 0.11-0.22 against 0.03; compute_metrics 0.33-0.46 against 0.12-0.13).

    - The loss (`module.compute_loss`, where the module's class keeps Keras' own), where it
      is the module's own smoothed cross-entropy (`module.compiled_label_smoothing()`), for a
      non-empty batch with no sample weights and no loss added by a layer:
      `smoothed_crossentropy`, Keras' torch ops in Keras' order, so the same loss and
      gradients bit for bit (tested). Any other call runs Keras' compute_loss.
    - The loss tracker's update (`keras.metrics.Mean`, fed the loss and the batch size) and
      `module.compute_metrics` (where the class keeps Keras' own) with its one compiled
      metric, `SparseCategoricalAccuracy`: each total and count added to in place, each
      result Keras' total / count (0 while the count is 0). Keras' values exactly (tested);
      any other form (sample weights, masks, other metrics, a module compiled again since)
      runs Keras' code, which also builds the compiled metrics on the first step."""
    from keras.src.trainers.trainer import Trainer

    label_smoothing = module.compiled_label_smoothing()
    if label_smoothing is not None and type(module).compute_loss is Trainer.compute_loss:
        loss, keras_loss = module.loss, module.compute_loss

        def compute_loss(x=None, y=None, y_pred=None, sample_weight=None, training=True):
            if (sample_weight is None and module.loss is loss and _plain_tensor(y_pred) and len(y_pred)
                    and isinstance(y, torch.Tensor) and not module.losses):
                return smoothed_crossentropy(y, y_pred, label_smoothing)
            return keras_loss(x, y, y_pred, sample_weight, training=training)

        module.compute_loss = compute_loss
    tracker, keras_tracker_update = module._loss_tracker, module._loss_tracker.update_state

    def update_loss_tracker(values, sample_weight=None):
        if not (_plain_tensor(values) and values.ndim == 0 and isinstance(sample_weight, int)):
            return keras_tracker_update(values, sample_weight=sample_weight)
        with torch.no_grad():
            tracker.total.value.add_(values.detach() * torch.tensor(float(sample_weight)))
            tracker.count.value.add_(float(sample_weight))

    tracker.update_state = update_loss_tracker
    if type(module).compute_metrics is not Trainer.compute_metrics:
        return
    keras_metrics = module.compute_metrics

    def compute_metrics(x, y, y_pred, sample_weight=None):
        accuracy = _only_accuracy(module)
        if accuracy is None or module._loss_tracker is not tracker or sample_weight is not None \
                or not _plain_tensor(y_pred) or y_pred.ndim != 2 or not isinstance(y, torch.Tensor) \
                or y.shape != y_pred.shape[:1] or y.dtype.is_floating_point:
            return keras_metrics(x, y, y_pred, sample_weight=sample_weight)
        with torch.no_grad():
            matches = (torch.argmax(y_pred, dim=-1) == y).to(torch.float32)
            accuracy.total.value.add_(torch.sum(matches))
            accuracy.count.value.add_(float(matches.shape[0]))
            return {metric.name: _mean_result(metric) for metric in (tracker, accuracy)}

    module.compute_metrics = compute_metrics


def _plain_tensor(value) -> bool:
    """A float32 torch tensor with values (not Keras' shape-only meta tensors) and no Keras
    mask, outside a stateless or symbolic scope (where Keras only records updates): the
    form the fused paths take."""
    from keras.src.backend import get_keras_mask
    from keras.src.backend.common.stateless_scope import in_stateless_scope
    from keras.src.backend.common.symbolic_scope import in_symbolic_scope

    return (isinstance(value, torch.Tensor) and value.dtype == torch.float32 and value.device.type != "meta"
            and get_keras_mask(value) is None and not in_stateless_scope() and not in_symbolic_scope())


def _only_accuracy(module):
    """The module's one compiled metric when its metrics are the loss tracker and a built
    `SparseCategoricalAccuracy` alone (what CNNModule.configure compiles), else None."""
    from keras.metrics import SparseCategoricalAccuracy

    compiled = module._compile_metrics
    if compiled is None or not compiled.built or module.metrics != [module._loss_tracker, compiled]:
        return None
    metrics = compiled.metrics
    if len(metrics) != 1 or type(metrics[0]) is not SparseCategoricalAccuracy or metrics[0].dtype != "float32":
        return None
    return metrics[0]


def _mean_result(metric):
    """A keras.metrics.Mean's result(): Keras' divide_no_nan of its total by its count (0
    while the count is 0; the division's inf or nan there is not selected)."""
    total, count = metric.total.value, metric.count.value
    return torch.where(count == 0, 0, total / count)


def smoothed_crossentropy(labels, probabilities, label_smoothing: float):
    """The mean over a non-empty batch of the categorical cross-entropy of `probabilities` against
    one-hot `labels` smoothed by `label_smoothing` (model/module.py sparse_crossentropy,
    reduced as Keras' loss reduces it): Keras' own torch ops, in its order
    (`keras.src.backend.torch.nn.one_hot` and `categorical_crossentropy`,
    `keras.losses.categorical_crossentropy`'s smoothing, `Loss`'s sum over the batch size)
    for labels in 0..classes-1 (Keras rounds them through float32: the same below 2**24;
    torch's one_hot refuses a negative label, to which Keras' gives a row of zeros)."""
    from keras import config

    classes = probabilities.shape[-1]
    targets = F.one_hot(labels.reshape(-1).long(), classes).to(torch.float32)
    targets = targets * (1.0 - label_smoothing) + label_smoothing / torch.tensor(float(classes))
    epsilon = config.epsilon()
    output = probabilities / torch.sum(probabilities, dim=-1, keepdim=True)
    output = torch.clip(output, epsilon, 1.0 - epsilon)
    values = -torch.sum(targets * torch.log(output), dim=-1)
    return torch.sum(values) / torch.tensor(float(len(values)))


def _plain_adam(optimizer) -> bool:
    """Whether `optimizer` is Keras' own torch Adam without AMSGrad and with constant
    betas and epsilon (what `torch._fused_adam_` computes)."""
    from keras.src.backend.torch.optimizers.torch_adam import Adam

    return (type(optimizer) is Adam and not optimizer.amsgrad
            and all(isinstance(value, (int, float)) for value in (optimizer.beta_1, optimizer.beta_2, optimizer.epsilon)))


# ---------------------------------------------------------------------- layer kernels


def max_pool(inputs, pool_size: int):
    """Exact-tiling max pooling of NHWC `inputs` (TiledMaxPooling2D): torch's own kernel on
    the NCHW-shaped, channels_last-strided view of `inputs`, so nothing is copied in or out.
    Why: Keras' ops.max_pool copies to contiguous NCHW first and back, and that copy's
    gradient is a large part of the step (the step times: benchmarks/results, keras-fit vs
    keras-fit-stock)."""
    pooled = F.max_pool2d(inputs.permute(0, 3, 1, 2), pool_size)
    return pooled.permute(0, 2, 3, 1)


# ---------------------------------------------------------------------- forward pass


def calls_eagerly(images) -> bool:
    """Whether a model called on `images` runs its Python at every step: float32 torch
    tensors (eager torch), where Keras' `Layer.__call__` around each call costs time every
    step (CNNModule.__call__ and `forward` skip it). Symbolic Keras inputs and other dtypes
    go through Keras."""
    return isinstance(images, torch.Tensor) and images.dtype == torch.float32


def forward(network, images, training: bool = False):
    """`network(images, training=training)`, each layer's own `call` in turn and the ReLU
    convolution with its pooling as one call (backends/layers.py): eager torch would run
    Keras' `Layer.__call__` at every step. The same forward values, gradients within
    float32 rounding (tested)."""
    return layers.forward(network, images, training, conv_relu_pool, calls_eagerly(images))


def conv_relu_pool(conv, pool_size: int, inputs):
    """max_pool(relu(conv(inputs) + bias)) of NHWC `inputs`, computed as relu(max_pool(
    conv(inputs, bias))): the bias added inside torch's convolution (Keras adds it in a
    pass of its own over the step's largest tensor) and the ReLU after the pooling. The
    convolution takes Keras' own layouts (`keras.src.backend.torch.nn.conv`); the bias
    gradient is summed inside the convolution's backward, in another order."""
    from keras.src.backend.torch import nn as keras_nn

    images = keras_nn._maybe_convert_to_channels_last(keras_nn._transpose_spatial_inputs(inputs))
    kernel = keras_nn._maybe_convert_to_channels_last(keras_nn._transpose_conv_kernel(conv.kernel.value))
    features = F.conv2d(images, kernel, conv.bias.value)
    return F.relu(F.max_pool2d(features, pool_size)).permute(0, 2, 3, 1)


# ---------------------------------------------------------------------- serving


def predictor(model, fused_network):
    """(path, predict) serving the loaded network `model`: predict(images) takes float32
    numpy images and returns numpy probabilities. On torch, `forward` of `fused_network()`
    (the same weights with the project's TiledMaxPooling2D, or None for a network other
    than this CNN) under torch.no_grad(): the fused convolution, pooling and ReLU without
    Keras' wrapping, where `predict_on_batch` runs the stock layers (max pooling computing
    indices for nothing, three layout copies of the convolution's output, a bias pass);
    the same probabilities exactly (tested). Without a fused network, predict_on_batch."""
    network = fused_network()
    if network is None:
        return KERAS_PREDICT, model.predict_on_batch
    device = network.weights[0].value.device

    def predict(images):
        with torch.no_grad():
            return forward(network, torch.as_tensor(images, device=device)).cpu().numpy()

    return "torch-fused-forward", predict


# ---------------------------------------------------------------------- steps


def train_step(module, data):
    images, labels = data[0], data[1]

    # Forward pass
    module.zero_grad()
    loss, probabilities = module.training_step((images, labels))

    # Compute gradients
    loss.backward()
    gradients = [variable.value.grad for variable in module.trainable_variables]

    # Update weights
    with torch.no_grad():
        module.optimizer.apply(gradients, module.trainable_variables)

    # Update metrics
    return _update_metrics(module, loss, labels, probabilities)


def test_step(module, data):
    images, labels = data[0], data[1]

    # Forward pass
    with torch.no_grad():
        loss, probabilities = module.validation_step((images, labels))

    # Update metrics
    return _update_metrics(module, loss, labels, probabilities)


def loss_and_gradients(module, batch):
    """Loss of one training batch and the gradient of every trainable variable."""

    # Forward pass
    module.zero_grad()
    loss, _ = module.training_step(batch)

    # Compute gradients
    loss.backward()
    gradients = [variable.value.grad for variable in module.trainable_variables]
    return loss.detach(), gradients


def _update_metrics(module, loss, labels, probabilities):
    # Keras' own trainers feed the loss tracker this way (it has no public setter).
    module._loss_tracker.update_state(loss.detach(), sample_weight=labels.shape[0])
    return module.compute_metrics(None, labels, probabilities.detach())


# ---------------------------------------------------------------------- data parallel


class DataParallel:
    """torch.nn.parallel.DistributedDataParallel: one process per device (started by
    `launch`), each with a whole copy of the module and its share of every global batch.
    The step calls the DDP wrapper, whose backward hooks average the gradients across
    processes: Keras' own fit step calls the module itself, so under DDP each process
    would train on its own and the copies would drift apart, without an error."""

    ENGINE = "torch.nn.parallel.DistributedDataParallel"

    def __init__(self, accelerator: str, devices: int, num_nodes: int = 1, node_rank: int = 0,
                 coordinator: str | None = None, timeout_s: float = 300.0):
        if not dist.is_initialized():
            raise RuntimeError("torch trains data-parallel with one process per device: "
                               "run train.py --devices N, which starts them")
        self.rank, self.replicas = dist.get_rank(), dist.get_world_size()
        self.device_names = [f"{dist.get_backend()}:{rank}" for rank in range(self.replicas)]
        self.is_main = self.rank == 0
        self.replica = None

    def scope(self):
        return contextlib.nullcontext()

    def jit_compile(self, requested):
        return requested

    def steps_per_execution(self, requested: int) -> int:
        return requested

    def replicate(self, module) -> None:
        """Wrap `module` in DDP (which broadcasts rank 0's weights) and make it train
        through the wrapper."""
        device_ids = [torch.cuda.current_device()] if torch.cuda.is_available() else None
        self.replica = DistributedDataParallel(module, device_ids=device_ids)
        module.replicated_step = functools.partial(replicated_train_step, replica=self.replica)

    def local_batches(self, batches):
        """This process's share of each global batch: rows rank*b to (rank+1)*b."""
        for images, labels in batches:
            size = len(labels) // self.replicas
            share = slice(self.rank * size, (self.rank + 1) * size)
            yield images[share], labels[share]

    def unsharded(self):
        # Every process evaluates the whole set on its own copy: no collective to wait on.
        return contextlib.nullcontext()

    def replica_difference(self, module) -> tuple[int, float]:
        """(copies of the weights, largest difference between any copy and rank 0's); a
        collective: every process must call it."""
        with torch.no_grad():
            flat = torch.cat([variable.value.detach().reshape(-1) for variable in module.network.weights])
            copies = [torch.empty_like(flat) for _ in range(self.replicas)]
            dist.all_gather(copies, flat)
            return self.replicas, max(float((copy - copies[0]).abs().max()) for copy in copies)


def replicated_train_step(module, data, replica):
    images, labels = data[0], data[1]

    # Forward pass (through DDP, which prepares the gradient all-reduce)
    module.zero_grad()
    probabilities = replica(images, training=True)
    loss, probabilities = module.training_step((images, labels), probabilities)

    # Compute gradients (averaged across processes during backward)
    loss.backward()
    gradients = [variable.value.grad for variable in module.trainable_variables]

    # Update weights
    with torch.no_grad():
        module.optimizer.apply(gradients, module.trainable_variables)

    # Update metrics: those of the global batch, the same on every process
    with torch.no_grad():
        loss = loss.detach().clone()
        dist.all_reduce(loss)
        loss = loss / dist.get_world_size()
        labels = _gather(torch.as_tensor(labels, device=probabilities.device))
        probabilities = _gather(probabilities.detach().contiguous())
    return _update_metrics(module, loss, labels, probabilities)


def _gather(tensor):
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor)
    return torch.cat(parts)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def launch(function, args, config) -> int:
    """Start config.devices processes on this machine (torch.multiprocessing, spawn),
    each running function(local_rank, *args) in a process group (Gloo on CPU, NCCL on
    GPU), and wait for them; returns the first non-zero exit code. When one exits with
    an error, torch.multiprocessing stops the others. (torchrun's agent process is not
    used: its workers exit through the interpreter's teardown, where a C++ thread of
    torch's left joinable aborts the process, "terminate called without an active
    exception", pytorch/pytorch#190489. `_process` destroys the group on success and then
    leaves without that teardown: with the group destroyed alone, 1 worker in 14 still
    aborted there in the benchmark's 2-device cell, after its work was done.)"""
    if config.num_nodes > 1:
        host, port = config.coordinator.rsplit(":", 1)
    else:
        host = "127.0.0.1"
        port = free_port(host)
    cuda = config.accelerator != "cpu" and torch.cuda.is_available()
    if config.accelerator == "gpu" and torch.cuda.device_count() < config.devices:
        print(f"train.py: error: --devices {config.devices}: torch sees {torch.cuda.device_count()} GPU(s); "
              "lower --devices", file=sys.stderr)
        return 2
    settings = (f"tcp://{host}:{port}", config.node_rank * config.devices, config.world_size, cuda,
                config.collective_timeout_s)
    context = torch.multiprocessing.start_processes(
        _process, args=(function, args, settings), nprocs=config.devices, join=False, start_method="spawn")
    try:
        while not context.join():
            pass
    except torch.multiprocessing.ProcessExitedException as error:
        if error.exit_code is None or error.exit_code < 0:
            print(f"train.py: error: worker {error.error_index} was killed ({error.signal_name}); "
                  "the other workers were stopped", file=sys.stderr)
            return 1
        return error.exit_code
    except torch.multiprocessing.ProcessRaisedException as error:
        last = str(error).strip().splitlines()[-1]
        print(f"train.py: error: worker {error.error_index} failed: {last} (when a collective failed: another "
              "worker, here or on another machine, stopped or cannot be reached)", file=sys.stderr)
        return 1
    return 0


def _process(local_rank, function, args, settings):
    address, first_rank, world_size, cuda, timeout_s = settings
    if cuda:
        torch.cuda.set_device(local_rank)
    else:
        # Each process would take every core for its own threads; N processes on the same
        # cores then oversubscribe them (as Lightning does, share the cores out).
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    dist.init_process_group("nccl" if cuda else "gloo", init_method=address, rank=first_rank + local_rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s))
    code = function(local_rank, *args)
    if code == 0:
        # While Gloo's threads can still be joined; the worker's files are written and closed.
        dist.destroy_process_group()
    # No interpreter teardown (its C++ destructors can abort a worker whose work is done, see
    # launch); on failure other processes may still be inside a collective, where destroying
    # the group could wait for them: leave at once (the launcher stops the rest).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
