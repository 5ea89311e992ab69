"""One benchmark cell, measured inside its own process:

    python -m benchmarks.measure SPEC.json RESULT.json

benchmarks/cells.py starts it with KERAS_BACKEND and the device variables already set
(a framework reads them once, at import), so this process holds one backend on one
device for its life. SPEC names the cell (backend, device, path, batch_size) and the
run's shape (epochs, limit_train_batches, warmup_steps, validate, test_images,
progress_every); RESULT gets
the cell's measurements. Progress goes to stderr as lines starting with PROGRESS.

Every step is timed the way model.trainer.StepTimer times it: from the end of one
step to the end of the next (the first from the start of the epoch), so data
preparation is included, and after a device sync: on the Keras paths the trainer's
NaN guard reads the loss every step, and the framework path does the same.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import inspect
import json
import math
import os
import platform
import resource
import sys
import time
import traceback
from pathlib import Path

PROGRESS = "[cell] "

# The paths a cell can time, in the order the matrix lists them.
KERAS_PATHS = {
    "keras-fit": {"pooling": "fast", "step": "keras"},
    "keras-fit-stock": {"pooling": "stock", "step": "keras"},
    "native-step": {"pooling": "fast", "step": "native"},
}
PATHS = (*KERAS_PATHS, "framework")
DEVICES = ("cpu", "gpu")


class CellSkipped(Exception):
    """The cell cannot run here (no GPU, framework not installed); the message says why."""


def progress(message: str) -> None:
    print(PROGRESS + message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- device


def check_framework_installed(backend: str) -> None:
    if importlib.util.find_spec(backend) is None:
        raise CellSkipped(f"{backend} is not installed; install it with: pip install -c constraints.txt '.[{backend}]'")


def gpu_device_nodes() -> list[str]:
    """Device files a GPU driver creates (NVIDIA, AMD ROCm, WSL)."""
    return glob.glob("/dev/nvidia[0-9]*") + glob.glob("/dev/kfd") + glob.glob("/dev/dxg")


def check_gpu_visible(backend: str) -> None:
    """Raise CellSkipped unless `backend`'s framework sees a GPU. A GPU cell never falls
    back to the CPU: it runs on a GPU or not at all."""
    # Without a driver no framework can see a GPU; looking costs nothing, while importing
    # TensorFlow to ask costs seconds per cell.
    if sys.platform.startswith("linux") and not gpu_device_nodes():
        raise CellSkipped("no GPU on this machine (no /dev/nvidia*, /dev/kfd or /dev/dxg)")
    if backend == "jax":
        import jax

        try:
            devices = jax.devices()
        except RuntimeError as error:  # JAX_PLATFORMS=cuda and no CUDA backend
            raise CellSkipped(f"jax {jax.__version__} sees no GPU ({str(error).splitlines()[0]})") from None
        if not any(device.platform in ("gpu", "cuda", "rocm") for device in devices):
            raise CellSkipped(f"jax {jax.__version__} sees no GPU (devices: {devices})")
    elif backend == "tensorflow":
        import tensorflow as tf

        if not tf.config.list_physical_devices("GPU"):
            raise CellSkipped(f"tensorflow {tf.__version__} sees no GPU (tf.config.list_physical_devices('GPU') is empty)")
    elif backend == "torch":
        import torch

        if not torch.cuda.is_available():
            raise CellSkipped(f"torch {torch.__version__} sees no GPU (torch.cuda.is_available() is False)")


def tf32_settings(backend: str) -> dict:
    """Whether float32 matmuls/convolutions may use TF32 on a GPU, as the framework says."""
    if backend == "jax":
        import jax

        precision = jax.config.jax_default_matmul_precision
        return {"jax_default_matmul_precision": precision, "tf32_allowed": precision in (None, "default", "bfloat16", "tensorfloat32")}
    if backend == "tensorflow":
        import tensorflow as tf

        enabled = bool(tf.config.experimental.tensor_float_32_execution_enabled())
        return {"tensor_float_32_execution": enabled, "tf32_allowed": enabled}
    import torch

    matmul, cudnn = bool(torch.backends.cuda.matmul.allow_tf32), bool(torch.backends.cudnn.allow_tf32)
    return {"torch.backends.cuda.matmul.allow_tf32": matmul, "torch.backends.cudnn.allow_tf32": cudnn,
            "float32_matmul_precision": torch.get_float32_matmul_precision(), "tf32_allowed": matmul or cudnn}


def framework_runtime(backend: str) -> dict:
    """The framework's own version and CUDA build, as it reports them."""
    if backend == "jax":
        import jax

        return {"framework_version": jax.__version__, "cuda": None}
    if backend == "tensorflow":
        import tensorflow as tf

        return {"framework_version": tf.__version__, "cuda": tf.sysconfig.get_build_info().get("cuda_version")}
    import torch

    return {"framework_version": torch.__version__, "cuda": torch.version.cuda}


