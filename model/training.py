"""`train_and_evaluate(config)`: the whole run behind `train.py`, callable from tests.

It writes to `config.output_dir`:
    model.keras   the trained CNN, in stock Keras layers only (loads without this project);
    run.json      backend, device, versions, config, history, test metrics, timings;
    curves.png    loss and accuracy per epoch, train vs validation;
    checkpoints/  last.keras (for --resume, the project's own, with the trainer state inside), and
                  best.keras (the network at its best validation accuracy, stock layers only).
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from model.config import NO_AUGMENT, RUN_SETTINGS, RUN_SETTINGS_ADDED, TrainConfig
from model.runtime import UsageError


def run_settings(config: TrainConfig) -> dict:
    """What defines the run's maths (model.config.RUN_SETTINGS), as stored in last.keras."""
    return {name: getattr(config, name) for name in RUN_SETTINGS}


def resumed_config(config: TrainConfig, stored: dict, given: set | None = None) -> TrainConfig:
    """The config a --resume runs: the checkpoint's run settings, plus this invocation's
    choices that do not change the maths (output dir, data path, jit_compile). A setting in
    `given` (None: all) that differs from the checkpoint's is refused in one line."""
    stored = {**RUN_SETTINGS_ADDED, **stored}
    missing = [name for name in RUN_SETTINGS if name not in stored]
    if missing:
        raise UsageError(f"the checkpoint's trainer state lacks the run settings {', '.join(missing)}; it cannot be "
                         "resumed: start a new run")
    differences = []
    for name, flag in RUN_SETTINGS.items():
        if (given is not None and name not in given) or getattr(config, name) == stored[name]:
            continue
        if flag == NO_AUGMENT:
            text = "--no-augment (the checkpoint trained with augmentation)"
        elif flag is None:
            text = f"{name}={getattr(config, name)!r} (checkpoint: {stored[name]!r})"
        else:
            text = f"{flag} {getattr(config, name)} (checkpoint: {stored[name]})"
        if name == "epochs" and config.epochs > stored["epochs"]:
            text += (f"; its cosine learning rate was planned for {stored['epochs']} epochs and is 0 at their end, so "
                     "further epochs would not train")
        if text not in differences:
            differences.append(text)
    if differences:
        raise UsageError(f"--resume continues a run with the settings it started with; these differ: "
                         f"{'; '.join(differences)}. Leave them out to resume, or start a new run with them "
                         "(another --output-dir, or --overwrite to replace this one)")
    return config.replace(**{name: stored[name] for name in RUN_SETTINGS})


