"""One clean timing window of training steps, the same on every path.

Before the window, the data module's first epoch is prepared (shuffled and augmented:
`data_s_per_epoch`; --quick prepares only the window's batches and scales) and cut to `warmup_steps + window_steps` full batches, which every
path gets as the same arrays: the Keras paths through train.py's own code (prepare_run,
Trainer.fit, whose feed then slices the prepared arrays), the framework path a call's
batches at a time. So the window lies inside one epoch, holds only full batches (no new shape to
compile) and no data preparation.

Clocks: after every step the backend's `synchronize` runs on the step's loss, then the
clock is read; step i's time is the gap between the reads after steps i-1 and i. Where
Keras runs several steps per call (train.py's steps_per_execution, Trainer "auto"), its
callbacks, and so the clock, see only each call's last step, and the hand-written loop
runs as many steps per call: each step of a call gets an even share of the call's time,
and the warm-up and the window are rounded up to whole calls.
  compile_s       fit()/build start to the end of the first step (data already prepared;
                  with several steps per call, the end of the first call, its other steps included);
  step_ms         every window step's time (the latency distribution);
  images_per_s    window images / window wall time (first read before, last after the window);
  epoch_s         data_s_per_epoch + a full epoch's images at images_per_s: an epoch as
                  a user sees it, without the validation pass (derived, not timed whole).
"""

from __future__ import annotations

import importlib
import math
import time

import numpy as np

from model.timing import past_warmup, spread_over_steps, step_range, step_seconds, whole_calls, whole_executions


def prepared_epoch(datamodule, steps: int, whole_epoch: bool = True) -> tuple[np.ndarray, np.ndarray, float, int]:
    """(images, labels) of epoch 0 cut to `steps` full batches, the seconds preparing a
    whole epoch takes, and how many images an epoch has. With whole_epoch False (--quick)
    only the window's batches are prepared and the epoch's seconds scaled from them."""
    epoch_images, batch_size = len(datamodule.x_train), datamodule.batch_size
    if steps > epoch_images // batch_size:
        raise ValueError(f"a window of {steps} steps needs {steps} full batches; an epoch has {epoch_images // batch_size}")
    limit, datamodule.limit_train_batches = datamodule.limit_train_batches, None if whole_epoch else steps
    started = time.perf_counter()
    images, labels = datamodule.train_epoch(0)  # as a user's run prepares it
    data_s = (time.perf_counter() - started) * epoch_images / len(images)
    datamodule.limit_train_batches = limit
    count = steps * batch_size
    return images[:count], labels[:count], data_s, epoch_images


def window_figures(started: float, step_ends: list[float], warmup_steps: int, batch_size: int) -> dict:
    """The figures of one window from the clock reads after each step (`started`: the read
    before the first step)."""
    window_s = past_warmup(step_seconds(started, step_ends), warmup_steps)
    if window_s.size == 0:
        raise RuntimeError(f"no window steps: {len(step_ends)} steps ran, {warmup_steps} of them warm-up")
    step_ms = window_s * 1000.0
    wall_s = float(window_s.sum())
    return {
        "compile_s": float(step_ends[0] - started),
        "window_steps": int(step_ms.size),
        "step_ms_mean": float(step_ms.mean()),
        "step_ms_p50": float(np.percentile(step_ms, 50)),
        "step_ms_p10": float(np.percentile(step_ms, 10)),
        "step_ms_p90": float(np.percentile(step_ms, 90)),
        "step_ms_p99": float(np.percentile(step_ms, 99)),
        "images_per_s": step_ms.size * batch_size / wall_s,
        "step_ms": [round(float(value), 3) for value in step_ms],
    }


def add_call(step_ends: list[float], call_ends: list[float], started: float, now: float, steps: int) -> None:
    """Record a call that ran `steps` steps and ended at `now` (`started`: the clock read
    before the first call): each step's end, the call's time shared evenly, and the call's."""
    previous = step_ends[-1] if step_ends else started
    step_ends.extend((previous + np.cumsum(spread_over_steps(now - previous, steps))).tolist())
    call_ends.append(now)


def add_epoch_estimate(figures: dict, data_s: float, epoch_images: int) -> dict:
    figures.update(data_s_per_epoch=data_s, epoch_s=data_s + epoch_images / figures["images_per_s"])
    return figures


