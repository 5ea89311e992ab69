"""The trainer role: the loop, callbacks, checkpoints and devices, on Keras' own `fit`.

`Trainer.fit(module, datamodule)` compiles the module, feeds it the data module's
batches (their order and augmentation a function of seed and epoch only, so identical
on every backend and on resume) and runs `module.fit` with these callbacks besides the
user's:
- `StopOnNonFiniteLoss`: stops at the first NaN/inf loss, naming epoch and step;
- `StepTimer`: per-step and per-epoch wall times;
- `AtomicCheckpoint`: `last.keras` (the module with its optimizer, for --resume) every
  epoch and `best.keras` (the bare network in stock Keras layers) by validation accuracy,
  each written atomically, plus `trainer_state.json` (epoch, best, history).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np

from model.checkpoint import CheckpointError, load_model, remove_stale_temp_files, save_model, write_json
from model.cnn import portable_network
from model.data import MNISTDataModule

LAST_CHECKPOINT = "last.keras"
BEST_CHECKPOINT = "best.keras"
TRAINER_STATE = "trainer_state.json"


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss."""


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Like keras.callbacks.TerminateOnNaN, but it raises, so the run exits non-zero
    with the epoch and step named, and no checkpoint is written after the bad step."""

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        # Reading the loss is a host-device sync point; the progress bar makes it anyway.
        loss = float((logs or {}).get("loss", 0.0))
        if not math.isfinite(loss):
            raise NonFiniteLossError(
                f"loss became {loss} at epoch {self.epoch + 1}, step {batch + 1}; stopped. "
                "Try a smaller --lr; the last good checkpoint is kept"
            )


class StepTimer(keras.callbacks.Callback):
    """Wall time of every training step (end of one batch to end of the next, so data
    loading is included) and of every epoch."""

    def __init__(self):
        super().__init__()
        self.step_seconds: list[list[float]] = []
        self.epoch_seconds: list[float] = []

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = self._last = time.perf_counter()
        self.step_seconds.append([])

    def on_train_batch_end(self, batch, logs=None):
        now = time.perf_counter()
        self.step_seconds[-1].append(now - self._last)
        self._last = now

    def on_epoch_end(self, epoch, logs=None):
        self.epoch_seconds.append(time.perf_counter() - self._epoch_start)

    def step_ms_median(self, warmup_steps: int = 5) -> float | None:
        """Median step time, leaving out the first steps (tracing/compilation)."""
        steps = [s for s in self.step_seconds[0][warmup_steps:]] if self.step_seconds else []
        for later in self.step_seconds[1:]:
            steps.extend(later)
        return float(np.median(steps) * 1000) if steps else None


class AtomicCheckpoint(keras.callbacks.Callback):
    def __init__(self, directory: Path, monitor: str = "val_accuracy", history: list | None = None, best=None):
        super().__init__()
        self.directory = Path(directory)
        self.monitor = monitor
        self.history = list(history or [])
        self.best = best

    def on_epoch_end(self, epoch, logs=None):
        logs = {key: float(value) for key, value in (logs or {}).items()}
        self.history.append({"epoch": epoch + 1, **logs})
        save_model(self.model, self.directory / LAST_CHECKPOINT)
        current = logs.get(self.monitor)
        if current is not None and (self.best is None or current > self.best):
            self.best = current
            # The user-facing best model: the bare network in stock Keras layers.
            save_model(portable_network(self.model.network), self.directory / BEST_CHECKPOINT)
        # Written last: it describes last.keras, which is already in place.
        write_json(
            self.directory / TRAINER_STATE,
            {"epochs_completed": epoch + 1, "monitor": self.monitor, "best": self.best, "history": self.history},
        )


class ValidateUnsharded(keras.callbacks.Callback):
    """Data-parallel runs: the validation set evaluated at each epoch's end with the
    engine's `unsharded()` evaluation (in place of fit's validation_data, which JAX
    would shard: its last batch need not split over the devices). Placed first, so
    the val_ logs reach the history and the checkpoint callback."""

    def __init__(self, engine, images, labels, batch_size: int):
        super().__init__()
        self.engine, self.images, self.labels, self.batch_size = engine, images, labels, batch_size

    def on_epoch_end(self, epoch, logs=None):
        with self.engine.unsharded():
            results = self.model.evaluate(self.images, self.labels, batch_size=self.batch_size, verbose=0,
                                          return_dict=True)
        if logs is not None:
            logs.update({f"val_{name}": value for name, value in results.items()})


@dataclass
class Trainer:
    max_epochs: int = 15
    callbacks: list = field(default_factory=list)
    limit_train_batches: int | None = None
    fast_dev_run: bool = False
    deterministic: bool = False
    jit_compile: bool | str = "auto"
    checkpoint_dir: str | Path | None = None
    verbose: int | str = "auto"
    # A data-parallel engine (model/devices.py start_engine); None: one device.
    engine: object = None

    def __post_init__(self):
        if self.fast_dev_run:
            self.max_epochs, self.limit_train_batches = 1, min(self.limit_train_batches or 5, 5)
        self.timer = StepTimer()
        self.history: list[dict] = []

    # ------------------------------------------------------------------ fit

    def fit(self, module, datamodule: MNISTDataModule, resume: bool = False):
        """Train `module` on `datamodule`; returns the module that was trained (the one
        loaded from the last checkpoint when resuming)."""
        from backends import backend_module

        backend = backend_module()
        backend.configure(deterministic=self.deterministic)
        if self.jit_compile == "auto":
            self.jit_compile = backend.default_jit_compile(self.deterministic)
        if self.engine is not None:  # data parallel: the engine says what it can compile
            self.jit_compile = self.engine.jit_compile(self.jit_compile)
        if self.limit_train_batches:
            datamodule.limit_train_batches = self.limit_train_batches
        initial_epoch, history, best = 0, [], None
        if self.checkpoint_dir is not None and Path(self.checkpoint_dir).is_dir() and self.is_main:
            remove_stale_temp_files(self.checkpoint_dir)
        with self._engine_scope():  # TensorFlow: variables made here are mirrored
            if resume:
                module, initial_epoch, history, best = self._restore(datamodule)
            if not module.compiled:
                module.configure(jit_compile=self.jit_compile)
        backend.fuse_optimizer(module.optimizer)
        callbacks = [StopOnNonFiniteLoss(), self.timer]
        validation = (datamodule.x_val, datamodule.y_val) if len(datamodule.x_val) else None
        data = backend.training_data(datamodule, initial_epoch, self.max_epochs)
        if self.engine is not None:
            self.engine.replicate(module)
            data = self.engine.local_batches(data)
            if validation is not None:
                callbacks.insert(0, ValidateUnsharded(self.engine, *validation, max(datamodule.batch_size, 1000)))
                validation = None
        checkpoint = None
        if self.checkpoint_dir is not None and self.is_main:  # written once, by rank 0
            checkpoint = AtomicCheckpoint(self.checkpoint_dir, history=history, best=best)
            callbacks.append(checkpoint)
        callbacks.extend(self.callbacks)
        if initial_epoch < self.max_epochs:
            module.fit(
                data,
                steps_per_epoch=datamodule.steps_per_epoch,
                shuffle=False,  # the data module already shuffled, by seed and epoch
                epochs=self.max_epochs,
                initial_epoch=initial_epoch,
                validation_data=validation,
                batch_size=None,
                callbacks=callbacks,
                verbose=self.verbose if self.is_main else 0,
            )
        self.history = checkpoint.history if checkpoint else history + self._history_from(module)
        return module

    @property
    def is_main(self) -> bool:
        """Whether this process writes logs, files and checkpoints (rank 0)."""
        return self.engine is None or self.engine.is_main

    def _engine_scope(self):
        return self.engine.scope() if self.engine is not None else contextlib.nullcontext()

    def _restore(self, datamodule: MNISTDataModule):
        if self.checkpoint_dir is None:
            raise CheckpointError("resume needs a checkpoint directory")
        directory = Path(self.checkpoint_dir)
        last = directory / LAST_CHECKPOINT
        if not last.exists():
            raise CheckpointError(f"nothing to resume: no checkpoint at {last}; run without --resume to start afresh")
        module = load_model(last)
        state = {}
        if (directory / TRAINER_STATE).is_file():
            state = json.loads((directory / TRAINER_STATE).read_text())
        steps_done = int(module.optimizer.iterations.numpy() if hasattr(module.optimizer.iterations, "numpy")
                         else keras.ops.convert_to_numpy(module.optimizer.iterations))
        steps_per_epoch = datamodule.steps_per_epoch
        if steps_done % steps_per_epoch:
            raise CheckpointError(
                f"{last} holds {steps_done} optimizer steps, not a whole number of {steps_per_epoch}-step epochs; "
                "resume with the batch size and --limit-train-batches it was trained with"
            )
        epoch = steps_done // steps_per_epoch
        history = [h for h in state.get("history", []) if h["epoch"] <= epoch]
        best = state.get("best") if state.get("epochs_completed") == epoch else None
        return module, epoch, history, best

    @staticmethod
    def _history_from(module) -> list[dict]:
        logs = module.history.history if module.history else {}
        epochs = module.history.epoch if module.history else []
        return [{"epoch": e + 1, **{k: float(v[i]) for k, v in logs.items()}} for i, e in enumerate(epochs)]

    # ------------------------------------------------------------------ evaluate

    def validate(self, module, datamodule: MNISTDataModule) -> dict:
        return self._evaluate(module, datamodule.x_val, datamodule.y_val, "val", datamodule.batch_size)

    def test(self, module, datamodule: MNISTDataModule) -> dict:
        return self._evaluate(module, datamodule.x_test, datamodule.y_test, "test", datamodule.batch_size)

    def predict(self, module, images, batch_size: int = 1024):
        return module.predict(images, batch_size=batch_size, verbose=0)

    def _evaluate(self, module, images, labels, stage: str, batch_size: int) -> dict:
        if not module.compiled:
            from backends import backend_module

            jit_compile = backend_module().default_jit_compile(self.deterministic) if self.jit_compile == "auto" else self.jit_compile
            module.configure(jit_compile=jit_compile)
        with self.engine.unsharded() if self.engine is not None else contextlib.nullcontext():
            logs = module.evaluate(images, labels, batch_size=max(batch_size, 1000), verbose=0, return_dict=True)
        return {f"{stage}_{name}": float(value) for name, value in logs.items()}
