"""One benchmark cell, measured inside its own process:

    python -m benchmarks.measure SPEC.json RESULT.json

benchmarks/cells.py starts it with KERAS_BACKEND and the device variables already set
(a framework reads them once, at import), so this process holds one backend on one
device for its life. SPEC names the cell (backend, device, path, batch_size) and what
to measure; RESULT gets the cell's figures for this round. Progress goes to stderr as
lines starting with PROGRESS.

A training cell times one clean window (benchmarks/window.py): the epoch's augmented
batches are prepared before it (the same arrays on every path), then `warmup_steps +
window_steps` full batches run inside that one epoch, so the window holds no epoch
boundary, no partial batch and no new shape to compile. The hardware floor
(benchmarks/floor.py) is measured in this process before and after the window.
A keras-fit cell on N > 1 devices trains data-parallel as `train.py --devices N` does:
the backend's `launch` (torch: N processes over Gloo or NCCL; JAX and TensorFlow: this
one, whose environment already holds N simulated CPU devices) runs the same window on
each worker, rank 0 times it, and the devices really used are read back from inside
(the engine's copies of the weights). It measures no floor: TensorFlow's logical
devices must be made before its first op, which the floor would run.
A time-to-accuracy cell trains one of train.py's recipes (spec["recipe"], a name in
model/config.py RECIPES) until the test accuracy reaches the target; a predict cell times inference (benchmarks/inference.py).
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import platform
import resource
import sys
import time
import traceback
from pathlib import Path

PROGRESS = "[cell] "

# The training paths a cell can time, in the order the matrix lists them.
KERAS_PATHS = {
    "keras-fit": {"pooling": "fast", "step": "keras"},
    "keras-fit-stock": {"pooling": "stock", "step": "keras"},
    "native-step": {"pooling": "fast", "step": "native"},
}
PATHS = (*KERAS_PATHS, "framework")
# The path a cell on more than one device times: train.py's own.
DATA_PARALLEL_PATH = "keras-fit"
# The other cell kinds: train.py's recipe to a target accuracy, and inference.
TIME_TO_ACCURACY = "time-to-accuracy"
PREDICT = "predict"
DEVICES = ("cpu", "gpu")
# A predict cell's peer runtime: the exported ONNX model, in onnxruntime on the CPU.
ONNX_RUNTIME = "onnxruntime"


class CellSkipped(Exception):
    """The cell cannot run here (no GPU, framework not installed); the message says why."""


def progress(message: str) -> None:
    print(PROGRESS + message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- device


def check_framework_installed(backend: str, extra: str | None = None) -> None:
    if importlib.util.find_spec(backend) is None:
        from model.runtime import install_command

        raise CellSkipped(f"{backend} is not installed; install it with: {install_command(extra or backend)}")


def gpu_device_nodes() -> list[str]:
    """Device files a GPU driver creates (NVIDIA, AMD ROCm, WSL)."""
    return glob.glob("/dev/nvidia[0-9]*") + glob.glob("/dev/kfd") + glob.glob("/dev/dxg")


def no_gpu_reason() -> str | None:
    """Why no framework can see a GPU here (no driver's device files), else None. Looking
    costs nothing, while starting a cell to ask its framework costs seconds: the benchmark
    asks this once and starts no GPU cell when it answers."""
    if sys.platform.startswith("linux") and not gpu_device_nodes():
        return "no GPU on this machine (no /dev/nvidia*, /dev/kfd or /dev/dxg)"
    return None


def check_gpu_visible(backend: str, count: int = 1) -> None:
    """Raise CellSkipped unless `backend`'s framework sees `count` GPUs. A GPU cell never
    falls back to the CPU: it runs on a GPU or not at all."""
    reason = no_gpu_reason()
    if reason:
        raise CellSkipped(reason)
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
    if count > 1:
        visible = visible_gpus(backend)
        if visible < count:
            raise CellSkipped(f"{count} devices asked for; {backend} sees {visible} GPU{'s' if visible != 1 else ''}")


def visible_gpus(backend: str) -> int:
    if backend == "jax":
        import jax

        return sum(device.platform in ("gpu", "cuda", "rocm") for device in jax.devices())
    if backend == "tensorflow":
        import tensorflow as tf

        return len(tf.config.list_physical_devices("GPU"))
    import torch

    return torch.cuda.device_count()


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


# ----------------------------------------------------------------------------- cells


def train_config(spec: dict, path: str, **changes):
    from model.config import TrainConfig

    # TrainConfig's defaults (lr, seed, augmentation, split) but no checkpoints.
    return TrainConfig(batch_size=spec["batch_size"], output_dir=None, **KERAS_PATHS.get(path, {}), **changes)


def limit_test_images(datamodule, count: int | None) -> None:
    """Keep the first `count` test images (None: all 10,000)."""
    if count:
        datamodule.x_test, datamodule.y_test = datamodule.x_test[:count], datamodule.y_test[:count]


def measure_training_cell(spec: dict) -> dict:
    from benchmarks import window
    from benchmarks.floor import measure_floor

    if spec.get("device_count", 1) > 1:
        return measure_data_parallel_cell(spec)
    model_shape = tuple(spec["model_shape"])
    floor = spec["floor"]  # how long and how much of the floor to measure (suite.MODES)
    floor_before = measure_floor(spec["backend"], model_shape, **floor)
    progress(f"floor before: {floor_before['sgemm_gflops_model_shape']:.0f} GFLOP/s sgemm at {model_shape}")
    run = window.run_framework_path if spec["path"] == "framework" else window.run_keras_path
    result = run(spec, train_config(spec, spec["path"]), progress)
    floor_after = measure_floor(spec["backend"], model_shape, **floor)
    return {**result, "floor_before": floor_before, "floor_after": floor_after}


def measure_data_parallel_cell(spec: dict) -> dict:
    """keras-fit on spec["device_count"] devices, started as train.py starts it: the
    backend's launch runs data_parallel_worker on every worker; rank 0's figures return."""
    import tempfile

    from backends import backend_module
    from model.devices import check_placement

    config = train_config(spec, DATA_PARALLEL_PATH, accelerator=spec["device"], devices=spec["device_count"])
    check_placement(config, spec["backend"])
    with tempfile.TemporaryDirectory(prefix="benchmark-workers-") as folder:
        result_path = Path(folder) / "rank0.json"
        code = backend_module(spec["backend"]).launch(data_parallel_worker, (spec, config, str(result_path)), config)
        if code != 0 or not result_path.exists():
            raise RuntimeError(f"the {config.devices} data-parallel workers stopped with exit code {code} (see the output)")
        return json.loads(result_path.read_text())


def data_parallel_worker(local_rank: int, spec: dict, config, result_path: str) -> int:
    """One worker of a data-parallel cell (module level: torch's spawn pickles it by name);
    the window runs on every worker, rank 0 reports it."""
    from benchmarks import window
    from benchmarks.machine import framework_threads
    from model.checkpoint import write_json

    result = window.run_keras_path(spec, config, progress if local_rank == 0 else lambda message: None)
    if local_rank == 0:
        # torch's workers share the cores out (backends/torch_backend.py); the cell's own process is not one of them.
        write_json(Path(result_path), {**result, "worker_threads": framework_threads(spec["backend"])})
    return 0


def time_to_accuracy_config(spec: dict):
    """train.py --recipe spec["recipe"] --target-accuracy A, no checkpoints: the recipe's
    values (epochs, lr, warm-up, label smoothing, weight average) over the defaults, applied
    the one way, TrainConfig.with_recipe."""
    return train_config(spec, "keras-fit", target_accuracy=spec["target_accuracy"],
                        limit_train_batches=spec["limit_train_batches"]).with_recipe(spec["recipe"])


def measure_time_to_accuracy(spec: dict) -> dict:
    """train.py's recipe (prepare_run, Trainer.fit) with --target-accuracy, no checkpoints:
    seconds from this process's launch until the first epoch end whose test accuracy
    reaches the target, the time of the per-epoch test checks left out."""
    import keras

    from model.target_accuracy import StopAtTargetAccuracy
    from model.training import prepare_run

    config = time_to_accuracy_config(spec)
    module, datamodule, trainer = prepare_run(config)
    if not spec["validate"]:
        datamodule.x_val, datamodule.y_val = datamodule.x_val[:0], datamodule.y_val[:0]
    limit_test_images(datamodule, spec["test_images"])
    checker = next(c for c in trainer.callbacks if isinstance(c, StopAtTargetAccuracy))
    checker.images, checker.labels, checker.log = datamodule.x_test, datamodule.y_test, progress
    trainer.verbose = 0
    trainer.fit(module, datamodule)
    records, reached = checker.records, checker.reached_epoch
    launched = spec["launched_perf"]
    counted = records[: reached or len(records)]
    evaluation_s = sum(record["evaluation_s"] for record in counted[:-1])
    return {
        "recipe": config.recipe,
        # What the cell trained with (the recipe applied): its epochs, lr, warm-up, smoothing, EMA.
        "config": config.to_dict(),
        "target_accuracy": spec["target_accuracy"],
        "reached_target": reached is not None,
        "seconds_to_target": counted[-1]["epoch_end"] - launched - evaluation_s if reached else None,
        "epochs_to_target": reached,
        "test_accuracy": records[-1]["test_accuracy"],
        "evaluation_s": sum(record["evaluation_s"] for record in records),
        "epochs": [{key: record[key] for key in ("epoch", "test_accuracy", "evaluation_s")} for record in records],
        "epoch_s_measured": trainer.timer.epoch_seconds,
        "steps_per_epoch": datamodule.steps_per_epoch,
        "test_images": len(datamodule.y_test),
        "keras_version": keras.__version__,
        # Whether jax was imported by the run (train.py's start keeps it out on TensorFlow and torch).
        "jax_imported": "jax" in sys.modules,
    }


def measure_predict_cell(spec: dict) -> dict:
    from benchmarks import inference
    from model.data import load_mnist, scale_images

    (_, _), (x_test, _) = load_mnist()
    counts = {int(size): count for size, count in spec["calls"].items()}
    warmup = {int(size): count for size, count in spec["warmup"].items()}
    if spec["backend"] == ONNX_RUNTIME:
        row = inference.onnx_inference(spec["onnx"], scale_images(x_test), warmup, counts)
    else:
        row = inference.keras_inference(spec["model"], scale_images(x_test), warmup, counts)
    return inference.summarize_row(row)


def measure_cell(spec: dict) -> dict:
    from backends import framework_flags_in_effect
    from benchmarks.machine import framework_threads

    backend, device, path = spec["backend"], spec["device"], spec["path"]
    if backend == ONNX_RUNTIME:
        check_framework_installed(backend, "export")
        return {"status": "ok", "reason": None, **measure_predict_cell(spec), "peak_rss_mb": peak_rss_mb()}
    check_framework_installed(backend)
    if device == "gpu":
        check_gpu_visible(backend, spec.get("device_count", 1))
    measure = {TIME_TO_ACCURACY: measure_time_to_accuracy, PREDICT: measure_predict_cell}.get(path, measure_training_cell)
    raw = measure(spec)
    device_name = raw.get("device_name") or framework_device_name(backend)
    if device == "gpu" and not any(word in device_name.lower() for word in ("gpu", "cuda", "rocm")):
        # The framework saw a GPU but ran on something else: not a GPU measurement.
        raise CellSkipped(f"{backend} ran on {device_name!r}, not a GPU")
    return {
        "status": "ok",
        "reason": None,
        **raw,
        "device_name": device_name,
        "peak_rss_mb": peak_rss_mb(),
        "threads": framework_threads(backend),
        "tf32": tf32_settings(backend),
        "framework_flags": framework_flags_in_effect(backend),
        **framework_runtime(backend),
    }


def framework_device_name(backend: str) -> str:
    from backends import backend_module

    return backend_module(backend).device_name()


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
    # This process's launch on the clock the cell measures with (time-to-accuracy counts from it).
    spec["launched_perf"] = time.perf_counter() - (time.time() - spec.get("launched_at", time.time()))
    if spec["path"] == TIME_TO_ACCURACY:
        # As train.py starts (the cell times train.py's run from the process start): the
        # collector paused, then select_backend (its framework flags, TensorFlow imported
        # quietly, jax kept out of Keras' and TensorFlow's imports).
        from model.runtime import pause_garbage_collection, select_backend

        pause_garbage_collection()
        select_backend(spec["backend"])
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