def run_keras_path(spec: dict, config, progress) -> dict:
    """train.py's code: prepare_run(config), then Trainer.fit on the prepared window."""
    import keras

    from model.backend import BACKEND as backend
    from model.training import prepare_run

    module, datamodule, trainer = prepare_run(
        config.replace(epochs=1, limit_train_batches=spec["warmup_steps"] + spec["window_steps"]))
    # Steps per call as train.py's whole epochs get them; the window in whole calls.
    datamodule.limit_train_batches = None
    trainer.steps_per_execution = trainer.steps_per_call(datamodule.steps_per_epoch)
    warmup_steps, window_steps = (whole_calls(spec[name], trainer.steps_per_execution)
                                  for name in ("warmup_steps", "window_steps"))
    steps = datamodule.limit_train_batches = warmup_steps + window_steps
    images, labels, data_s, epoch_images = prepared_epoch(datamodule, steps, spec["whole_epoch_data"])
    # Every feed (the generator on JAX and torch, tf.data on TensorFlow) takes its epoch
    # from epoch_pieces (made ahead by a background thread) or train_epoch: from now on,
    # the prepared arrays, in the same pieces, with no thread augmenting beside the window.
    piece = datamodule.piece_images
    datamodule.train_epoch = lambda epoch: (images, labels)
    datamodule.epoch_piece = lambda epoch, index: (images[index * piece : (index + 1) * piece],
                                                   labels[index * piece : (index + 1) * piece])
    datamodule.epoch_pieces = lambda epoch: (datamodule.epoch_piece(epoch, index)
                                             for index in range(datamodule.pieces_per_epoch))
    datamodule.x_val, datamodule.y_val = datamodule.x_val[:0], datamodule.y_val[:0]
    step_ends, call_ends = [], []
    barrier = worker_barrier(trainer.engine)

    class Clock(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            backend.synchronize((logs or {}).get("loss"))  # the device has finished this step
            barrier()  # and so has every other worker (data parallel with one process per device)
            now = time.perf_counter()
            # This call ran steps len(step_ends) + 1 to batch + 1 (several with steps_per_execution).
            add_call(step_ends, call_ends, started, now, batch + 1 - len(step_ends))

    trainer.callbacks.append(Clock())
    trainer.verbose = 0
    progress(f"keras {keras.__version__} on {backend.__name__}: {steps} steps, data prepared in {data_s:.2f} s")
    started = time.perf_counter()
    trainer.fit(module, datamodule)
    figures = {**window_figures(started, step_ends, warmup_steps, config.batch_size), "compile_s": call_ends[0] - started}
    engine = trainer.engine
    # The devices that really trained, read back from the engine's copies of the weights (a
    # collective under torch: every worker takes part), and how far those copies drifted apart.
    devices_used, replica_difference = engine.replica_difference(module) if engine is not None else (1, 0.0)
    return {**add_epoch_estimate(figures, data_s, epoch_images), "steps_run": len(step_ends),
            "epochs_run": len(trainer.timer.step_seconds), "window_images": len(images),
            "device_name": backend.device_name(), "peak_device_mb": backend.peak_device_memory_mb(),
            "keras_version": keras.__version__, "devices_used": devices_used,
            "engine": engine.ENGINE if engine is not None else "single device",
            "replica_max_weight_difference": replica_difference, "jit_compile": bool(module.jit_compile),
            "steps_per_execution": module.steps_per_execution}


def worker_barrier(engine):
    """A barrier every worker enters after each step when data parallel runs one process
    per device (torch's process group), so that rank 0's clock reads the step's end on all
    of them; otherwise nothing (one process drives every device)."""
    import sys

    distributed = sys.modules.get("torch.distributed")
    if engine is not None and distributed is not None and distributed.is_initialized():
        return distributed.barrier
    return lambda: None


def run_framework_path(spec: dict, config, progress) -> dict:
    """The hand-written baseline on the same prepared window, with no keras import, as many
    steps per call as the Keras path runs on this backend (its `most_steps_per_execution`,
    a divisor of the epoch: model.timing.whole_executions), the loss read after each call."""
    importlib.import_module(spec["backend"])
    keras_before = keras_modules()
    from backends import backend_module
    from benchmarks.framework import load_baseline
    from benchmarks.initial_weights import seeded_cnn_weights
    from model.data import datamodule_from

    datamodule = datamodule_from(config, limit_train_batches=None).setup()
    per_call = whole_executions(datamodule.steps_per_epoch, backend_module(spec["backend"]).most_steps_per_execution())
    warmup_steps, window_steps = (whole_calls(spec[name], per_call) for name in ("warmup_steps", "window_steps"))
    steps = warmup_steps + window_steps
    images, labels, data_s, epoch_images = prepared_epoch(datamodule, steps, spec["whole_epoch_data"])
    optimizer = {"lr": config.lr, "decay_steps": steps, "ema_momentum": config.ema_momentum,
                 "label_smoothing": config.label_smoothing}
    baseline = load_baseline(spec["backend"]).build(seeded_cnn_weights(config.seed), **optimizer)
    progress(f"{spec['backend']} baseline: {steps} steps, {per_call} a call, data prepared in {data_s:.2f} s")
    # Each call's batches as one stack (steps, batch, ...): a view of the prepared arrays.
    calls = zip(images.reshape(-1, per_call, config.batch_size, *images.shape[1:]),
                labels.reshape(-1, per_call, config.batch_size, *labels.shape[1:]))
    step_ends, call_ends = [], []
    started = time.perf_counter()
    for call_images, call_labels in calls:
        loss = baseline.train_steps(call_images, call_labels)
        baseline.synchronize(loss)  # the device has finished this call's steps
        # Reading the loss after each call, as the Keras paths' NaN guard does.
        if not math.isfinite(baseline.loss_value(loss)):
            raise FloatingPointError(f"loss became {baseline.loss_value(loss)} at "
                                     f"{step_range(len(step_ends) + 1, len(step_ends) + per_call)}")
        add_call(step_ends, call_ends, started, time.perf_counter(), per_call)
    figures = {**window_figures(started, step_ends, warmup_steps, config.batch_size), "compile_s": call_ends[0] - started}
    added = sorted(keras_modules() - keras_before)
    return {**add_epoch_estimate(figures, data_s, epoch_images), "steps_run": len(step_ends), "epochs_run": 1,
            "window_images": len(images), "device_name": baseline.device_name(),
            "peak_device_mb": baseline.peak_device_memory_mb(), "keras_imported_by_path": bool(added),
            "steps_per_execution": per_call}


def keras_modules() -> set[str]:
    import sys

    return {name for name in sys.modules if name == "keras" or name.startswith("keras.")}