def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes.
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


# ----------------------------------------------------------------------------- statistics


def timed_step_seconds(step_seconds: list[list[float]], warmup_steps: int) -> list[float]:
    """Every step of the run except the first `warmup_steps` of the first epoch (tracing,
    compilation, cold caches)."""
    steps = [seconds for epoch in step_seconds for seconds in epoch]
    return steps[warmup_steps:]


def step_statistics(seconds: list[float], batch_size: int) -> dict:
    import numpy as np

    milliseconds = np.asarray(seconds, dtype=float) * 1000.0
    p10, median, p90 = (float(v) for v in np.percentile(milliseconds, [10, 50, 90]))
    return {
        "step_ms_median": median,
        "step_ms_p10": p10,
        "step_ms_p90": p90,
        "step_ms_min": float(milliseconds.min()),
        "step_ms_max": float(milliseconds.max()),
        "timed_steps": int(milliseconds.size),
        "samples_per_s": batch_size / (median / 1000.0),
        "timed_step_ms": [round(float(v), 3) for v in milliseconds],
    }


def epoch_seconds(step_seconds: list[list[float]]) -> float | None:
    """Wall time of the second epoch's training steps (validation excluded): an epoch
    after the first, so no compilation is in it. None when the run had one epoch."""
    return float(sum(step_seconds[1])) if len(step_seconds) > 1 else None