def curves_figure(history: list[dict], title: str):
    """The matplotlib figure of curves.png: loss and accuracy per epoch (whole-epoch ticks)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [h["epoch"] for h in history]
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for axis, metric in ((loss_axis, "loss"), (accuracy_axis, "accuracy")):
        axis.plot(epochs, [h.get(metric) for h in history], "o-", label="train")
        if any(f"val_{metric}" in h for h in history):
            axis.plot(epochs, [h.get(f"val_{metric}") for h in history], "o-", label="validation")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        axis.set_xlabel("epoch")
        axis.set_ylabel(metric)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def plot_curves(history: list[dict], path: Path, title: str) -> Path:
    import matplotlib.pyplot as plt

    from model.checkpoint import atomic_write

    figure = curves_figure(history, title)
    atomic_write(path, lambda temp: figure.savefig(temp, dpi=100, format="png"))
    plt.close(figure)
    return path


def prepare_run(config: TrainConfig):
    """(module, datamodule, trainer) exactly as train.py uses them; the benchmark's
    keras-fit cells call this too, so they time the same code path."""
    from model.data import datamodule_from
    from model.devices import start_engine
    from model.module import CNNModule
    from model.runtime import seed_everything
    from model.target_accuracy import StopAtTargetAccuracy
    from model.trainer import Trainer

    # Data parallel: the engine exists before the module, whose variables it lays out.
    engine = start_engine(config)
    seed_everything(config.seed)
    datamodule = datamodule_from(config).setup()
    with engine.scope() if engine is not None else contextlib.nullcontext():
        # decay_steps left to the Trainer: the cosine spans the run it trains. Weights drawn
        # with numpy from the seed: every backend starts from the same numbers.
        module = CNNModule(lr=config.lr, warmup_steps=round(config.warmup_epochs * datamodule.steps_per_epoch),
                           adam_betas=(config.adam_beta_1, config.adam_beta_2),
                           label_smoothing=config.label_smoothing, pooling=config.pooling, step=config.step,
                           ema_momentum=config.ema_momentum, seed=config.seed)
    jit_compile = "auto" if config.jit_compile is None else config.jit_compile
    checkpoint_dir = Path(config.output_dir) / "checkpoints" if config.output_dir else None
    trainer = Trainer(max_epochs=config.epochs, eval_batch_size=config.eval_batch_size, jit_compile=jit_compile,
                      checkpoint_dir=checkpoint_dir, run_settings=run_settings(config), engine=engine)
    if config.target_accuracy is not None:
        # Every rank checks and stops at the same epoch (they hold the same weights); rank 0 alone says so.
        trainer.callbacks.append(StopAtTargetAccuracy(datamodule.x_test, datamodule.y_test, config.target_accuracy,
                                                      log=print if trainer.is_main else _silent,
                                                      batch_size=config.eval_batch_size))
    return module, datamodule, trainer


def train_and_evaluate(config: TrainConfig, log=print, given: set | None = None, launch=None):
    """Train and test one CNN as `config` says; returns what run.json holds.

    With config.resume, the run continues from output_dir/checkpoints/last.keras with the
    settings stored there; `given` names the settings the user chose explicitly (None:
    all of them), and any of those that differs from the checkpoint is refused. The output
    dir is locked for the run's life (model.rundir).

    `launch(config, resumed_from)`: data parallel (train.py), called in place of the
    training here, with the directory locked and checked; it starts the workers, which
    train with `train_in_directory`, and returns their exit code."""
    config = config.effective()
    if given is not None and config.dry_run:
        given = set(given) | {"epochs", "limit_train_batches"}
    from model.rundir import RunDirectory

    # Several machines: the output dir is node 0's; the others train and write nothing.
    owner = config.node_rank == 0
    with (RunDirectory.open(config.output_dir, resume=config.resume, overwrite=config.overwrite) if owner
          else _NotOwned(config.output_dir)) as directory:
        resumed_from = None
        if config.resume:
            from model.checkpoint import read_trainer_state

            state = read_trainer_state(directory.checkpoints / "last.keras")
            config = resumed_config(config, state["run"], given)
            resumed_from = state["epochs_completed"]
            outputs = [directory.path / name for name in ("model.keras", "run.json")]
            if resumed_from >= config.epochs and all(path.is_file() for path in outputs):
                log(f"the run in {directory.path} is complete ({resumed_from} of {config.epochs} epochs); nothing "
                    "changed. To train more, start a new run (another --output-dir, or --overwrite)")
                return json.loads(outputs[1].read_text())
        if launch is not None:
            return launch(config, resumed_from)
        return train_in_directory(config, directory.path, log, resumed_from)


def train_in_directory(config: TrainConfig, output_dir: Path, log, resumed_from: int | None) -> dict:
    """The training itself, in an output dir already locked and checked (by this process,
    or by the data-parallel launcher that started it); under data parallel only rank 0
    logs and writes, and the other ranks return {}."""
    from model.backend import BACKEND
    from model.checkpoint import CheckpointError, save_model, write_json
    from model.cnn import portable_network
    from model.runtime import describe_runtime

    started = time.perf_counter()
    # Before describe_runtime: TensorFlow's logical devices must be made before TF starts.
    module, datamodule, trainer = prepare_run(config)
    if not trainer.is_main:
        log = _silent  # data parallel: rank 0 speaks and writes, the others only train
    engine = trainer.engine
    runtime = describe_runtime()
    runtime.update(accelerator=config.accelerator, devices=config.devices, num_nodes=config.num_nodes,
                   engine=engine.ENGINE if engine is not None else "single device",
                   replicas=engine.replicas if engine is not None else 1)
    if engine is not None:
        runtime["replica_devices"] = engine.device_names
    log(f"backend {runtime['backend']} | device {runtime['device']} | "
        + " ".join(f"{name} {version}" for name, version in runtime["versions"].items()))
    if engine is not None:
        log(f"data parallel: {engine.replicas} replicas ({', '.join(engine.device_names)}) through {engine.ENGINE}; "
            f"{config.batch_size // engine.replicas} images of each batch per replica")
    log(f"data: {len(datamodule.x_train)} train, {len(datamodule.x_val)} validation, {len(datamodule.x_test)} test images; "
        f"{datamodule.steps_per_epoch} steps of {config.batch_size} per epoch"
        + (f"; resuming after epoch {resumed_from} of {config.epochs}" if resumed_from is not None else ""))
    module = trainer.fit(module, datamodule, resume=config.resume)
    test = trainer.test(module, datamodule)
    replica_check = {}
    if engine is not None:
        # A collective on torch: every process takes part, before rank 0 alone goes on.
        copies, difference = engine.replica_difference(module)
        replica_check = {"weight_copies": copies, "replica_max_weight_difference": difference}
    if not trainer.is_main:
        return {}

    result = {
        **runtime,
        "datetime": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        # What ran: on --resume the checkpoint's settings, and this backend's jit_compile.
        "config": config.replace(jit_compile=bool(module.jit_compile)).to_dict(),
        "resumed_from_epoch": resumed_from,
        "history": trainer.history,
        "test_accuracy": test["test_accuracy"],
        "test_loss": test["test_loss"],
        "steps_per_epoch": datamodule.steps_per_epoch,
        # Steps per call of Keras' step function (Trainer "auto"): how the steps ran, not the maths.
        "steps_per_execution": module.steps_per_execution,
        "epoch_seconds": trainer.timer.epoch_seconds,
        "step_ms_median": trainer.timer.step_ms_median(),
        "wall_seconds": time.perf_counter() - started,
        "peak_device_mb": BACKEND.peak_device_memory_mb(),
        **replica_check,
    }
    title = f"MNIST CNN, {runtime['backend']} on {runtime['device']}: test accuracy {test['test_accuracy']:.4f}"
    # Stock Keras layers only: the file opens in a plain Keras install (model.cnn.portable_network).
    writes = [("model.keras", lambda path: save_model(portable_network(module.network), path)),
              ("curves.png", lambda path: plot_curves(trainer.history, path, title)),
              ("run.json", lambda path: write_json(path, result))]
    for name, write in writes:
        try:
            write(output_dir / name)
        except OSError as error:
            raise CheckpointError(f"could not write {output_dir / name} ({error.strerror or error}); the checkpoints "
                                  f"in {output_dir / 'checkpoints'} are intact") from None
    median = result["step_ms_median"]
    step = f"median step {median:.1f} ms" if median is not None else "too few steps past warm-up for a median step time"
    log(f"test accuracy {test['test_accuracy']:.4f} (loss {test['test_loss']:.4f}); "
        f"{step}; wrote {output_dir}/model.keras, run.json, curves.png")
    return result


def _silent(*args, **kwargs) -> None:
    pass


class _NotOwned(contextlib.nullcontext):
    """The output dir of a machine with --node-rank > 0: neither created nor locked."""

    def __init__(self, output_dir):
        path = Path(output_dir)
        super().__init__(self)
        self.path, self.checkpoints = path, path / "checkpoints"
