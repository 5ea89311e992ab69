"""Checks that need a Keras backend, run in a subprocess that holds one backend for life.

    KERAS_BACKEND=jax python tests/backend_checks.py OUT.json WORKDIR CHECK [CHECK ...]

Each check returns plain measurements (numbers, lists); the pytest side asserts on them,
so a failure message shows the values. Several checks share one process because
importing a framework costs seconds.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHECKS = {}


def check(function):
    CHECKS[function.__name__] = function
    return function


@check
def architecture(workdir: Path) -> dict:
    from model.cnn import build_cnn

    result = {}
    for pooling in ("fast", "stock"):
        network = build_cnn(pooling)
        result[pooling] = {
            "layers": [[layer.name, list(layer.output.shape[1:]), layer.count_params()] for layer in network.layers],
            "total_params": network.count_params(),
        }
    # Seeded: numpy's draws (model.weights) in place of Keras' initializers, which stay in
    # the config; a network built again from that config draws with Keras' own.
    import numpy as np

    from model.weights import seeded_weight_arrays

    seeded = build_cnn("fast", seed=3)
    expected = seeded_weight_arrays([tuple(variable.shape) for variable in seeded.weights], 3)
    configs = [layer.get_config() for layer in seeded.layers]
    rebuilt = seeded.__class__.from_config(seeded.get_config())
    result["seeded"] = {
        "weights_are_the_seeds": all(np.array_equal(got, want) for got, want in zip(seeded.get_weights(), expected)),
        "initializers": sorted({f"{name}={config[name]['class_name']}" for config in configs
                                for name in ("kernel_initializer", "bias_initializer") if name in config}),
        "rebuilt_kernels_random": all(float(np.std(weights)) > 0 for weights in rebuilt.get_weights()[::2]),
    }
    return result


@check
def short_training(workdir: Path) -> dict:
    """64 real Adam steps (2 epochs x 32 batches of 128 real MNIST images)."""
    import keras

    from model.cnn import seeded_weights
    from model.data import MNISTDataModule
    from model.module import CNNModule
    from model.trainer import Trainer

    datamodule = MNISTDataModule(batch_size=128, seed=0, limit_train_batches=32).setup()
    module = CNNModule(lr=1e-3, decay_steps=0, ema_momentum=None)
    module.network.set_weights(seeded_weights(module.network, 0))
    trainer = Trainer(max_epochs=2, verbose=0)
    before = trainer.test(module, datamodule)
    module = trainer.fit(module, datamodule)
    after = trainer.test(module, datamodule)
    return {
        "test_loss_before": before["test_loss"],
        "test_loss_after": after["test_loss"],
        "test_accuracy_after": after["test_accuracy"],
        "train_loss_per_epoch": [h["loss"] for h in trainer.history],
        "steps": int(keras.ops.convert_to_numpy(module.optimizer.iterations)),
    }


@check
def training_data(workdir: Path) -> dict:
    """What the backend's fit() is fed (backends/<backend>_backend.py training_data) against
    the data module's own batches: epochs 1 and 2 of 45 batches (3 pieces made ahead:
    2100, 2100 and 250 images), with the augmentation on and a smaller last batch."""
    import keras
    import numpy as np

    from backends import backend_module
    from model.data import MNISTDataModule

    datamodule = MNISTDataModule(batch_size=100, seed=3, rotation_degrees=10.0, zoom=0.1)
    datamodule.setup()
    datamodule.x_train, datamodule.y_train = datamodule.x_train[:4450], datamodule.y_train[:4450]
    # Which pieces came from the stream (one epoch_pieces call per epoch, made ahead) and
    # which were made on the spot (epoch_piece: the feed's fallback).
    calls = {"epoch_pieces": 0, "epoch_piece": 0}
    for name in calls:
        def counted(*args, _made=getattr(datamodule, name), _name=name):
            calls[_name] += 1
            return _made(*args)
        setattr(datamodule, name, counted)
    fed = list(backend_module().training_data(datamodule, 1, 3))
    fed_calls = dict(calls)
    # Whether Keras' own conversion of each fed batch (fit's, on torch) keeps its memory: no
    # copy. None where Keras moves the batch to a GPU (a copy there by nature).
    converted = [(keras.ops.convert_to_tensor(part), part) for batch in fed for part in batch]
    on_host = all(getattr(getattr(tensor, "device", None), "type", "cpu") == "cpu" for tensor, _ in converted)
    converted_in_place = all(np.shares_memory(np.asarray(tensor), np.asarray(part))
                             for tensor, part in converted) if on_host else None
    fed = [[np.asarray(part) for part in batch] for batch in fed]
    expected = list(datamodule.batches_from(1, 3))
    return {
        "pieces_per_epoch": datamodule.pieces_per_epoch,
        "calls": fed_calls,
        "converted_in_place": converted_in_place,
        "batch_sizes": [len(labels) for _, labels in fed],
        "expected_batch_sizes": [len(labels) for _, labels in expected],
        "dtypes": sorted({str(part.dtype) for batch in fed for part in batch}),
        "all_equal": len(fed) == len(expected) and all(
            np.array_equal(got, want) for batch, reference in zip(fed, expected) for got, want in zip(batch, reference)),
    }


@check
def moving_average(workdir: Path) -> dict:
    """keras.optimizers.Adam(use_ema=True) after the backend's fuse_optimizer against the
    same untouched: 3 updates with the same gradients (on torch: the fused Adam kernel and
    the fused weight average against Keras' own)."""
    import keras
    import numpy as np

    from backends import backend_module

    rng = np.random.default_rng(0)
    shapes = [(3, 3, 1, 32), (32,), (5408, 128)]
    start = [rng.standard_normal(shape).astype(np.float32) for shape in shapes]
    gradients = [[rng.standard_normal(shape).astype(np.float32) for shape in shapes] for _ in range(3)]
    ends, fused_calls, fused_adam_calls = {}, [], []
    for fused in (True, False):
        variables = [keras.Variable(weights) for weights in start]
        optimizer = keras.optimizers.Adam(learning_rate=0.1, use_ema=True, ema_momentum=0.9)
        if fused:
            backend_module().fuse_optimizer(optimizer)
            # Count the calls Keras makes to a replaced update, to know it is the one used.
            for name, calls in (("_update_model_variables_moving_average", fused_calls),
                                ("_parallel_update_step", fused_adam_calls)):
                replaced = vars(optimizer).get(name)
                if replaced is not None:
                    def counted(*args, replaced=replaced, calls=calls):
                        calls.append(1)
                        return replaced(*args)

                    setattr(optimizer, name, counted)
        for step_gradients in gradients:
            optimizer.apply([keras.ops.convert_to_tensor(g) for g in step_gradients], variables)
        ends[fused] = {
            "class": type(optimizer).__module__ + "." + type(optimizer).__name__,
            "weights": [keras.ops.convert_to_numpy(v) for v in variables],
            "averages": [keras.ops.convert_to_numpy(a) for a in optimizer._model_variables_moving_average],
        }
    fused, stock = ends[True], ends[False]
    return {
        "classes": [fused["class"], stock["class"]],
        "fused_calls": len(fused_calls),
        "fused_adam_calls": len(fused_adam_calls),
        "max_weight_change": max(float(np.abs(a - b).max()) for a, b in zip(stock["weights"], start)),
        "max_average_difference": max(float(np.abs(a - b).max()) for a, b in zip(fused["averages"], stock["averages"])),
        "max_weight_difference": max(float(np.abs(a - b).max()) for a, b in zip(fused["weights"], stock["weights"])),
        "max_average_vs_weights": max(float(np.abs(a - b).max()) for a, b in zip(stock["averages"], stock["weights"])),
    }


@check
def learning_rate(workdir: Path) -> dict:
    """The learning rate a Keras Adam on a CosineDecay schedule uses at every step after the
    backend's fuse_optimizer (on torch, computed on the host), against the schedule's own
    value at that step: without a warm-up (the default recipe's), with one (the fast
    recipe's), with alpha, and with an int initial rate (which Keras computes in int32), to
    20 steps past the schedule's end; then a schedule set on a fused optimizer later."""
    import keras
    import numpy as np

    from backends import backend_module

    CosineDecay = keras.optimizers.schedules.CosineDecay
    # The last one, with an int initial rate, Keras computes in int32 (pi as 3): left to Keras.
    schedules = [CosineDecay(2e-3, 300), CosineDecay(0.0, 250, warmup_target=1e-2, warmup_steps=40),
                 CosineDecay(0.1, 100, alpha=0.1, warmup_target=0.2, warmup_steps=7), CosineDecay(1, 10)]
    replaced, unequal, steps, count_devices = [], [], 0, set()

    def compare(optimizer, schedule, step):
        optimizer.iterations.assign(step)
        used = np.float32(keras.ops.convert_to_numpy(optimizer.learning_rate))
        own = np.float32(keras.ops.convert_to_numpy(schedule(step)))
        if used != own:
            unequal.append((step, float(used), float(own)))

    for schedule in schedules:
        optimizer = keras.optimizers.Adam(learning_rate=schedule)
        optimizer.build([keras.Variable(np.zeros(3, np.float32))])
        backend_module().fuse_optimizer(optimizer)
        replaced.append("_get_current_learning_rate" in vars(optimizer))
        count_devices.add(str(getattr(getattr(optimizer.iterations.value, "device", None), "type", "cpu")))
        for step in range(schedule.decay_steps + schedule.warmup_steps + 20):
            compare(optimizer, schedule, step)
            steps += 1
    # A schedule set on the optimizer after fuse_optimizer is the one used.
    optimizer = keras.optimizers.Adam(learning_rate=schedules[0])
    optimizer.build([keras.Variable(np.zeros(3, np.float32))])
    backend_module().fuse_optimizer(optimizer)
    later = CosineDecay(5e-3, 50)
    optimizer.learning_rate = later
    for step in (0, 25, 60):
        compare(optimizer, later, step)
        steps += 1
    return {"replaced": replaced, "steps": steps, "unequal": unequal[:10], "unequal_count": len(unequal),
            "count_devices": sorted(count_devices)}


@check
def fused_loss_and_metrics(workdir: Path) -> dict:
    """Keras' fit for 2 epochs (5 batches of 64 and one of 40, validated in batches of 100),
    with label smoothing, a weight average and a cosine schedule, after the backend's
    fuse_loss_and_metrics and without it: every batch's logs, the history and the weights;
    how many times the fused loss and metric results ran; then an evaluate with sample
    weights (Keras' own paths) on both; which of them the Trainer's fit fused."""
    import keras
    import numpy as np

    from backends import backend_module

    backend = backend_module()
    if backend.NAME != "torch":
        return {}  # nothing is fused there (the test is torch's alone): no fits to spend the CI's time on
    datamodule = _datamodule()
    images, labels = datamodule.x_train[:360], datamodule.y_train[:360]
    validation = (datamodule.x_val[:300], datamodule.y_val[:300])
    weights = np.linspace(0.5, 2.0, 300).astype(np.float32)
    calls = {"smoothed_crossentropy": [], "_mean_result": []}
    originals = {name: getattr(backend, name, None) for name in calls}
    for name, original in originals.items():
        if original is not None:
            def counted(*args, original=original, name=name):
                calls[name].append(1)
                return original(*args)

            setattr(backend, name, counted)

    class Logs(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.batches = []

        def on_train_batch_end(self, batch, logs=None):
            self.batches.append({name: float(value) for name, value in logs.items()})

    runs = {}
    try:
        for fused in (True, False):
            module = _module(label_smoothing=0.1, ema_momentum=0.99, decay_steps=12).configure()
            backend.fuse_optimizer(module.optimizer)
            if fused:
                backend.fuse_loss_and_metrics(module)
            logs = Logs()
            history = module.fit(images, labels, batch_size=64, epochs=2, shuffle=False, verbose=0, callbacks=[logs],
                                 validation_data=validation, validation_batch_size=100)
            counted = {name: len(found) for name, found in calls.items()}
            weighted = module.evaluate(*validation, sample_weight=weights, batch_size=100, verbose=0, return_dict=True)
            runs[fused] = {"batches": logs.batches, "history": history.history, "weights": _weights(module),
                           "calls": counted, "weighted": weighted,
                           "weighted_calls": {name: len(found) - counted[name] for name, found in calls.items()}}
            for found in calls.values():
                found.clear()
    finally:
        for name, original in originals.items():
            if original is not None:
                setattr(backend, name, original)
    fused, stock = runs[True], runs[False]
    # train.py's Trainer fuses the module it trains.
    from model.trainer import Trainer

    trained = Trainer(max_epochs=1, limit_train_batches=2, verbose=0).fit(
        _module(label_smoothing=0.1), _datamodule(validation_size=0))
    return {
        "fused_by_trainer": sorted(name for name in ("compute_loss", "compute_metrics") if name in vars(trained)),
        "batches": len(fused["batches"]),
        "batch_logs_equal": fused["batches"] == stock["batches"],
        "history_equal": fused["history"] == stock["history"],
        "history": fused["history"],
        "weights_max_difference": max(float(np.max(np.abs(a - b))) for a, b in zip(fused["weights"], stock["weights"])),
        "fused_calls": fused["calls"],
        "stock_calls": stock["calls"],
        "weighted_equal": fused["weighted"] == stock["weighted"],
        "weighted_fused_calls": fused["weighted_calls"],
    }


@check
def serving(workdir: Path) -> dict:
    """model.prediction.predictor (what predict.py and the benchmark's predict cells serve
    with) on the portable network of seeded weights, saved and loaded as model.keras is:
    its path and whether its probabilities equal predict_on_batch's exactly at batch 1024
    and 1; then on two networks that are not this CNN (its layers with a tanh convolution,
    whose weights still fit the CNN's; a dense-only one): their paths and equality."""
    import keras
    import numpy as np

    from model.checkpoint import load_model, save_model
    from model.cnn import build_cnn, portable_network
    from model.prediction import predictor

    images = _datamodule().x_test[:1024]
    loaded = load_model(save_model(portable_network(build_cnn("fast", seed=0)), workdir / "serving" / "model.keras"))
    tanh = portable_network(build_cnn("fast", seed=0))
    tanh.layers[0].activation = keras.activations.tanh
    dense = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(), keras.layers.Dense(10, activation="softmax")])
    result = {}
    for name, model in (("cnn", loaded), ("tanh", tanh), ("dense", dense)):
        path, predict = predictor(model)
        result[name] = {"path": path, **{
            f"equal_{size}": bool(np.array_equal(np.asarray(predict(images[:size])),
                                                 np.asarray(model.predict_on_batch(images[:size]))))
            for size in (1024, 1)}}
    return result


