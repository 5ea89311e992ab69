"""The module role: the CNN, what one step does, and its optimizer.

`CNNModule` is a `keras.Model` that wraps `build_cnn()`. Its Lightning roles say what one
step computes: `training_step(batch)` and `validation_step(batch)` (used for validation
and testing alike, as Keras' evaluate uses one `test_step`) return the batch's loss and
probabilities. Keras' `fit` and `evaluate` drive it through Keras' hooks `train_step` and
`test_step`: with `step="keras"` Keras' built-in step runs; with `step="native"` the
backend's own step (`backends/<backend>_backend.py`), which calls the roles above.
Its settings (lr, EMA, pooling, step) default to `TrainConfig`'s.
"""

from __future__ import annotations

import keras
from keras import ops

from model.backend import BACKEND
from model.cnn import build_cnn
from model.config import RUN_SETTINGS_ADDED, STEPS, TrainConfig


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

    def __init__(self, label_smoothing: float, name: str = "smoothed_sparse_crossentropy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.label_smoothing = float(label_smoothing)

    def call(self, y_true, y_pred):
        return sparse_crossentropy(y_true, y_pred, self.label_smoothing)

    def get_config(self):
        return {**super().get_config(), "label_smoothing": self.label_smoothing}


@keras.saving.register_keras_serializable(package="mnist_cnn")
class CNNModule(keras.Model):
    def __init__(self, lr: float = TrainConfig.lr, decay_steps: int | None = None, pooling: str = TrainConfig.pooling,
                 step: str = TrainConfig.step, ema_momentum: float | None = TrainConfig.ema_momentum,
                 warmup_steps: int = 0, label_smoothing: float = TrainConfig.label_smoothing,
                 adam_betas: tuple[float, float] = (TrainConfig.adam_beta_1, TrainConfig.adam_beta_2),
                 seed: int | None = None, **kwargs):
        """`decay_steps`: the updates over which the learning rate falls to 0 along a
        cosine; 0 keeps it constant; None: the whole run, which the Trainer sets when it
        compiles the module (epochs times batches per epoch, after limit_train_batches).
        `warmup_steps`: the first of them, a linear rise from 0 to lr. `adam_betas`: Adam's
        (beta_1, beta_2). `seed`: the network's initial weights are drawn with numpy from
        it, the same on every backend (build_cnn); None: Keras' initializers."""
        super().__init__(**kwargs)
        if step not in STEPS:
            raise ValueError(f"Unsupported step. Received: step={step!r}; valid: {', '.join(STEPS)}")
        self.lr = float(lr)
        self.decay_steps = None if decay_steps is None else int(decay_steps)
        self.warmup_steps = int(warmup_steps)
        self.label_smoothing = float(label_smoothing)
        self.adam_betas = tuple(float(beta) for beta in adam_betas)
        self.pooling = pooling
        self.step = step
        self.ema_momentum = ema_momentum
        self.network = build_cnn(pooling, seed)
        # Set by a data-parallel engine whose step must run through its own wrapper
        # (torch's DDP, backends/torch_backend.py); None: Keras' or the native step.
        self.replicated_step = None
        # The wrapped network is built on construction and nothing else holds weights,
        # so the module is usable at once (JAX's stateless_call insists on it).
        self.built = True

    def __call__(self, *args, **kwargs):
        """Keras' `Layer.__call__`, except where the backend runs every call's Python at
        every step (eager torch, `calls_eagerly`) and the call is the steps' own form,
        `module(images, training=bool)`: then `call` directly, as backends/layers.py calls the
        network's layers (Keras' wrapping, ~0.2 ms a step there, binds arguments, opens
        scopes and checks masks and dtypes, none of which this module uses). Symbolic
        inputs and every other form go through Keras, `module(images)` too: Keras takes its
        `training` from an enclosing call."""
        if len(args) == 1 and kwargs.keys() == {"training"} and isinstance(kwargs["training"], bool) \
                and BACKEND.calls_eagerly(args[0]):
            return self.call(args[0], training=kwargs["training"])
        return super().__call__(*args, **kwargs)

    def call(self, images, training=False):
        # The backend's forward pass of the network (backends/layers.py): the layers' own
        # calls without Keras' per-layer wrapping, with convolution, ReLU and pooling as one
        # call; outputs as the layers', gradients equal up to rounding.
        return BACKEND.forward(self.network, images, training)

    def build(self, input_shape=None):
        self.built = True

    # ------------------------------------------------------------------ optimizer

    def configure_optimizers(self) -> keras.optimizers.Optimizer:
        """Adam; with decay_steps > 0 the learning rate follows a cosine from lr to 0 over
        that many steps, the first warmup_steps of them a linear rise from 0 to lr. With
        ema_momentum, Keras keeps an exponential moving average of the weights and puts it
        in place of the weights when fit() ends (the averaged net generalises better)."""
        if self.decay_steps is None:
            raise ValueError("decay_steps is None: the Trainer sets it from the run's length before compiling")
        learning_rate = self.lr
        if self.decay_steps > 0 and self.warmup_steps > 0:
            learning_rate = keras.optimizers.schedules.CosineDecay(
                0.0, max(self.decay_steps - self.warmup_steps, 1), warmup_target=self.lr, warmup_steps=self.warmup_steps)
        elif self.decay_steps > 0:
            learning_rate = keras.optimizers.schedules.CosineDecay(self.lr, self.decay_steps)
        beta_1, beta_2 = self.adam_betas
        if self.ema_momentum is None:
            return keras.optimizers.Adam(learning_rate=learning_rate, beta_1=beta_1, beta_2=beta_2)
        return keras.optimizers.Adam(learning_rate=learning_rate, beta_1=beta_1, beta_2=beta_2, use_ema=True,
                                     ema_momentum=self.ema_momentum)

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

    def compiled_label_smoothing(self) -> float | None:
        """The label smoothing of the compiled loss when it is this module's own smoothed
        cross-entropy as configure compiles it (or a resumed run's, loaded), else None (not
        compiled, no smoothing, another loss, or loss weights): a backend may then compute
        that loss by other means (torch's fuse_loss_and_metrics)."""
        loss = getattr(self, "loss", None)
        # compile()'s own arguments, as given (get_compile_config would serialize them, and
        # Keras' serialization imports TensorFlow where it is installed: 2 s on torch).
        compiled = getattr(getattr(self, "_compile_config", None), "config", {})
        if type(loss) is SmoothedSparseCrossentropy and loss.reduction == "sum_over_batch_size" \
                and loss.dtype == "float32" and loss.label_smoothing and compiled.get("loss_weights") is None:
            return loss.label_smoothing
        return None

    # ------------------------------------------------------------------ steps

    def _common_step(self, batch, stage: str, probabilities=None):
        """(loss, probabilities) of one batch. `probabilities` may be passed in by a caller
        that ran the forward pass itself (the stateless JAX step, torch's DDP wrapper)."""
        images, labels = batch
        if probabilities is None:
            probabilities = self(images, training=stage == "train")
        loss = ops.mean(sparse_crossentropy(labels, probabilities, self.label_smoothing))
        return loss, probabilities

    # Lightning's roles: what one step computes.

    def training_step(self, batch, probabilities=None):
        return self._common_step(batch, "train", probabilities)

    def validation_step(self, batch, probabilities=None):
        return self._common_step(batch, "val", probabilities)

    # Keras' hooks, called by fit and evaluate: (data) on TF/torch, (state, data) on JAX.

    def train_step(self, *args):
        if self.replicated_step is not None:
            return self.replicated_step(self, *args)
        if self.step == "keras":
            return super().train_step(*args)
        return BACKEND.train_step(self, *args)

    def test_step(self, *args):
        if self.step == "keras":
            return super().test_step(*args)
        return BACKEND.test_step(self, *args)

    # ------------------------------------------------------------------ saving

    def get_compile_config(self):
        # Steps per call are how the running backend trains (the Trainer's choice, like
        # jit_compile), not the model: a saved module records Keras' default, 1, which every
        # backend can load (Keras' torch trainer refuses more; --resume sets its own).
        config = super().get_compile_config()
        if "steps_per_execution" in config:
            config["steps_per_execution"] = 1
        return config

    def get_config(self):
        return {
            "name": self.name,
            "lr": self.lr,
            "decay_steps": self.decay_steps,
            "warmup_steps": self.warmup_steps,
            "label_smoothing": self.label_smoothing,
            "adam_betas": list(self.adam_betas),
            "pooling": self.pooling,
            "step": self.step,
            "ema_momentum": self.ema_momentum,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        # A module saved before label smoothing existed has no such key and trained without
        # it: fill it with that value, not today's default (TrainConfig's), so that a resume
        # keeps the run's maths; the same for Adam's betas. (warmup_steps needs no filling:
        # its default, 0, is the value those runs had.)
        config = {"label_smoothing": RUN_SETTINGS_ADDED["label_smoothing"],
                  "adam_betas": [RUN_SETTINGS_ADDED["adam_beta_1"], RUN_SETTINGS_ADDED["adam_beta_2"]], **config}
        return super().from_config(config, custom_objects=custom_objects)
