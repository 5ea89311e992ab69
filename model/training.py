"""`train_and_evaluate(config)`: the whole run behind `train.py`, callable from tests.

It writes to `config.output_dir`:
    model.keras   the trained CNN, in stock Keras layers only (loads without this project);
    run.json      backend, device, versions, config, history, test metrics, timings;
    curves.png    loss and accuracy per epoch, train vs validation;
    checkpoints/  last.keras and trainer_state.json (for --resume, the project's own), and
                  best.keras (the network at its best validation accuracy, stock layers only).
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

from model.config import TrainConfig
from model.runtime import UsageError


def check_output_dir(output_dir: str | os.PathLike) -> Path:
    """Fail before any training if the output directory cannot be written."""
    folder = Path(output_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-probe-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise UsageError(f"cannot write to output dir {str(folder)!r} ({error.strerror or error}); choose another with --output-dir")
    return folder


def plot_curves(history: list[dict], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from model.checkpoint import atomic_write

    epochs = [h["epoch"] for h in history]
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for axis, metric in ((loss_axis, "loss"), (accuracy_axis, "accuracy")):
        axis.plot(epochs, [h.get(metric) for h in history], "o-", label="train")
        if any(f"val_{metric}" in h for h in history):
            axis.plot(epochs, [h.get(f"val_{metric}") for h in history], "o-", label="validation")
        axis.set_xlabel("epoch")
        axis.set_ylabel(metric)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    atomic_write(path, lambda temp: figure.savefig(temp, dpi=100, format="png"))
    plt.close(figure)
    return path


def prepare_run(config: TrainConfig, arrays=None):
    """(module, datamodule, trainer) exactly as train.py uses them; the benchmark's
    keras-fit cells call this too, so they time the same code path."""
    import keras

    from model.cnn import seeded_weights
    from model.data import MNISTDataModule
    from model.module import CNNModule
    from model.runtime import seed_everything
    from model.target_accuracy import StopAtTargetAccuracy
    from model.trainer import Trainer

    seed_everything(config.seed)
    datamodule = MNISTDataModule(
        batch_size=config.batch_size,
        validation_size=config.validation_size,
        seed=config.seed,
        shift_pixels=config.shift_pixels,
        rotation_degrees=config.rotation_degrees,
        zoom=config.zoom,
        path=config.data,
        limit_train_batches=config.limit_train_batches,
    ).setup(arrays)
    module = CNNModule(lr=config.lr, decay_steps=config.epochs * datamodule.steps_per_epoch,
                       pooling=config.pooling, step=config.step, ema_momentum=config.ema_momentum)
    # Weights drawn with numpy: every backend starts from the same numbers for a seed.
    module.network.set_weights(seeded_weights(module.network, config.seed))
    jit_compile = "auto" if config.jit_compile is None else config.jit_compile
    checkpoint_dir = Path(config.output_dir) / "checkpoints" if config.output_dir else None
    trainer = Trainer(max_epochs=config.epochs, jit_compile=jit_compile, checkpoint_dir=checkpoint_dir)
    if config.target_accuracy is not None:
        trainer.callbacks.append(StopAtTargetAccuracy(datamodule.x_test, datamodule.y_test, config.target_accuracy))
    return module, datamodule, trainer


def train_and_evaluate(config: TrainConfig, log=print) -> dict:
    """Train and test one CNN as `config` says; returns what run.json holds."""
    config = config.effective()
    output_dir = check_output_dir(config.output_dir)  # before seconds of imports

    from backends import backend_module
    from model.checkpoint import save_model, write_json
    from model.cnn import portable_network
    from model.runtime import describe_runtime

    runtime = describe_runtime()
    log(f"backend {runtime['backend']} | device {runtime['device']} | "
        + " ".join(f"{name} {version}" for name, version in runtime["versions"].items()))

    started = time.perf_counter()
    module, datamodule, trainer = prepare_run(config)
    log(f"data: {len(datamodule.x_train)} train, {len(datamodule.x_val)} validation, {len(datamodule.x_test)} test images; "
        f"{datamodule.steps_per_epoch} steps of {config.batch_size} per epoch")
    module = trainer.fit(module, datamodule, resume=config.resume)
    test = trainer.test(module, datamodule)

    # Stock Keras layers only: the file opens in a plain Keras install (model.cnn.portable_network).
    save_model(portable_network(module.network), output_dir / "model.keras")
    plot_curves(trainer.history, output_dir / "curves.png",
                f"MNIST CNN, {runtime['backend']} on {runtime['device']}: test accuracy {test['test_accuracy']:.4f}")
    result = {
        **runtime,
        "datetime": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": config.to_dict(),
        "history": trainer.history,
        "test_accuracy": test["test_accuracy"],
        "test_loss": test["test_loss"],
        "epoch_seconds": trainer.timer.epoch_seconds,
        "step_ms_median": trainer.timer.step_ms_median(),
        "wall_seconds": time.perf_counter() - started,
        "peak_device_mb": backend_module().peak_device_memory_mb(),
    }
    write_json(output_dir / "run.json", result)
    median = result["step_ms_median"]
    step = f"median step {median:.1f} ms" if median is not None else "too few steps past warm-up for a median step time"
    log(f"test accuracy {test['test_accuracy']:.4f} (loss {test['test_loss']:.4f}); "
        f"{step}; wrote {output_dir}/model.keras, run.json, curves.png")
    return result