@check
def steps_per_execution(workdir: Path) -> dict:
    """Two epochs of 18 batches of 64, validated after each, with the Trainer's steps per
    call ("auto": Keras' steps_per_execution) and with one step per call: the optimizer's
    step count at each epoch's end, the calls' last steps, the weights and the history."""
    import keras
    import numpy as np

    from model.trainer import Trainer

    class Record(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.call_ends, self.epoch_steps = [], []

        def on_train_batch_end(self, batch, logs=None):
            self.call_ends.append(batch)

        def on_epoch_end(self, epoch, logs=None):
            self.epoch_steps.append(int(keras.ops.convert_to_numpy(self.model.optimizer.iterations)))

    runs = {}
    for per_call in ("auto", 1):
        record = Record()
        trainer = Trainer(max_epochs=2, callbacks=[record], steps_per_execution=per_call, verbose=0)
        datamodule = _datamodule(batch_size=64, limit_train_batches=18, validation_size=1000)
        module = trainer.fit(_module(), datamodule)
        runs[per_call] = {"steps_per_execution": module.steps_per_execution, "call_ends": record.call_ends,
                          "epoch_steps": record.epoch_steps, "history": trainer.history, "weights": _weights(module)}
    auto, single = runs["auto"], runs[1]
    return {
        **{name: auto[name] for name in ("steps_per_execution", "call_ends", "epoch_steps")},
        "single_epoch_steps": single["epoch_steps"],
        "histories_equal": auto["history"] == single["history"],
        "weights_max_difference": max(float(np.max(np.abs(a - b))) for a, b in zip(auto["weights"], single["weights"])),
    }


# ------------------------------------------------------------------------ cross-backend checks


def _datamodule(**overrides):
    from model.data import MNISTDataModule

    settings = {"batch_size": 128, "seed": 0, "limit_train_batches": 20}
    settings.update(overrides)
    return MNISTDataModule(**settings).setup()


def _module(step: str = "keras", seed: int = 0, **kwargs):
    """A seeded CNNModule; Adam at a constant 1e-3 without a weight average unless `kwargs` say otherwise."""
    from model.cnn import seeded_weights
    from model.module import CNNModule

    module = CNNModule(step=step, **{"lr": 1e-3, "decay_steps": 0, "ema_momentum": None, **kwargs})
    module.network.set_weights(seeded_weights(module.network, seed))
    return module


def _weights(module) -> list:
    import keras

    return [keras.ops.convert_to_numpy(v) for v in module.network.weights]


def _relative_difference(expected, actual) -> float:
    """max |expected - actual| over max |expected|: 0.0 where they are equal."""
    import numpy as np

    expected, actual = np.asarray(expected), np.asarray(actual)
    return float(np.abs(expected - actual).max() / np.abs(expected).max())


def _save_arrays(path: Path, arrays) -> str:
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, *[np.asarray(a, dtype="float32") for a in arrays])
    return str(path)


