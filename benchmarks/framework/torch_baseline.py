"""PyTorch baseline: the CNN and Keras' Adam written directly in PyTorch, no Keras.

Eager, functional (`torch.nn.functional` on plain tensors), with the Adam update done by
torch's fused Adam kernel (`torch._fused_adam_`, what `torch.optim.Adam(fused=True)` runs)
and the weight average by one `_foreach_lerp_` kernel per weight. Eager because it is
faster here: `torch.compile` (Inductor, default mode and max-autotune-no-cudagraphs) of the
forward pass and loss took 17.7-18.0 ms a forward-backward against 9.4-9.6 eager, after
5-9 s of compiling (one-off, 2-core AVX-512 host, torch 2.13, 2026-12-07).

Measured on CPU (2 cores shared with other jobs, load average ~5, so absolute times
are inflated; compare within this table only). Variants ran interleaved in one
process, 10 steps at a time, so that the load hit them alike: per variant 30 warm-up
and 100 timed steps at batch 128, a device sync before every clock read; median (iqr),
ms/step. torch 2.13.0+cpu:
    channels_last, F.max_pool2d       216.6 (183-266)  kept
    contiguous,    F.max_pool2d       226.5 (184-294)  same within noise
    channels_last, reshape + amax     381.9 (332-424)  1.7x slower
    contiguous,    reshape + amax     379.2 (326-423)
    strided pairwise maximum          401.8 (344-460) channels_last, 414.4 (326-496) contiguous
    (from an earlier, quieter run: channels_last F.max_pool2d 40 ms, strided 60 ms.)
    Under that load torch suffered most from CPU contention: with OMP_NUM_THREADS=1
    (one intra-op thread instead of two) channels_last F.max_pool2d ran at 86.9 (77-98).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.framework import BETA_1, BETA_2, EPSILON, PREDICT_BATCH_SIZE, PROBABILITY_EPSILON, TrainState

NAME = "torch"
# channels_last: no slower (timings above), and the flatten after pooling becomes a view.
MEMORY_FORMAT = torch.channels_last
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------------- network


def max_pool(x):
    """2x2/stride-2 max pooling of NCHW `x`.

    torch's own kernel: reshape + amax, the form the JAX and TF baselines use, was 1.7x
    slower here (its reduction over two non-adjacent dims and the tie-counting backward
    dominated the step; timings above)."""
    return F.max_pool2d(x, 2)


def forward(params, images):
    """Logits (N,10) of NHWC `images`."""
    conv_kernel, conv_bias, dense_kernel, dense_bias, output_kernel, output_bias = params
    # torch convolves NCHW tensors with OIHW kernels; both are views of the Keras layouts.
    x = images.permute(0, 3, 1, 2).contiguous(memory_format=MEMORY_FORMAT)
    x = F.conv2d(x, conv_kernel.permute(3, 2, 0, 1), conv_bias)
    # ReLU after the pooling, over a quarter of the values: the same numbers (max commutes
    # with ReLU), as the Keras path computes them (conv_relu_pool in backends/).
    x = F.relu(max_pool(x))
    # NHWC flatten, the order of Keras' channels_last Flatten, so dense_kernel fits as is;
    # with MEMORY_FORMAT channels_last the permute is a view and the reshape copies nothing.
    x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)
    x = F.relu(x @ dense_kernel + dense_bias)
    return x @ output_kernel + output_bias


def cross_entropy(logits, labels, label_smoothing: float = 0.0):
    """Mean sparse categorical cross-entropy, as Keras computes it on torch: from the
    softmax probabilities, renormalised and clipped, so a saturated softmax gives a
    bounded loss and no gradient."""
    probabilities = F.softmax(logits, dim=-1)
    probabilities = probabilities / torch.sum(probabilities, dim=-1, keepdim=True)
    probabilities = torch.clip(probabilities, PROBABILITY_EPSILON, 1.0 - PROBABILITY_EPSILON)
    if label_smoothing:
        # Keras' categorical form: (1 - s) on the label plus s / classes on every class.
        targets = F.one_hot(labels.long(), logits.shape[-1]) * (1.0 - label_smoothing) + label_smoothing / logits.shape[-1]
        return -torch.mean(torch.sum(targets * torch.log(probabilities), dim=-1))
    return F.nll_loss(torch.log(probabilities), labels.long())


def learning_rate(lr: float, decay_steps: int, iterations: int):
    """Keras' CosineDecay(lr, decay_steps) at `iterations` updates done (the count the
    optimizer passes to its schedule before incrementing), or `lr` when decay_steps=0.
    On the host in float32, as Keras computes it: the count never leaves the host."""
    if decay_steps <= 0:
        return np.float32(lr)
    fraction = np.float32(min(iterations, decay_steps)) / np.float32(decay_steps)
    return np.float32(lr) * (np.float32(0.5) * (np.float32(1.0) + np.cos(np.float32(np.pi) * fraction)))


def train_step(state: TrainState, images, labels, lr: float, decay_steps: int, ema_momentum: float | None,
               label_smoothing: float = 0.0):
    """One Adam step; returns (loss, state), the state's tensors updated in place."""

    # Forward pass
    for w in state.params:
        w.grad = None
    loss = cross_entropy(forward(state.params, images), labels, label_smoothing)

    # Compute gradients
    loss.backward()
    gradients = [w.grad for w in state.params]

    # Update weights: torch's fused Adam kernel (one pass over each tensor, where the
    # _foreach form makes one per operation). Keras adds epsilon to sqrt(v) before the bias
    # correction, torch after it: epsilon / sqrt(1 - beta_2**t) makes the two the same update.
    rate = learning_rate(lr, decay_steps, state.iterations)
    local_step = np.float32(state.iterations + 1)
    epsilon = np.float32(EPSILON) / np.sqrt(np.float32(1) - np.float32(BETA_2) ** local_step)
    with torch.no_grad():
        steps = [torch.full((), float(local_step), device=DEVICE)] * len(state.params)
        torch._fused_adam_(state.params, gradients, state.momentums, state.velocities, [], steps, lr=float(rate),
                           beta1=BETA_1, beta2=BETA_2, weight_decay=0.0, eps=float(epsilon), amsgrad=False,
                           maximize=False)

        # Update the moving average (Keras: it starts as the first step's weights)
        if ema_momentum is not None:
            momentum = np.float32(ema_momentum if state.iterations else 0.0)
            # One lerp kernel per weight: average + (1 - momentum) * (weight - average)
            torch._foreach_lerp_(state.averages, state.params, float(np.float32(1) - momentum))
    return loss.detach(), state._replace(iterations=state.iterations + 1)