class ProgressReporter:
    """Step-count lines every `every` steps and at the end of each epoch, not more."""

    def __init__(self, epochs: int, steps_per_epoch: int, every: int):
        self.epochs, self.steps_per_epoch, self.every = epochs, steps_per_epoch, every

    def step_done(self, epoch: int, step: int, epoch_steps: list[float]) -> None:
        last = step + 1 == self.steps_per_epoch
        if not last and not (self.every and (step + 1) % self.every == 0):
            return
        recent = sorted(epoch_steps[-self.every or None:])
        median = recent[len(recent) // 2] * 1000
        progress(f"epoch {epoch + 1}/{self.epochs} step {step + 1}/{self.steps_per_epoch}, {median:.1f} ms/step")


# ----------------------------------------------------------------------------- paths


def train_config(spec: dict, path: str):
    from model.config import TrainConfig

    # TrainConfig's defaults (lr, seed, augmentation, split) but no checkpoints.
    return TrainConfig(epochs=spec["epochs"], batch_size=spec["batch_size"], limit_train_batches=spec["limit_train_batches"],
                       output_dir=None, **KERAS_PATHS.get(path, {}))


def datamodule_for(config, datamodule_class):
    """The data module prepare_run builds for `config` (every data-module field taken from
    the config field of the same name; `path` from `data`), so the framework path trains
    on the same batches even as the data module gains fields."""
    names = [field.name for field in dataclasses.fields(datamodule_class)]
    values = {name: getattr(config, "data" if name == "path" else name) for name in names}
    return datamodule_class(**values)


def limit_test_images(datamodule, count: int | None) -> None:
    """Keep the first `count` test images (None: all 10,000); quick mode's accuracy is
    a sanity check, and on a CPU evaluating all of them costs seconds per cell."""
    if count:
        datamodule.x_test, datamodule.y_test = datamodule.x_test[:count], datamodule.y_test[:count]


def data_settings(datamodule) -> dict:
    """The data module's fields: equal on every path of a backend, or the batches differ."""
    return {field.name: getattr(datamodule, field.name) for field in dataclasses.fields(datamodule)}


def run_keras_path(spec: dict) -> dict:
    """train.py's own code: prepare_run(config) then trainer.fit, then trainer.test."""
    started_import = time.perf_counter()
    import keras

    from backends import backend_module
    from benchmarks.initial_weights import weights_digest
    from model.training import prepare_run

    progress(f"imported keras {keras.__version__} on {keras.backend.backend()} in {time.perf_counter() - started_import:.1f} s")
    backend = backend_module()
    config = train_config(spec, spec["path"])
    module, datamodule, trainer = prepare_run(config)
    if not spec["validate"]:
        # No reported figure depends on the per-epoch validation pass (step times and
        # epoch_s leave it out); quick mode drops it to save its compilation.
        datamodule.x_val, datamodule.y_val = datamodule.x_val[:0], datamodule.y_val[:0]
    limit_test_images(datamodule, spec["test_images"])
    initial_digest = weights_digest(module.network.get_weights())
    reporter = ProgressReporter(config.epochs, datamodule.steps_per_epoch, spec["progress_every"])

    class FirstStepAndProgress(keras.callbacks.Callback):
        # Added after the trainer's own callbacks, so the NaN guard has already synced
        # the device (it reads the loss) when this reads the clock.
        first_step_end = None

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_train_batch_end(self, batch, logs=None):
            if self.first_step_end is None:
                self.first_step_end = time.perf_counter()
                progress(f"first step (tracing/compilation included) after {self.first_step_end - fit_started:.2f} s")
            reporter.step_done(self.epoch, batch, trainer.timer.step_seconds[-1])

    watcher = FirstStepAndProgress()
    trainer.callbacks.append(watcher)
    trainer.verbose = 0  # a progress bar per step is terminal I/O, not the training being measured
    fit_started = time.perf_counter()
    module = trainer.fit(module, datamodule)
    test_started = time.perf_counter()
    test = trainer.test(module, datamodule)
    device = backend.device_name()
    return {
        "phase_s": {"setup": fit_started - started_import, "fit": test_started - fit_started,
                    "test": time.perf_counter() - test_started},
        "first_step_s": watcher.first_step_end - fit_started,
        "step_seconds": trainer.timer.step_seconds,
        "test_accuracy": test["test_accuracy"],
        # Keras logs an epoch's loss as the mean over its batches, weighted by batch size.
        "train_loss_last_epoch": trainer.history[-1].get("loss") if trainer.history else None,
        "optimizer": {"lr": config.lr, "decay_steps": module.decay_steps,
                      "ema_momentum": getattr(config, "ema_momentum", None)},
        "peak_device_mb": backend.peak_device_memory_mb(),
        "device_name": device,
        "steps_per_epoch": datamodule.steps_per_epoch,
        "initial_weights": initial_digest,
        "data": data_settings(datamodule),
        "keras_version": keras.__version__,
    }


def keras_modules() -> set[str]:
    return {name for name in sys.modules if name == "keras" or name.startswith("keras.")}


def run_framework_path(spec: dict) -> dict:
    """The hand-written baseline: the same initial weights, Adam, cosine schedule and
    batches as the Keras paths, with no keras import."""
    started_import = time.perf_counter()
    # TensorFlow imports parts of keras by itself; what counts is what this path adds.
    importlib.import_module(spec["backend"])
    keras_from_framework = keras_modules()
    from benchmarks.framework import load_baseline
    from benchmarks.initial_weights import seeded_cnn_weights, weights_digest
    from model.data import MNISTDataModule

    baseline_module = load_baseline(spec["backend"])
    progress(f"imported the {spec['backend']} baseline in {time.perf_counter() - started_import:.1f} s")
    config = train_config(spec, "framework")
    datamodule = datamodule_for(config, MNISTDataModule).setup()
    limit_test_images(datamodule, spec["test_images"])
    weights = seeded_cnn_weights(config.seed)
    reporter = ProgressReporter(config.epochs, datamodule.steps_per_epoch, spec["progress_every"])

    optimizer = {"lr": config.lr, "decay_steps": config.epochs * datamodule.steps_per_epoch}
    ema_momentum = getattr(config, "ema_momentum", None)
    if ema_momentum is not None and "ema_momentum" in inspect.signature(baseline_module.build).parameters:
        optimizer["ema_momentum"] = ema_momentum

    build_started = time.perf_counter()
    baseline = baseline_module.build(weights, **optimizer)
    first_step_end, step_seconds = None, []
    for epoch in range(config.epochs):
        step_seconds.append([])
        loss_sum, samples = 0.0, 0
        last = time.perf_counter()
        for step, (images, labels) in enumerate(datamodule.train_batches(epoch)):
            loss = baseline.train_step(images, labels)
            # A CPU-GPU sync point before the clock read; reading the loss on the host is
            # what the Keras paths' NaN guard does every step too.
            baseline.synchronize(loss)
            value = baseline.loss_value(loss)
            now = time.perf_counter()
            if not math.isfinite(value):
                raise FloatingPointError(f"loss became {value} at epoch {epoch + 1}, step {step + 1}")
            step_seconds[-1].append(now - last)
            last = now
            loss_sum, samples = loss_sum + value * len(labels), samples + len(labels)
            if first_step_end is None:
                first_step_end = now
                progress(f"first step (tracing/compilation included) after {first_step_end - build_started:.2f} s")
            reporter.step_done(epoch, step, step_seconds[-1])
    keras_added = sorted(keras_modules() - keras_from_framework)
    test_started = time.perf_counter()
    predictions = baseline.predict(datamodule.x_test)
    test_accuracy = float((predictions.argmax(axis=-1) == datamodule.y_test).mean())
    return {
        "phase_s": {"setup": build_started - started_import, "fit": test_started - build_started,
                    "test": time.perf_counter() - test_started},
        "first_step_s": first_step_end - build_started,
        "step_seconds": step_seconds,
        "test_accuracy": test_accuracy,
        "train_loss_last_epoch": loss_sum / samples if samples else None,
        "optimizer": {"ema_momentum": None, **optimizer},
        "peak_device_mb": baseline.peak_device_memory_mb(),
        "device_name": baseline.device_name(),
        "steps_per_epoch": datamodule.steps_per_epoch,
        "initial_weights": weights_digest(weights),
        "data": data_settings(datamodule),
        "keras_imported_by_path": bool(keras_added),
        "keras_modules_added": keras_added[:5],
    }


# ----------------------------------------------------------------------------- cell


def measure_cell(spec: dict) -> dict:
    from backends import framework_flags_in_effect

    backend, device, path = spec["backend"], spec["device"], spec["path"]
    started = time.perf_counter()
    check_framework_installed(backend)
    if device == "gpu":
        check_gpu_visible(backend)
    raw = run_framework_path(spec) if path == "framework" else run_keras_path(spec)
    if device == "gpu" and not any(word in raw["device_name"].lower() for word in ("gpu", "cuda", "rocm")):
        # The framework saw a GPU but ran on something else: not a GPU measurement.
        raise CellSkipped(f"{backend} ran on {raw['device_name']!r}, not a GPU")
    step_seconds = raw.pop("step_seconds")
    timed = timed_step_seconds(step_seconds, spec["warmup_steps"])
    if not timed:
        raise RuntimeError(f"no steps left to time: {sum(map(len, step_seconds))} steps, {spec['warmup_steps']} of them warm-up")
    result = {
        "status": "ok",
        "reason": None,
        "first_step_s": raw.pop("first_step_s"),
        **step_statistics(timed, spec["batch_size"]),
        "epoch_s": epoch_seconds(step_seconds),
        "test_accuracy": raw.pop("test_accuracy"),
        "peak_rss_mb": peak_rss_mb(),
        "peak_device_mb": raw.pop("peak_device_mb") if device == "gpu" else None,
        "warmup_steps": spec["warmup_steps"],
        "test_images": spec["test_images"] or 10_000,
        "epochs": len(step_seconds),
        **raw,
        "tf32": tf32_settings(backend),
        "framework_flags": framework_flags_in_effect(backend),
        **framework_runtime(backend),
    }
    return result


def die_with_parent() -> None:
    """Ask Linux to kill this process when the benchmark process that started it dies, so
    a killed benchmark leaves no cell running on (and skewing) the machine."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before the request was in place
        os._exit(1)


def main(argv: list[str]) -> int:
    die_with_parent()
    spec_path, result_path = Path(argv[0]), Path(argv[1])
    spec = json.loads(spec_path.read_text())
    from model.checkpoint import write_json

    try:
        result = measure_cell(spec)
        code = 0
    except CellSkipped as reason:
        result, code = {"status": "skipped", "reason": str(reason)}, 0
    except Exception as error:
        traceback.print_exc()
        message = str(error).strip().splitlines()
        result = {"status": "failed", "reason": f"{type(error).__name__}: {message[0]}" if message else type(error).__name__}
        code = 1
    result.setdefault("python", platform.python_version())
    write_json(result_path, result)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