@functools.cache
def _twenty_steps(step: str, ema_momentum: float | None = None, label_smoothing: float = 0.0):
    """(trainer, trained module): 20 deterministic Adam steps (lr 1e-3) with `step` from the
    seed-0 weights on the first 20 batches. Cached: several checks compare against it."""
    from model.trainer import Trainer

    trainer = Trainer(max_epochs=1, limit_train_batches=20, deterministic=True, verbose=0)
    module = _module(step=step, lr=1e-3, ema_momentum=ema_momentum, label_smoothing=label_smoothing)
    return trainer, trainer.fit(module, _datamodule())


@check
def equivalence(workdir: Path) -> dict:
    """Dumps for the cross-backend comparisons: logits on 256 test images, one batch's
    loss and gradients, weights after 20 Adam steps with Keras' step and the native one,
    and a checkpoint with its predictions on all 10,000 test images."""
    import keras
    import numpy as np

    from backends import backend_module
    from model.checkpoint import save_model
    from model.trainer import Trainer

    backend = backend_module()
    backend.configure(deterministic=True)
    datamodule = _datamodule()
    module = _module()
    images = datamodule.x_test[:256]
    hidden = keras.Model(module.network.inputs[0], module.network.get_layer("dense").output)(images)
    kernel, bias = module.network.get_layer("probabilities").weights
    logits = keras.ops.matmul(hidden, kernel) + bias
    batch_images, batch_labels = next(datamodule.train_batches(0))
    loss, gradients = backend.loss_and_gradients(module, (batch_images, batch_labels))
    result = {
        "logits": _save_arrays(workdir / "logits.npz", [keras.ops.convert_to_numpy(logits)]),
        "loss": float(keras.ops.convert_to_numpy(loss)),
        "gradients": _save_arrays(workdir / "gradients.npz", [keras.ops.convert_to_numpy(g) for g in gradients]),
    }
    # Count calls into the backend's native step, so the test knows it really ran.
    native_calls = []
    native_step = backend.train_step

    def counting_step(*args):
        native_calls.append(1)
        return native_step(*args)

    backend.train_step = counting_step
    for step in ("keras", "native"):
        trained = _twenty_steps(step)[1]
        result[f"native_step_calls_{step}"] = len(native_calls)
        result[f"steps_{step}"] = int(keras.ops.convert_to_numpy(trained.optimizer.iterations))
        result[f"weights_{step}"] = _save_arrays(workdir / f"weights_{step}.npz", _weights(trained))
        if step == "keras":
            checkpoint = save_model(trained, workdir / "checkpoint.keras")
            result["checkpoint"] = str(checkpoint)
            probabilities = Trainer().predict(trained, datamodule.x_test)
            result["probabilities"] = _save_arrays(workdir / "probabilities.npz", [probabilities])
    backend.train_step = native_step
    return result


