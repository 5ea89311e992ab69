"""The module role: the CNN, what one step does, and its optimizer.

`CNNModule` is a `keras.Model` that wraps `build_cnn()`. Its Lightning-style steps
(`training_step`, `test_step`) share `_common_step(batch, stage)`, which returns the loss and logs `f"{stage}_loss"` and
`f"{stage}_accuracy"`. Keras' `fit` drives it: with `step="keras"` Keras' built-in
train step runs; with `step="native"` the backend's own step from `backends/` does.
"""

from __future__ import annotations

import keras
from keras import ops

from model.cnn import build_cnn
from model.config import STEPS

STAGES = ("train", "val", "test")


def sparse_crossentropy(labels, probabilities, label_smoothing: float = 0.0):
    """Per-image cross-entropy of integer labels; with label_smoothing the target is
    (1 - label_smoothing) on the label plus label_smoothing / 10 on every class (Keras'
    categorical_crossentropy does the smoothing; its sparse form has none)."""
    if not label_smoothing:
        return keras.losses.sparse_categorical_crossentropy(labels, probabilities)
    targets = ops.one_hot(ops.cast(ops.reshape(labels, (-1,)), "int32"), ops.shape(probabilities)[-1])
    return keras.losses.categorical_crossentropy(targets, probabilities, label_smoothing=label_smoothing)


@keras.saving.register_keras_serializable(package="mnist_cnn")
class SmoothedSparseCrossentropy(keras.losses.Loss):
    """SparseCategoricalCrossentropy with label smoothing (sparse_crossentropy)."""

    def __init__(self, label_smoothing: float = 0.1, name: str = "smoothed_sparse_crossentropy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.label_smoothing = float(label_smoothing)

    def call(self, y_true, y_pred):
        return sparse_crossentropy(y_true, y_pred, self.label_smoothing)

    def get_config(self):
        return {**super().get_config(), "label_smoothing": self.label_smoothing}


@keras.saving.register_keras_serializable(package="mnist_cnn")
class CNNModule(keras.Model):
    def __init__(self, lr: float = 1e-3, decay_steps: int = 0, pooling: str = "fast", step: str = "keras",
                 ema_momentum: float | None = None, warmup_steps: int = 0, label_smoothing: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        if step not in STEPS:
            raise ValueError(f"Unsupported step. Received: step={step!r}; valid: {', '.join(STEPS)}")
        self.lr = float(lr)
        self.decay_steps = int(decay_steps)
        self.warmup_steps = int(warmup_steps)
        self.label_smoothing = float(label_smoothing)
        self.pooling = pooling
        self.step = step
        self.ema_momentum = ema_momentum
        self.network = build_cnn(pooling)
        # Set by a data-parallel engine whose step must run through its own wrapper
        # (torch's DDP, backends/torch_backend.py); None: Keras' or the native step.
        self.replicated_step = None
        # The wrapped network is built on construction and nothing else holds weights,
        # so the module is usable at once (JAX's stateless_call insists on it).
        self.built = True

    def call(self, images, training=False):
        return self.network(images, training=training)

    def build(self, input_shape=None):
        self.built = True

    # ------------------------------------------------------------------ optimizer

    def configure_optimizers(self) -> keras.optimizers.Optimizer:
        """Adam; with decay_steps > 0 the learning rate follows a cosine from lr to 0 over
        that many steps, the first warmup_steps of them a linear rise from 0 to lr. With
        ema_momentum, Keras keeps an exponential moving average of the weights and puts it
        in place of the weights when fit() ends (the averaged net generalises better)."""
        learning_rate = self.lr
        if self.decay_steps > 0 and self.warmup_steps > 0:
            learning_rate = keras.optimizers.schedules.CosineDecay(
                0.0, max(self.decay_steps - self.warmup_steps, 1), warmup_target=self.lr, warmup_steps=self.warmup_steps)
        elif self.decay_steps > 0:
            learning_rate = keras.optimizers.schedules.CosineDecay(self.lr, self.decay_steps)
        if self.ema_momentum is None:
            return keras.optimizers.Adam(learning_rate=learning_rate)
        return keras.optimizers.Adam(learning_rate=learning_rate, use_ema=True, ema_momentum=self.ema_momentum)

    def configure(self, jit_compile="auto", steps_per_execution: int = 1) -> "CNNModule":
        """Compile with this module's optimizer, loss and accuracy metric."""
        self.compile(
            optimizer=self.configure_optimizers(),
            loss=(SmoothedSparseCrossentropy(self.label_smoothing) if self.label_smoothing
                  else keras.losses.SparseCategoricalCrossentropy()),
            metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
            jit_compile=jit_compile,
            steps_per_execution=steps_per_execution,
        )
        return self

    # ------------------------------------------------------------------ steps

    def _common_step(self, batch, stage: str, probabilities=None):
        """(loss, probabilities, logs) of one batch. `probabilities` may be passed in by a
        caller that ran the forward pass itself (the stateless JAX step)."""
        if stage not in STAGES:
            raise ValueError(f"Unsupported stage. Received: stage={stage!r}; valid: {', '.join(STAGES)}")
        images, labels = batch
        if probabilities is None:
            probabilities = self(images, training=stage == "train")
        loss = ops.mean(sparse_crossentropy(labels, probabilities, self.label_smoothing))
        hits = ops.equal(ops.argmax(probabilities, axis=-1), ops.cast(labels, "int32"))
        accuracy = ops.mean(ops.cast(hits, "float32"))
        return loss, probabilities, {f"{stage}_loss": loss, f"{stage}_accuracy": accuracy}

    def training_step(self, batch, probabilities=None):
        return self._common_step(batch, "train", probabilities)

    def test_step(self, *args):
        """Keras calls this once per evaluation batch: (data) on TF/torch, (state, data)
        on JAX. The native step runs `_common_step(batch, "test")`."""
        if self.step == "keras":
            return super().test_step(*args)
        from backends import native_test_step

        return native_test_step(self, *args)

    def train_step(self, *args):
        """Keras calls this once per batch: (data) on TF/torch, (state, data) on JAX."""
        if self.replicated_step is not None:
            return self.replicated_step(self, *args)
        if self.step == "keras":
            return super().train_step(*args)
        from backends import native_train_step

        return native_train_step(self, *args)

    # ------------------------------------------------------------------ saving

    def get_config(self):
        return {
            "name": self.name,
            "lr": self.lr,
            "decay_steps": self.decay_steps,
            "warmup_steps": self.warmup_steps,
            "label_smoothing": self.label_smoothing,
            "pooling": self.pooling,
            "step": self.step,
            "ema_momentum": self.ema_momentum,
        }
