"""PyTorch: a loss.backward() step under zero_grad(), as in keras.io's "Customizing what
happens in fit() with PyTorch". Runs eagerly (torch.compile only with jit_compile)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
    as a Python generator (Keras moves each batch to the device as it comes)."""
    return datamodule.batches_from(first_epoch, stop_epoch)


# ---------------------------------------------------------------------- optimizer


def fuse_optimizer(optimizer) -> None:
    """Give `optimizer`'s moving average of the weights (Adam use_ema) Keras' own formula,
    momentum * average + (1 - momentum) * weight with momentum 0 on the first update, in
    two `_foreach` kernels for all weights. Keras runs five eager ops per weight there:
    2.3 of the 5.6 ms of an Adam step here, against 0.3 ms fused. Only this instance's
    method is replaced (a subclass would lose Keras' `_foreach` Adam on torch, which
    `TorchOptimizer.__new__` picks for the exact Adam class only); nothing is saved
    differently. The momentum stays on the device: no host sync."""
    if not getattr(optimizer, "use_ema", False):
        return

    def update_moving_average(variables):
        pairs = [(average.value, variable.value)
                 for variable, average in zip(variables, optimizer._model_variables_moving_average)
                 if average is not None]
        averages, weights = [average for average, _ in pairs], [weight for _, weight in pairs]
        momentum = (optimizer.iterations.value != 0).to(torch.float32) * optimizer.ema_momentum
        torch._foreach_mul_(averages, momentum)
        torch._foreach_add_(averages, torch._foreach_mul(weights, 1 - momentum))

    optimizer._update_model_variables_moving_average = update_moving_average


# ---------------------------------------------------------------------- layer kernels


def max_pool(inputs, pool_size: int):
    """Exact-tiling max pooling of NHWC `inputs` (TiledMaxPooling2D): torch's own kernel on
    the NCHW-shaped, channels_last-strided view of `inputs`, so nothing is copied in or out.
    Keras' ops.max_pool copies to contiguous NCHW first, and the NCHW kernel and that copy's
    gradient took about half of the Keras step here (49-50 vs 27-30 ms/step, batch 128)."""
    pooled = F.max_pool2d(inputs.permute(0, 3, 1, 2), pool_size)
    return pooled.permute(0, 2, 3, 1)


# ---------------------------------------------------------------------- steps


def train_step(module, data):
    images, labels = data[0], data[1]

    # Forward pass
    module.zero_grad()
    loss, probabilities, _ = module.training_step((images, labels))

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
        loss, probabilities, _ = module._common_step((images, labels), "test")

    # Update metrics
    return _update_metrics(module, loss, labels, probabilities)


def loss_and_gradients(module, batch):
    """Loss of one training batch and the gradient of every trainable variable."""

    # Forward pass
    module.zero_grad()
    loss, _, _ = module.training_step(batch)

    # Compute gradients
    loss.backward()
    gradients = [variable.value.grad for variable in module.trainable_variables]
    return loss.detach(), gradients


def _update_metrics(module, loss, labels, probabilities):
    # Keras' own trainers feed the loss tracker this way (it has no public setter).
    module._loss_tracker.update_state(loss.detach(), sample_weight=labels.shape[0])
    return module.compute_metrics(None, labels, probabilities.detach())