@check
def load_checkpoints(workdir: Path) -> dict:
    """Load each backend's checkpoint (paths in $CHECKPOINTS, a JSON map) and predict."""
    import os

    from model.checkpoint import load_model
    from model.cnn import TiledMaxPooling2D, training_network
    from model.data import MNISTDataModule
    from tests.helpers import TRAIN_PY_MODEL

    datamodule = MNISTDataModule(batch_size=128, seed=0).setup()
    result = {}
    for index, (saved_by, path) in enumerate(json.loads(os.environ["CHECKPOINTS"]).items()):
        module = load_model(path)
        predictions = [module.predict(datamodule.x_test, batch_size=1000, verbose=0)]
        if saved_by == TRAIN_PY_MODEL:
            # train.py's model.keras holds stock layers; back in the project for training it
            # gets the fast pooling layer, which must predict the same.
            fast = training_network(module)
            assert any(isinstance(layer, TiledMaxPooling2D) for layer in fast.layers)
            predictions.append(fast.predict(datamodule.x_test, batch_size=1000, verbose=0))
        result[saved_by] = _save_arrays(workdir / f"predictions_{index}.npz", predictions)
    return result


class _StopAfterEpoch(__import__("keras").callbacks.Callback):
    def __init__(self, epochs: int):
        super().__init__()
        self.epochs = epochs

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 >= self.epochs:
            self.model.stop_training = True


@check
def augmentation_thread(workdir: Path) -> dict:
    """A fit() stopped after the first of 8 epochs, by a callback as --target-accuracy stops
    it: the data module's augmentation thread, which runs one epoch ahead of the steps
    (blocked on its full queue by then), must not outlive it."""
    import threading

    from model.trainer import Trainer

    datamodule = _datamodule(limit_train_batches=10)
    Trainer(max_epochs=8, callbacks=[_StopAfterEpoch(1)], verbose=0).fit(_module(lr=1e-3, decay_steps=80), datamodule)
    return {"threads_left": [thread.name for thread in threading.enumerate() if thread.name == "mnist-augmentation"]}