def train_steps(state: TrainState, images, labels, **settings):
    """One Adam step on each batch images[i], labels[i] in turn (eager: a Python loop; Keras
    runs one step per call on torch); returns (the last step's loss, state)."""
    for batch_images, batch_labels in zip(images, labels):
        loss, state = train_step(state, batch_images, batch_labels, **settings)
    return loss, state


# ---------------------------------------------------------------------- baseline


class Baseline:
    def __init__(self, state: TrainState, lr: float, decay_steps: int, ema_momentum: float | None,
                 label_smoothing: float = 0.0):
        self.state = state
        settings = {"lr": lr, "decay_steps": decay_steps, "ema_momentum": ema_momentum,
                    "label_smoothing": label_smoothing}
        # Eager: the steps are the plain functions.
        self._step = functools.partial(train_step, **settings)
        self._steps = functools.partial(train_steps, **settings)

    def train_step(self, images, labels):
        """One Adam step on a batch; returns the loss, still on the device (no sync)."""
        images = torch.as_tensor(images).to(DEVICE, non_blocking=True)
        labels = torch.as_tensor(labels).to(DEVICE, non_blocking=True)
        loss, self.state = self._step(self.state, images, labels)
        return loss

    def train_steps(self, images, labels):
        """One Adam step on each batch of `images` (steps, batch, 28, 28, 1) and `labels`
        (steps, batch), all in one call; returns the last step's loss, still on the device."""
        images = torch.as_tensor(images).to(DEVICE, non_blocking=True)
        labels = torch.as_tensor(labels).to(DEVICE, non_blocking=True)
        loss, self.state = self._steps(self.state, images, labels)
        return loss

    def synchronize(self, value) -> None:
        # CUDA kernels run asynchronously: wait for them before reading a clock.
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    def loss_value(self, value) -> float:
        return float(value.item())

    def predict(self, images) -> np.ndarray:
        with torch.no_grad():
            return np.concatenate([
                F.softmax(forward(self.trained_params(), torch.as_tensor(images[start : start + PREDICT_BATCH_SIZE])
                                  .to(DEVICE)), dim=-1).cpu().numpy()
                for start in range(0, len(images), PREDICT_BATCH_SIZE)
            ])

    def trained_params(self):
        """The weights training produced: the moving average with EMA on."""
        return self.state.params if self.state.averages is None else self.state.averages

    def get_weights(self) -> list[np.ndarray]:
        return [w.detach().cpu().numpy().copy() for w in self.trained_params()]

    def device_name(self) -> str:
        if DEVICE.type == "cuda":
            return f"cuda:{torch.cuda.get_device_name(0)}"
        return "cpu"

    def peak_device_memory_mb(self) -> float | None:
        if DEVICE.type != "cuda":
            return None
        return torch.cuda.max_memory_allocated() / 2**20


def build(weights: list[np.ndarray], lr: float, decay_steps: int = 0, ema_momentum: float | None = None,
          label_smoothing: float = 0.0) -> Baseline:
    """A baseline starting from `weights` (Keras order and layout) with Adam(lr), its
    learning rate on a cosine to 0 over `decay_steps` updates when decay_steps > 0, and
    a moving average of the weights with `ema_momentum`, and the cross-entropy against
    labels smoothed by `label_smoothing` (model/module.py sparse_crossentropy)."""
    params = [torch.tensor(np.asarray(w, dtype=np.float32), device=DEVICE, requires_grad=True) for w in weights]
    state = TrainState(
        params=params,
        momentums=[torch.zeros_like(w, requires_grad=False) for w in params],
        velocities=[torch.zeros_like(w, requires_grad=False) for w in params],
        iterations=0,
        averages=None if ema_momentum is None else [torch.zeros_like(w, requires_grad=False) for w in params],
    )
    return Baseline(state, lr, decay_steps, ema_momentum, label_smoothing)
