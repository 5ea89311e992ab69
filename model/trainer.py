"""The trainer role: the loop, callbacks, checkpoints and devices, on Keras' own `fit`.

`Trainer.fit(module, datamodule)` compiles the module, feeds it the data module's
batches (their order and augmentation a function of seed and epoch only, so identical
on every backend and on resume) and runs `module.fit` with these callbacks besides the
user's:
- `StopOnNonFiniteLoss`: stops at the first NaN/inf loss, naming epoch and step (with
  several steps per call, the call's steps);
- `StepTimer`: per-step and per-epoch wall times;
- `AtomicCheckpoint`: `last.keras` (the module with its optimizer, for --resume) every
  epoch and `best.keras` (the bare network in stock Keras layers) by validation accuracy,
  each written atomically, with the trainer state (epoch, best, history, the run's
  settings) stored inside last.keras;
- `StopOnInterrupt`: the first Ctrl-C stops at the end of the steps running (one call of
  Keras' step function: up to 16 steps on TensorFlow and JAX), the second at once.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np

from model.backend import BACKEND
from model.checkpoint import TRAINER_STATE_FORMAT, CheckpointError, load_model, read_trainer_state, save_model
from model.cnn import portable_network
from model.config import TrainConfig
from model.data import MNISTDataModule
from model.module import CNNModule
from model.runtime import resume_garbage_collection
from model.timing import WARMUP_STEPS, past_warmup, spread_over_steps, step_range, whole_executions

LAST_CHECKPOINT = "last.keras"
BEST_CHECKPOINT = "best.keras"


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss."""


class TrainingInterrupted(Exception):
    """The user pressed Ctrl-C; training stopped at a step boundary."""

    def __init__(self, epoch: int, step: int, steps_per_epoch: int, checkpoint_note: str):
        self.epoch, self.step, self.steps_per_epoch, self.checkpoint_note = epoch, step, steps_per_epoch, checkpoint_note
        super().__init__(f"interrupted at epoch {epoch}, step {step} of {steps_per_epoch}; {checkpoint_note}")


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Like keras.callbacks.TerminateOnNaN, but it raises, so the run exits non-zero
    with the epoch and step named, and no checkpoint is written after the bad step."""

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch, self.steps_done = epoch, 0

    def on_train_batch_end(self, batch, logs=None):
        # Reading the loss is a host-device sync point; the progress bar makes it anyway.
        # With several steps per call Keras reports each call's last step: the loss went
        # bad somewhere in the call's steps.
        loss = float((logs or {}).get("loss", 0.0))
        first, self.steps_done = self.steps_done + 1, batch + 1
        if not math.isfinite(loss):
            raise NonFiniteLossError(f"loss became {loss} at epoch {self.epoch + 1}, "
                                     f"{step_range(first, batch + 1)}; stopped. "
                                     "Try a smaller --lr")


class StopOnInterrupt(keras.callbacks.Callback):
    """Ctrl-C stops training at the end of the steps running (one call of Keras' step
    function: one step, or several with steps_per_execution), on every backend.

    A SIGINT handler only records the request: Keras' JAX path swallows a KeyboardInterrupt
    raised inside its log conversion (a bare `except`), and elsewhere one raised mid-step
    gives a long traceback. The callback raises at the end of the call instead, before any
    checkpoint of the partial epoch. A second Ctrl-C exits at once (os._exit), leaving the
    last checkpoint, which is always whole (written atomically)."""

    def __init__(self):
        super().__init__()
        self.requested = False
        self.epoch = 0
        self._previous = None

    def install(self) -> None:
        self._previous = signal.signal(signal.SIGINT, self._handle)

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _handle(self, signum, frame):
        if self.requested:
            os.write(2, b"\ntrain.py: second Ctrl-C: stopped at once; the last checkpoint written is kept\n")
            os._exit(130)
        self.requested = True
        # On stdout, so that stderr keeps the one line that says where the run stopped.
        os.write(1, b"\ntrain.py: Ctrl-C: stopping after the steps running; press it again to stop at once\n")

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.requested:
            raise _StopRequested(self.epoch + 1, batch + 1)


class _StopRequested(Exception):
    def __init__(self, epoch: int, step: int):
        super().__init__(epoch, step)
        self.epoch, self.step = epoch, step


class StepTimer(keras.callbacks.Callback):
    """Wall time of every training step (end of one batch to end of the next, so data
    loading is included) and of every epoch."""

    def __init__(self):
        super().__init__()
        self.step_seconds: list[list[float]] = []
        self.epoch_seconds: list[float] = []
        # The steps done at each call's end in the first epoch (the warm-up ends at one).
        self.first_calls: list[int] = []

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = self._last = time.perf_counter()
        self.step_seconds.append([])

    def on_train_batch_end(self, batch, logs=None):
        # `batch` is the call's last step: with steps_per_execution > 1 a call ran several
        # steps, and each gets an even share of the call's time.
        now = time.perf_counter()
        self.step_seconds[-1].extend(spread_over_steps(now - self._last, batch + 1 - len(self.step_seconds[-1])))
        self._last = now
        if len(self.step_seconds) == 1:
            self.first_calls.append(batch + 1)

    def on_epoch_end(self, epoch, logs=None):
        self.epoch_seconds.append(time.perf_counter() - self._epoch_start)

    def step_ms_median(self, warmup_steps: int = WARMUP_STEPS) -> float | None:
        """Median step time, leaving out the run's first steps (model.timing), rounded up to
        whole calls: a call's even shares would carry its compile time past the warm-up."""
        warmup_steps = next((done for done in self.first_calls if done >= warmup_steps), warmup_steps)
        steps = np.concatenate([past_warmup(self.step_seconds[0], warmup_steps), *self.step_seconds[1:]]
                               ) if self.step_seconds else []
        return float(np.median(steps) * 1000) if len(steps) else None