@check
def checkpoint_safety(workdir: Path) -> dict:
    """Resume equals an uninterrupted run; bad checkpoints give one clear error each."""
    import keras
    import numpy as np

    from model.checkpoint import CheckpointError, load_model
    from model.trainer import Trainer

    datamodule = _datamodule(limit_train_batches=10)
    uninterrupted = Trainer(max_epochs=3, checkpoint_dir=workdir / "straight", verbose=0).fit(
        _module(lr=1e-3, decay_steps=30), datamodule)
    interrupted = Trainer(max_epochs=3, checkpoint_dir=workdir / "resumed", callbacks=[_StopAfterEpoch(1)], verbose=0)
    interrupted.fit(_module(lr=1e-3, decay_steps=30), datamodule)
    resumer = Trainer(max_epochs=3, checkpoint_dir=workdir / "resumed", verbose=0)
    resumed = resumer.fit(None, datamodule, resume=True)
    difference = max(float(np.abs(a - b).max()) for a, b in zip(_weights(uninterrupted), _weights(resumed)))

    errors = {}
    lambda_model = keras.Sequential([keras.Input((2,)), keras.layers.Lambda(lambda x: x * 2)])
    lambda_model.save(workdir / "lambda.keras")
    whole = (workdir / "resumed" / "last.keras").read_bytes()
    (workdir / "truncated.keras").write_bytes(whole[: len(whole) // 2])
    (workdir / "text.keras").write_text("not a model")
    for name in ("lambda.keras", "truncated.keras", "text.keras", "missing.keras"):
        try:
            load_model(workdir / name)
            errors[name] = None
        except CheckpointError as error:
            errors[name] = str(error)
    return {
        "resume_max_weight_difference": difference,
        "resumed_history_epochs": [h["epoch"] for h in resumer.history],
        "resumed_steps": int(keras.ops.convert_to_numpy(resumed.optimizer.iterations)),
        # The resumed module's steps per call: the running Trainer's choice, not the 1 that
        # the checkpoint's compile config records.
        "resumed_steps_per_execution": resumed.steps_per_execution,
        "uninterrupted_steps_per_execution": uninterrupted.steps_per_execution,
        "errors": errors,
    }


# ------------------------------------------------------------------------ framework baselines


@check
def framework_baseline(workdir: Path) -> dict:
    """20 Adam steps on the same 20 batches from the same seeded weights, once with the
    hand-written baseline of this backend's framework and once with Keras' own step."""
    import keras
    import numpy as np

    from benchmarks.framework import load_baseline
    from model.cnn import seeded_weights

    datamodule = _datamodule()
    initial = seeded_weights(_module().network, 0)
    baseline = load_baseline(keras.backend.backend()).build(initial, lr=1e-3)
    losses = [baseline.loss_value(baseline.train_step(images, labels)) for images, labels in datamodule.train_batches(0)]
    trainer, trained = _twenty_steps("keras")
    baseline_weights = baseline.get_weights()
    # The same with a moving average of the weights (momentum 0.9, so that 20 steps move it
    # well away from the weights); both end with the average as their weights.
    averaging = load_baseline(keras.backend.backend()).build(initial, lr=1e-3, ema_momentum=0.9)
    for images, labels in datamodule.train_batches(0):
        averaging.train_step(images, labels)
    _, averaged = _twenty_steps("keras", ema_momentum=0.9)
    # The same with smoothed labels (the default recipe's loss).
    smoothing = load_baseline(keras.backend.backend()).build(initial, lr=1e-3, label_smoothing=0.1)
    for images, labels in datamodule.train_batches(0):
        smoothing.train_step(images, labels)
    _, smoothed = _twenty_steps("keras", label_smoothing=0.1)
    # Several steps per call (the benchmark's loop where Keras runs steps_per_execution): the
    # same 20 batches as 2 calls of 10 against 20 calls of 1, every setting on (the
    # schedule's count and the average advance inside a call).
    settings = {"lr": 1e-3, "decay_steps": 20, "ema_momentum": 0.9, "label_smoothing": 0.1}
    single, several = (load_baseline(keras.backend.backend()).build(initial, **settings) for _ in range(2))
    batches = list(datamodule.train_batches(0))
    single_losses = [single.loss_value(single.train_step(images, labels)) for images, labels in batches]
    stacked_images, stacked_labels = (np.stack(arrays) for arrays in zip(*batches))
    several_losses = [several.loss_value(several.train_steps(stacked_images[start:start + 10], stacked_labels[start:start + 10]))
                      for start in (0, 10)]
    return {
        "several_steps_losses": several_losses,
        "single_steps_losses": [single_losses[9], single_losses[19]],
        "several_steps_max_weight_difference": max(
            float(np.abs(a - b).max()) for a, b in zip(several.get_weights(), single.get_weights())),
        "several_steps_max_weight_change": max(
            float(np.abs(a - b).max()) for a, b in zip(several.get_weights(), initial)),
        "smoothing_max_weight_difference": max(
            float(np.abs(a - b).max()) for a, b in zip(smoothing.get_weights(), _weights(smoothed))),
        "smoothing_max_vs_unsmoothed": max(
            float(np.abs(a - b).max()) for a, b in zip(_weights(smoothed), baseline_weights)),
        "ema_max_weight_difference": max(
            float(np.abs(a - b).max()) for a, b in zip(averaging.get_weights(), _weights(averaged))),
        # How far the average is from the plain weights the same 20 steps end with.
        "ema_max_average_vs_weights": max(
            float(np.abs(a - b).max()) for a, b in zip(_weights(averaged), baseline_weights)),
        "baseline_losses": losses,
        "keras_epoch_loss": trainer.history[0]["loss"],
        "keras_steps": int(keras.ops.convert_to_numpy(trained.optimizer.iterations)),
        "max_weight_difference": max(float(np.abs(a - b).max()) for a, b in zip(baseline_weights, _weights(trained))),
        # How far training moved the weights: the difference above means little unless this is far larger.
        "max_weight_change": max(float(np.abs(a - b).max()) for a, b in zip(baseline_weights, initial)),
        "device": baseline.device_name(),
        **_other_tensorflow_baseline(initial, datamodule, _weights(trained)),
    }


def _other_tensorflow_baseline(initial, datamodule, keras_weights) -> dict:
    """TensorFlow's baseline compiles with XLA or not as the machine's CPU says, and its
    convolution and pooling differ between the two: the 20 steps again with the other
    choice, so that both are checked on any machine ({} on the other backends), as 2 calls
    of 10 steps (its graph loop, under the other compilation)."""
    import keras
    import numpy as np

    if keras.backend.backend() != "tensorflow":
        return {}
    from benchmarks.framework import tensorflow_baseline

    chosen = tensorflow_baseline.JIT_COMPILE
    other = tensorflow_baseline.build(initial, lr=1e-3, jit_compile=not chosen)
    stacked_images, stacked_labels = (np.stack(arrays) for arrays in zip(*datamodule.train_batches(0)))
    for start in (0, 10):
        other.train_steps(stacked_images[start:start + 10], stacked_labels[start:start + 10])
    return {"other_jit_compile": not chosen,
            "other_jit_max_weight_difference": max(
                float(np.abs(a - b).max()) for a, b in zip(other.get_weights(), keras_weights))}


@check
def fast_pooling(workdir: Path) -> dict:
    """TiledMaxPooling2D against keras.layers.MaxPooling2D on real MNIST activations:
    forward outputs and the gradients of a whole training batch."""
    import keras
    import numpy as np

    from backends import backend_module
    from model.cnn import TiledMaxPooling2D

    datamodule = _datamodule()
    images, labels = next(datamodule.train_batches(0))
    fast, stock = _module(pooling="fast"), _module(pooling="stock")
    activations = fast.network.get_layer("conv2d")(images)
    forward_fast = keras.ops.convert_to_numpy(TiledMaxPooling2D(2)(activations))
    forward_stock = keras.ops.convert_to_numpy(keras.layers.MaxPooling2D(2)(activations))
    probabilities = [keras.ops.convert_to_numpy(m(datamodule.x_test[:512])) for m in (fast, stock)]
    gradients = [[keras.ops.convert_to_numpy(g) for g in backend_module().loss_and_gradients(m, (images, labels))[1]]
                 for m in (fast, stock)]
    result = {
        "forward_equal": bool(np.array_equal(forward_fast, forward_stock)),
        "forward_shape": list(forward_fast.shape),
        "probabilities_equal": bool(np.array_equal(*probabilities)),
        "gradient_max_relative_difference": max(
            _relative_difference(b, a) for a, b in zip(*gradients)),
    }
    if keras.backend.backend() == "tensorflow":
        # TensorFlow's kernel has two branches: the above ran eagerly (TF's MaxPool);
        # compiled by XLA, as Keras compiles a jit_compile step, it is the strided maximum.
        import tensorflow as tf

        layers = (TiledMaxPooling2D(2), keras.layers.MaxPooling2D(2))
        compiled = [tf.function(layer, jit_compile=True) for layer in layers]
        xla_forward = [function(activations).numpy() for function in compiled]
        # Against the stock layer's eager gradients: XLA refuses MaxPool's gradient once
        # op determinism is on (an earlier check in this process turns it on).
        backend = backend_module()
        xla_gradients = [g.numpy() for g in tf.function(
            lambda: backend.loss_and_gradients(fast, (images, labels))[1], jit_compile=True)()]
        result.update(
            xla_forward_equal=bool(np.array_equal(*xla_forward)),
            xla_gradient_max_relative_difference=max(
                _relative_difference(b, a) for a, b in zip(xla_gradients, gradients[1])),
            **{f"xla_{name}_reduce_window": "reduce-window" in function.experimental_get_compiler_ir(activations)(
                stage="hlo", device_name=tf.config.list_logical_devices("CPU")[0].name)
               for name, function in zip(("tiled", "stock"), compiled)})
    return result


@check
def layer_calls(workdir: Path) -> dict:
    """The backend's forward (backends/layers.py: each layer's own call, without Keras'
    Layer.__call__ around it, the ReLU convolution and its pooling as one call) against
    calling the network, on a real training batch: probabilities, the loss's gradients, how
    many Layer.__call__ ran, how many calls were fused, and a network that must go through
    Keras' __call__ (an activity regularizer adds its loss there), a float16 input (through
    Keras too), a LoRA convolution (never fused), and the module's own __call__ in the
    steps' form and others. On TensorFlow and JAX also compiled
    by XLA, as a jit_compile step runs it."""
    import functools

    import keras
    import numpy as np

    from backends import backend_module, layers

    backend = backend_module()
    images, labels = (keras.ops.convert_to_tensor(part) for part in next(_datamodule().train_batches(0)))
    module = _module()
    fused_forward, layer_call = backend.forward, keras.layers.Layer.__call__
    counted = []

    def counting(self, *args, **kwargs):
        counted.append(self.name)
        return layer_call(self, *args, **kwargs)

    def network_forward(network, inputs, training=False):
        return network(inputs, training=training)

    def run(forward, compute):
        counted.clear()
        backend.forward, keras.layers.Layer.__call__ = forward, counting
        try:
            probabilities, gradients = compute()
        finally:
            backend.forward, keras.layers.Layer.__call__ = fused_forward, layer_call
        # The network's and its layers' __call__ (the module's own, in the gradients' pass,
        # is counted by the module-call part below).
        inside = {module.network.name, *(layer.name for layer in module.network.layers)}
        return (keras.ops.convert_to_numpy(probabilities), [keras.ops.convert_to_numpy(g) for g in gradients],
                sum(name in inside for name in counted))

    def eager():
        return backend.forward(module.network, images), backend.loss_and_gradients(module, (images, labels))[1]

    stock, fused = run(network_forward, eager), run(fused_forward, eager)
    regularized = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activity_regularizer="l2")])
    counted.clear()
    keras.layers.Layer.__call__ = counting
    try:
        fused_forward(regularized, keras.ops.ones((2, 4)), training=True)
        regularized_calls = len(counted)
        # Not float32 (float16: JAX has no float64 by default): through Keras, which casts.
        counted.clear()
        half = fused_forward(module.network, keras.ops.cast(images, "float16"))
        half_calls = len(counted)
    finally:
        keras.layers.Layer.__call__ = layer_call
    half_expected = module.network(keras.ops.cast(images, "float16"))
    # The module's own __call__ (CNNModule.__call__): where calls run eagerly, the steps'
    # form, module(images, training=bool), skips Keras' wrapping; other forms keep it.
    module_calls = {}
    keras.layers.Layer.__call__ = counting
    try:
        for form, call in (("steps", lambda: module(images, training=True)),
                           ("training_none", lambda: module(images, training=None)),
                           ("no_training", lambda: module(images)),
                           ("symbolic", lambda: module(keras.Input((28, 28, 1))))):
            counted.clear()
            output = call()
            module_calls[form] = counted.count(module.name)
            if form == "steps":
                module_output = keras.ops.convert_to_numpy(output)
    finally:
        keras.layers.Layer.__call__ = layer_call
    # A LoRA convolution's kernel is computed, not a variable: never fused, and enabling LoRA
    # on a network already run makes its calls anew.
    from model.cnn import build_cnn

    small = build_cnn()
    before = layers.layer_calls(small, backend.conv_relu_pool)
    small.get_layer("conv2d").enable_lora(2)
    after = layers.layer_calls(small, backend.conv_relu_pool)
    lora_forward = keras.ops.convert_to_numpy(fused_forward(small, images[:4]))
    # Another fusable shape (3 input channels, a 5x5 kernel, 4x4 pooling): the fused call's
    # input windows (layers.pooled_conv_windows) must fit any kernel and pool size.
    from model.cnn import TiledMaxPooling2D

    other = keras.Sequential([keras.Input((12, 12, 3)), keras.layers.Conv2D(4, 5, activation="relu"),
                              TiledMaxPooling2D(4), keras.layers.Flatten()])
    other_images = keras.ops.convert_to_tensor(np.random.default_rng(0).normal(size=(2, 12, 12, 3)).astype("float32"))
    result = {
        "forward_equal": bool(np.array_equal(stock[0], fused[0])),
        # The fused pair sums the bias gradient in another order.
        "gradient_relative_differences": [_relative_difference(a, b) for a, b in zip(stock[1], fused[1])],
        "fused_calls": sum(isinstance(call, functools.partial) and call.func is backend.conv_relu_pool
                           for call, _ in layers.layer_calls(module.network, backend.conv_relu_pool)),
        "layer_calls_network": stock[2],
        "layer_calls_forward": fused[2],
        "regularized_layer_calls": regularized_calls,
        "regularized_losses": len(regularized.losses),
        "float16_layer_calls": half_calls,
        "float16_forward_equal": bool(np.array_equal(*map(keras.ops.convert_to_numpy, (half, half_expected)))),
        "module_calls": module_calls,
        "module_output_equal": bool(np.array_equal(module_output, keras.ops.convert_to_numpy(
            module.network(images, training=True)))),
        "calls_eagerly": bool(backend.calls_eagerly(images)),
        "lora_calls_before_after": [len(before), len(after)],
        "lora_fused_after": sum(isinstance(call, functools.partial) for call, _ in after),
        "lora_forward_shape": list(lora_forward.shape),
        "other_fused_calls": sum(isinstance(call, functools.partial)
                                 for call, _ in layers.layer_calls(other, backend.conv_relu_pool)),
        "other_forward_relative_difference": _relative_difference(*map(keras.ops.convert_to_numpy, (
            other(other_images), fused_forward(other, other_images)))),
    }
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        def compiled():
            return tf.function(lambda: (backend.forward(module.network, images),
                                        backend.loss_and_gradients(module, (images, labels))[1]), jit_compile=True)()

        def compiled_forward(network, inputs, forward=fused_forward):
            return tf.function(lambda batch: forward(network, batch), jit_compile=True)(inputs)

        # The compiled forward's HLO: how many convolutions XLA runs.
        forward_hlo = tf.function(lambda batch: fused_forward(module.network, batch), jit_compile=True) \
            .experimental_get_compiler_ir(images)(stage="hlo", device_name=tf.config.list_logical_devices("CPU")[0].name)
        convolutions, products = forward_hlo.count(" convolution("), forward_hlo.count(" dot(")
        # Without XLA the fused call keeps one convolution and TensorFlow's MaxPool.
        graph = tf.function(lambda batch: fused_forward(module.network, batch)).get_concrete_function(images).graph
        result["graph_forward_ops"] = sorted(op.type for op in graph.get_operations()
                                             if op.type in ("Conv2D", "MaxPool"))
    elif keras.backend.backend() == "jax":
        # Training runs the forward pass under jax.jit: compiled, as fit compiles it.
        import jax

        def compiled():
            return jax.jit(lambda: (backend.forward(module.network, images),
                                    backend.loss_and_gradients(module, (images, labels))[1]))()

        def compiled_forward(network, inputs, forward=fused_forward):
            # The inputs as an argument, not a constant XLA could fold the convolutions into.
            return jax.jit(lambda batch: forward(network, batch))(inputs)

        forward_text = jax.jit(lambda batch: fused_forward(module.network, batch)).lower(images).as_text()
        convolutions, products = forward_text.count("stablehlo.convolution"), forward_text.count("stablehlo.dot_general")
        result["jax_on_cpu"] = jax.default_backend() == "cpu"  # pooled_conv is a CPU path
    else:
        return result
    xla_stock, xla_fused = run(network_forward, compiled), run(fused_forward, compiled)
    result.update(xla_forward_equal=bool(np.array_equal(xla_stock[0], xla_fused[0])),
                  xla_gradient_relative_differences=[_relative_difference(a, b)
                                                     for a, b in zip(xla_stock[1], xla_fused[1])],
                  xla_forward_convolutions=convolutions, xla_forward_products=products,
                  xla_other_forward_relative_difference=_relative_difference(*map(keras.ops.convert_to_numpy, (
                      compiled_forward(other, other_images, network_forward), compiled_forward(other, other_images)))))
    return result


@check
def xla_choice(workdir: Path) -> dict:
    """TensorFlow: default_jit_compile by the CPU's flags (a /proc/cpuinfo-style file
    with and without avx512f), for a CPU-only process; deterministic runs never use XLA."""
    import keras

    if keras.backend.backend() != "tensorflow":
        return {"applies": False}
    from backends import tensorflow_backend

    flags = {"avx512": "flags\t\t: fpu sse2 avx avx2 avx512f avx512bw\n", "avx2": "flags\t\t: fpu sse2 avx avx2 fma\n"}
    found = {}
    for isa, line in flags.items():
        path = workdir / f"cpuinfo-{isa}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("processor\t: 0\n" + line)
        found[isa] = tensorflow_backend._cpu_has_avx512(str(path))
    tf = tensorflow_backend.tf
    original_cpu, original_devices = tensorflow_backend._cpu_has_avx512, tf.config.list_physical_devices
    chosen = {}
    try:
        # A CPU-only process on either kind of CPU (whatever this machine has)...
        tf.config.list_physical_devices = lambda kind=None: []
        for isa in flags:
            tensorflow_backend._cpu_has_avx512 = lambda isa=isa: isa == "avx512"
            chosen[isa] = tensorflow_backend.default_jit_compile()
        # ...and one that sees a GPU, on an AVX-512 host: GPUs keep XLA.
        tf.config.list_physical_devices = lambda kind=None: ["/physical_device:GPU:0"] if kind == "GPU" else []
        chosen["gpu_on_avx512"] = tensorflow_backend.default_jit_compile()
    finally:
        tensorflow_backend._cpu_has_avx512, tf.config.list_physical_devices = original_cpu, original_devices
    return {"applies": True, "has_avx512": found, "jit_compile": chosen,
            "deterministic": tensorflow_backend.default_jit_compile(deterministic=True),
            "missing_file": tensorflow_backend._cpu_has_avx512(str(workdir / "absent"))}