class AtomicCheckpoint(keras.callbacks.Callback):
    """At each epoch end: `best.keras` when validation improved, then `last.keras` with the
    trainer state inside it (one atomic unit). best.keras goes first: a kill between the
    two leaves last.keras at the previous epoch, whose resume rewrites the same best.keras."""

    def __init__(self, directory: Path, monitor: str = "val_accuracy", history: list | None = None, best=None,
                 run: dict | None = None, steps_per_epoch: int = 0, saved_epoch: int = 0):
        super().__init__()
        self.directory = Path(directory)
        self.monitor = monitor
        self.history = list(history or [])
        self.best = best
        self.run = dict(run or {})
        self.steps_per_epoch = steps_per_epoch
        self.saved_epoch = saved_epoch  # the epoch last.keras holds; 0: none

    def on_epoch_end(self, epoch, logs=None):
        logs = {key: float(value) for key, value in (logs or {}).items()}
        history = self.history + [{"epoch": epoch + 1, **logs}]
        current = logs.get(self.monitor)
        best = self.best
        if current is not None and (best is None or current > best):
            best = current
            # The user-facing best model: the bare network in stock Keras layers.
            self._save(portable_network(self.model.network), BEST_CHECKPOINT)
        state = {"format": TRAINER_STATE_FORMAT, "epochs_completed": epoch + 1, "steps_per_epoch": self.steps_per_epoch,
                 "monitor": self.monitor, "best": best, "history": history, "run": self.run}
        self._save(self.model, LAST_CHECKPOINT, state)
        self.history, self.best, self.saved_epoch = history, best, epoch + 1

    def _save(self, model, name: str, trainer_state: dict | None = None) -> None:
        path = self.directory / name
        try:
            save_model(model, path, trainer_state)
        except OSError as error:
            kept = f"the previous {name} is kept" if path.exists() else f"no {name} was written"
            raise CheckpointError(f"could not write {path} ({error.strerror or error}); {kept}") from None

    def note(self) -> str:
        """What a user who stops now can resume from."""
        if self.saved_epoch:
            return f"the last good checkpoint (epoch {self.saved_epoch}) is kept in {self.directory / LAST_CHECKPOINT}"
        return "no checkpoint was written yet"


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
    max_epochs: int = TrainConfig.epochs
    callbacks: list = field(default_factory=list)
    # At most this many batches per epoch (None: the data module's own limit, if any).
    limit_train_batches: int | None = TrainConfig.limit_train_batches
    # Batch size of validation and testing.
    eval_batch_size: int = TrainConfig.eval_batch_size
    deterministic: bool = False
    jit_compile: bool | str = "auto"
    # Training steps per call of Keras' step function (compile's steps_per_execution);
    # "auto": the most the backend takes (most_steps_per_execution) that divides an epoch.
    steps_per_execution: int | str = "auto"
    checkpoint_dir: str | Path | None = None
    verbose: int | str = "auto"
    # Stored in last.keras's trainer state: what defines the run (for --resume to check).
    run_settings: dict = field(default_factory=dict)
    # A data-parallel engine (model/devices.py start_engine); None: one device.
    engine: object = None

    def __post_init__(self):
        self.timer = StepTimer()
        self.history: list[dict] = []

    # ------------------------------------------------------------------ fit

    def fit(self, module, datamodule: MNISTDataModule, resume: bool = False):
        """Train `module` on `datamodule`; returns the module that was trained (the one
        loaded from the last checkpoint when resuming). Raises TrainingInterrupted after
        a Ctrl-C, NonFiniteLossError after a NaN/inf loss, CheckpointError when a
        checkpoint cannot be read or written."""
        BACKEND.configure(deterministic=self.deterministic)
        self.jit_compile = self._jit_compile()
        if self.engine is not None:  # data parallel: the engine says what it can compile
            self.jit_compile = self.engine.jit_compile(self.jit_compile)
        # Before the module is compiled: its learning-rate schedule spans the limited run.
        if self.limit_train_batches:
            datamodule.limit_train_batches = self.limit_train_batches
        initial_epoch, history, best = 0, [], None
        with self._engine_scope():  # TensorFlow: variables made here are mirrored
            if resume:
                module, initial_epoch, history, best = self._restore(datamodule)
            self._compile(module, datamodule)
        BACKEND.fuse_optimizer(module.optimizer)
        BACKEND.fuse_loss_and_metrics(module)
        resume_garbage_collection()  # paused while the run started (train.py)
        interrupt = StopOnInterrupt()
        callbacks = [StopOnNonFiniteLoss(), interrupt, self.timer]
        validation = (datamodule.x_val, datamodule.y_val) if len(datamodule.x_val) else None
        if self.engine is not None:
            self.engine.replicate(module)
            if validation is not None:
                callbacks.insert(0, ValidateUnsharded(self.engine, *validation, self.eval_batch_size))
                validation = None
        checkpoint = None
        if self.checkpoint_dir is not None and self.is_main:  # written once, by rank 0
            run = {**self.run_settings, "planned_epochs": self.max_epochs}
            checkpoint = AtomicCheckpoint(self.checkpoint_dir, history=history, best=best, run=run,
                                          steps_per_epoch=datamodule.steps_per_epoch, saved_epoch=initial_epoch)
            callbacks.append(checkpoint)
        callbacks.extend(self.callbacks)
        self.initial_epoch = initial_epoch
        if initial_epoch < self.max_epochs:
            interrupt.install()
            try:
                # Inside the try: the feed may start the data module's augmentation thread.
                data = BACKEND.training_data(datamodule, initial_epoch, self.max_epochs)
                if self.engine is not None:
                    data = self.engine.local_batches(data)
                module.fit(
                    data,
                    steps_per_epoch=datamodule.steps_per_epoch,
                    shuffle=False,  # the data module already shuffled, by seed and epoch
                    epochs=self.max_epochs,
                    initial_epoch=initial_epoch,
                    validation_data=validation,
                    validation_batch_size=self.eval_batch_size,
                    batch_size=None,
                    callbacks=callbacks,
                    verbose=self.verbose if self.is_main else 0,
                )
                if interrupt.requested:  # it came during the last validation pass: fit ended anyway
                    raise _StopRequested(self.max_epochs, datamodule.steps_per_epoch)
            except _StopRequested as stop:
                note = checkpoint.note() if checkpoint else "no checkpoint directory was given"
                raise TrainingInterrupted(stop.epoch, stop.step, datamodule.steps_per_epoch, note) from None
            except NonFiniteLossError as error:
                note = checkpoint.note() if checkpoint else "no checkpoint directory was given"
                raise NonFiniteLossError(f"{error}; {note}") from None
            finally:
                interrupt.uninstall()
                datamodule.teardown()  # the augmentation thread, however fit ended
        elif resume and getattr(module.optimizer, "use_ema", False):
            # Trained to the end, killed before its outputs were written: put the weight
            # average in place, as fit() does when it ends.
            module.optimizer.finalize_variable_values(module.trainable_weights)
        # Without a checkpoint callback (data-parallel ranks other than 0): the restored
        # history and what fit recorded, if it ran.
        trained = self._history_from(module) if initial_epoch < self.max_epochs else []
        self.history = checkpoint.history if checkpoint else history + trained
        return module

    @property
    def is_main(self) -> bool:
        """Whether this process writes logs, files and checkpoints (rank 0)."""
        return self.engine is None or self.engine.is_main

    def _jit_compile(self) -> bool:
        return BACKEND.default_jit_compile(self.deterministic) if self.jit_compile == "auto" else self.jit_compile

    def _compile(self, module: CNNModule, datamodule: MNISTDataModule) -> None:
        """Compile `module` unless it is: a learning-rate schedule left open (decay_steps
        None) spans the whole run, max_epochs of the data module's (limited) batches, as
        Lightning's estimated_stepping_batches does."""
        if module.compiled:
            return
        if module.decay_steps is None:
            module.decay_steps = self.max_epochs * datamodule.steps_per_epoch
        module.configure(jit_compile=self._jit_compile(),
                         steps_per_execution=self.steps_per_call(datamodule.steps_per_epoch))

    def steps_per_call(self, steps_per_epoch: int) -> int:
        """Training steps per call of Keras' step function for epochs of `steps_per_epoch`."""
        most = BACKEND.most_steps_per_execution()
        if self.engine is not None:  # data parallel: the engine says what it can run
            most = self.engine.steps_per_execution(most)
        if self.steps_per_execution == "auto":
            return whole_executions(steps_per_epoch, most)
        if not 1 <= self.steps_per_execution <= most:
            raise ValueError(f"steps_per_execution {self.steps_per_execution} is not in 1..{most}, what this "
                             "backend (and data-parallel engine) runs; use one of those, or 'auto'")
        if steps_per_epoch % self.steps_per_execution:
            raise ValueError(f"steps_per_execution {self.steps_per_execution} does not divide an epoch's "
                             f"{steps_per_epoch} steps; use a divisor of it, or 'auto'")
        return self.steps_per_execution

    def _engine_scope(self):
        return self.engine.scope() if self.engine is not None else contextlib.nullcontext()

    def _restore(self, datamodule: MNISTDataModule):
        """(module, epochs completed, history, best) from last.keras and the trainer state
        stored inside it; every disagreement is a one-line CheckpointError."""
        if self.checkpoint_dir is None:
            raise CheckpointError("resume needs a checkpoint directory")
        last = Path(self.checkpoint_dir) / LAST_CHECKPOINT
        state = read_trainer_state(last)
        module = load_model(last)
        if not isinstance(module, CNNModule) or getattr(module, "optimizer", None) is None:
            raise CheckpointError(f"{last} is a model without its optimizer state, not a resume checkpoint; "
                                  "start a new run")
        planned = state["run"].get("planned_epochs")
        if planned != self.max_epochs:
            raise CheckpointError(f"{last} belongs to a run planned for {planned} epochs, not {self.max_epochs}; "
                                  "resume it with the epochs it was planned for")
        steps_done = int(keras.ops.convert_to_numpy(module.optimizer.iterations))
        epoch = state["epochs_completed"]
        if state.get("steps_per_epoch") != datamodule.steps_per_epoch or steps_done != epoch * datamodule.steps_per_epoch:
            raise CheckpointError(
                f"{last} holds {steps_done} optimizer steps for {epoch} epochs of {state.get('steps_per_epoch')} steps, "
                f"but this run has {datamodule.steps_per_epoch} steps per epoch; resume with the batch size and "
                "--limit-train-batches it was trained with")
        history = state["history"]
        if [entry.get("epoch") if isinstance(entry, dict) else None for entry in history] != list(range(1, epoch + 1)):
            raise CheckpointError(f"the trainer state in {last} has a history that does not cover epochs 1..{epoch}; "
                                  "it cannot be resumed")
        # jit_compile is how this backend runs the steps, not part of the maths: the
        # resuming backend's own choice applies, not the one saved by whichever trained.
        module.jit_compile = self.jit_compile
        module.steps_per_execution = self.steps_per_call(datamodule.steps_per_epoch)
        return module, epoch, history, state.get("best")

    @staticmethod
    def _history_from(module) -> list[dict]:
        logs = module.history.history if module.history else {}
        epochs = module.history.epoch if module.history else []
        return [{"epoch": e + 1, **{k: float(v[i]) for k, v in logs.items()}} for i, e in enumerate(epochs)]

    # ------------------------------------------------------------------ evaluate

    def test(self, module, datamodule: MNISTDataModule) -> dict:
        """{"test_loss", "test_accuracy"} on the data module's test set."""
        self._compile(module, datamodule)
        with self.engine.unsharded() if self.engine is not None else contextlib.nullcontext():
            logs = module.evaluate(datamodule.x_test, datamodule.y_test, batch_size=self.eval_batch_size, verbose=0,
                                   return_dict=True)
        return {f"test_{name}": float(value) for name, value in logs.items()}

    def predict(self, module, images):
        return module.predict(images, batch_size=self.eval_batch_size, verbose=0)