@check
def compiled_convolution(workdir: Path) -> dict:
    """Which library XLA:CPU compiled the CNN's convolution to (JAX only: the flag in
    backends.FRAMEWORK_FLAGS moves it from YNNPACK to XLA's own; None elsewhere)."""
    import keras

    if keras.backend.backend() != "jax":
        return {"ynnpack": None}
    import jax

    convolution = _module().network.get_layer("conv2d")
    variables = [variable.value for variable in convolution.trainable_variables]
    images = _datamodule().x_test[:128]
    compiled = jax.jit(lambda v, x: convolution.stateless_call(v, [], x)[0]).lower(variables, images).compile()
    return {"ynnpack": "ynn_fusion" in compiled.as_text(), "xla_flags": os.environ.get("XLA_FLAGS", "")}


@check
def pooled_conv(workdir: Path) -> dict:
    """JAX: backends.jax_backend.pooled_conv (products forward, its own gradients) against
    the stock ops, keras.ops.conv then keras.ops.max_pool, compiled: forward values, and
    the inputs' and kernel's gradients, for this CNN's shapes and another (3 input
    channels, a 5x5 kernel, 4x4 pooling), on inputs with a flat region, where a pooling
    window holds equal maxima (the stock gradient goes to the first of them)."""
    import keras

    if keras.backend.backend() != "jax":
        return {"applies": False}
    import jax
    import numpy as np

    from backends import jax_backend

    if jax.default_backend() != "cpu":
        return {"applies": False}  # the exactness rests on XLA:CPU's products (FRAMEWORK_FLAGS)

    rng = np.random.default_rng(0)
    cases = []
    for inputs_shape, kernel_shape, pool_size in (((8, 28, 28, 1), (3, 3, 1, 32), 2), ((2, 12, 12, 3), (5, 5, 3, 4), 4)):
        inputs = rng.normal(size=inputs_shape).astype("float32")
        inputs[:, : 5 * inputs_shape[1] // 6, : 5 * inputs_shape[2] // 6, :] = 1.0
        kernel = rng.normal(size=kernel_shape).astype("float32")

        def stock(inputs, kernel, pool_size=pool_size):
            features = keras.ops.conv(inputs, kernel, padding="valid", data_format="channels_last")
            return keras.ops.max_pool(features, pool_size, pool_size, padding="valid", data_format="channels_last")

        def fused(inputs, kernel, pool_size=pool_size):
            return jax_backend.pooled_conv(inputs, kernel, pool_size)

        weights = rng.normal(size=stock(inputs, kernel).shape).astype("float32")
        outputs, gradients = [], []
        for function in (stock, fused):
            outputs.append(np.asarray(jax.jit(function)(inputs, kernel)))
            gradients.append(jax.jit(jax.grad(lambda i, k, f=function: (f(i, k) * weights).sum(), (0, 1)))(inputs, kernel))
        _, (_, _, tiles, pooled) = jax_backend._pooled_conv_forward(inputs, kernel, pool_size)
        tied = sum(np.asarray(tile) == np.asarray(pooled) for tile in tiles) > 1
        cases.append({
            "shape": [list(inputs_shape), list(kernel_shape), pool_size],
            "forward_equal": bool(np.array_equal(*outputs)),
            "forward_relative_difference": _relative_difference(*outputs),
            "tied_maxima": int(tied.sum()),
            "gradient_relative_differences": [_relative_difference(a, b) for a, b in zip(*gradients)],
        })
    try:  # a convolution output the pooling does not tile (11x11 by 2): refused by name
        jax_backend.pooled_conv(np.zeros((1, 13, 13, 1), "float32"), np.zeros((3, 3, 1, 2), "float32"), 2)
        refusal = None
    except ValueError as error:
        refusal = str(error)
    return {"applies": True, "cases": cases, "untiled_refusal": refusal}


# Keep last: every check above must be registered before main() runs.
def main(argv: list[str]) -> int:
    from model.runtime import select_backend

    select_backend()  # KERAS_BACKEND's, with the framework flags train.py sets
    out, workdir, names = Path(argv[0]), Path(argv[1]), argv[2:]
    workdir.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in names:
        started = time.perf_counter()
        try:
            results[name] = {"ok": True, "value": CHECKS[name](workdir / name)}
        except Exception:
            results[name] = {"ok": False, "error": traceback.format_exc()}
        results[name]["seconds"] = time.perf_counter() - started
    out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
