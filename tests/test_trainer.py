"""The trainer's pieces that no full run pins down: StepTimer's median, which epoch
best.keras holds, the "keras already imported" error, --no-augment, the roles' defaults,
the evaluation batch size, the cosine's length under limit_train_batches, and no
TensorFlow INFO lines when Keras saves on another backend.

They do not depend on the backend, so they run once, on torch (the quickest to start):
one Python process for the trainer's pieces and one train.py dry run, started together."""

from __future__ import annotations

import json
import re

import pytest

from tests.helpers import StartedPython, require_backend

PIECES = r'''
import gc, json, sys
from pathlib import Path

from model.runtime import UsageError, pause_garbage_collection, select_backend

pause_garbage_collection()  # as train.py starts; Trainer.fit must turn the collector on again

select_backend("torch")
import keras
import numpy as np

from model.checkpoint import load_model, read_trainer_state
from model.module import CNNModule
from model.trainer import BEST_CHECKPOINT, LAST_CHECKPOINT, AtomicCheckpoint, StepTimer

out = {}

# StepTimer through Keras' callback hooks: two epochs of 7 and 3 steps.
timer = StepTimer()
for steps in (7, 3):
    timer.on_epoch_begin(0)
    for step in range(steps):
        timer.on_train_batch_end(step)
    timer.on_epoch_end(0)
out["steps_recorded"] = [len(epoch) for epoch in timer.step_seconds]
out["epochs_recorded"] = len(timer.epoch_seconds)
# Keras' callbacks see only each call's last step when a call runs several
# (steps_per_execution): calls of 8 and 2 steps, taking 16 and 1 seconds on a fake clock.
import model.trainer as trainer_module
from types import SimpleNamespace

clock, real_time = iter([100.0, 116.0, 117.0, 117.0]), trainer_module.time
trainer_module.time = SimpleNamespace(perf_counter=lambda: next(clock))
calls = StepTimer()
calls.on_epoch_begin(0)
for step in (7, 9):
    calls.on_train_batch_end(step)
calls.on_epoch_end(0)
trainer_module.time = real_time
out["calls_shares"] = calls.step_seconds[0]
# The 5 warm-up steps end inside the first call: the whole call is left out (its shares
# carry the compile time), so the median is the second call's share, 0.5 s.
out["calls_median_ms"] = calls.step_ms_median()

# Steps per call that divide an epoch, up to the backend's most.
from model.timing import whole_executions

out["whole_executions"] = [whole_executions(steps, 16) for steps in (430, 18, 17, 7, 1, 32)]
# Known step times: the first 5 steps of the first epoch (tracing) are left out.
timer.step_seconds = [[9.0] * 5 + [0.010, 0.030, 0.020], [0.040, 0.050]]
out["median_ms"] = timer.step_ms_median()
timer.step_seconds = [[9.0] * 5]
out["median_ms_warmup_only"] = timer.step_ms_median()

# best.keras: the network of the epoch with the highest val_accuracy. Each epoch's
# network gets a marker in its output bias, read back from the saved files.
folder = Path(sys.argv[1])
module = CNNModule(decay_steps=0)
module.configure()
checkpoint = AtomicCheckpoint(folder)
checkpoint.set_model(module)
bias = module.network.get_layer("probabilities").bias
markers = []
for epoch, accuracy in enumerate([0.50, 0.90, 0.70, 0.90, 0.85]):
    bias.assign(np.full(10, epoch + 1.0, "float32"))
    checkpoint.on_epoch_end(epoch, {"loss": 1.0, "val_accuracy": accuracy})
    best = load_model(folder / BEST_CHECKPOINT)
    markers.append(float(keras.ops.convert_to_numpy(best.get_layer("probabilities").bias)[0]))
out["best_markers"] = markers
out["last_marker"] = float(keras.ops.convert_to_numpy(
    load_model(folder / LAST_CHECKPOINT).network.get_layer("probabilities").bias)[0])
out["state"] = read_trainer_state(folder / LAST_CHECKPOINT)
# Saving and loading on torch left TensorFlow unimported (backends.saving_without_tensorflow),
# also a load inside an enclosing block of its own.
from backends import saving_without_tensorflow

with saving_without_tensorflow():
    load_model(folder / LAST_CHECKPOINT)
out["tensorflow_imported_by_saving"] = "tensorflow" in sys.modules

# The roles' defaults are TrainConfig's.
from model.config import TrainConfig
from model.data import MNISTDataModule
from model.trainer import Trainer

defaults = CNNModule()
out["module_defaults"] = [defaults.lr, defaults.ema_momentum, defaults.pooling, defaults.step]
out["trainer_defaults"] = [Trainer().max_epochs, Trainer().eval_batch_size]
out["config_defaults"] = [TrainConfig.lr, TrainConfig.ema_momentum, TrainConfig.pooling, TrainConfig.step,
                          TrainConfig.epochs, TrainConfig.eval_batch_size]

# A fit of 2 epochs limited to 3 batches by the Trainer (the data module has no limit):
# the cosine spans the 6 steps that run. Validation (500 images) and testing (1,000)
# run in batches of eval_batch_size 200: every test_step call is counted.
datamodule = MNISTDataModule(validation_size=500).setup()
datamodule.x_test, datamodule.y_test = datamodule.x_test[:1000], datamodule.y_test[:1000]
limited = CNNModule(ema_momentum=None)
evaluated = []
test_step = limited.test_step
limited.test_step = lambda *args: evaluated.append(1) or test_step(*args)
trainer = Trainer(max_epochs=2, limit_train_batches=3, eval_batch_size=200, verbose=0)
out["collector_before_fit"] = gc.isenabled()
trainer.fit(limited, datamodule)
out["collector_after_fit"] = [gc.isenabled(), gc.get_freeze_count() > 0]
# Nor did the Trainer's fit (its fused loss and metrics read compile's arguments, which
# get_compile_config would serialize, importing TensorFlow).
out["tensorflow_imported_by_fit"] = "tensorflow" in sys.modules
out["decay_steps"] = limited.decay_steps
out["final_learning_rate"] = float(keras.ops.convert_to_numpy(limited.optimizer.learning_rate))
out["steps_run"] = int(keras.ops.convert_to_numpy(limited.optimizer.iterations))
out["validation_batches"] = len(evaluated)
evaluated.clear()
trainer.test(limited, datamodule)
out["test_batches"] = len(evaluated)

# A process holds one backend: asking for another once keras runs is a one-line error.
try:
    select_backend("jax")
    out["switch_error"] = None
except UsageError as error:
    out["switch_error"] = str(error)
out["same_backend_again"] = select_backend("torch")
print(json.dumps(out))
'''


@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory):
    """(trainer pieces' JSON, the --no-augment dry run's process and output dir)."""
    require_backend("torch")
    root = tmp_path_factory.mktemp("trainer")
    pieces = StartedPython(["-c", PIECES, root / "checkpoints"], None, root / "logs-pieces")
    dry_run = StartedPython(["train.py", "--backend", "torch", "--dry-run", "--no-augment", "--output-dir",
                             root / "no-augment"], None, root / "logs-no-augment")
    result = pieces.wait(300)
    assert result.returncode == 0, result.stderr[-3000:]
    pieces_out = json.loads(result.stdout.strip().splitlines()[-1])
    pieces_out["stderr"] = result.stderr
    return pieces_out, (dry_run.wait(300), root / "no-augment")


def test_step_timer_records_each_step_and_medians_past_warm_up(trainer_runs):
    pieces, _ = trainer_runs
    assert pieces["steps_recorded"] == [7, 3] and pieces["epochs_recorded"] == 2
    # Calls of 8 and 2 steps taking 16 and 1 s: every step recorded, each call's time shared
    # evenly; the warm-up (5 steps) ends with the first call, not inside it (2,000 ms).
    assert pieces["calls_shares"] == pytest.approx([2.0] * 8 + [0.5] * 2)
    assert pieces["calls_median_ms"] == pytest.approx(500.0)
    # Median of 10, 30, 20, 40, 50 ms: the five 9-second warm-up steps are not in it.
    assert pieces["median_ms"] == pytest.approx(30.0)
    assert pieces["median_ms_warmup_only"] is None


def test_steps_per_call_divide_the_epoch(trainer_runs):
    """Trainer "auto": the most steps per call, up to the backend's, that divides an epoch
    (a call crossing an epoch's end would train on the next epoch's batches in this one)."""
    pieces, _ = trainer_runs
    assert pieces["whole_executions"] == [10, 9, 1, 7, 1, 16]


def test_best_keras_holds_the_epoch_with_the_best_validation_accuracy(trainer_runs):
    pieces, _ = trainer_runs
    # val_accuracy 0.50, 0.90, 0.70, 0.90, 0.85: epoch 2 becomes best and a tie (epoch 4)
    # does not replace it; last.keras always holds the latest epoch.
    assert pieces["best_markers"] == [1.0, 2.0, 2.0, 2.0, 2.0]
    assert pieces["last_marker"] == 5.0
    assert pieces["state"]["best"] == 0.90 and pieces["state"]["epochs_completed"] == 5
    assert [h["epoch"] for h in pieces["state"]["history"]] == [1, 2, 3, 4, 5]


def test_selecting_another_backend_once_keras_runs_is_an_error(trainer_runs):
    pieces, _ = trainer_runs
    assert pieces["switch_error"] == "keras is already running on 'torch'; start a new process for 'jax'"
    assert pieces["same_backend_again"] == "torch"


def test_no_augment_trains_on_the_plain_images(trainer_runs):
    _, (result, output) = trainer_runs
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((output / "run.json").read_text())["config"]
    assert (config["shift_pixels"], config["rotation_degrees"], config["zoom"]) == (0.0, 0.0, 0.0)
    assert config["epochs"] == 1 and config["limit_train_batches"] == 5


def test_roles_take_their_defaults_from_the_config(trainer_runs):
    pieces, _ = trainer_runs
    assert pieces["module_defaults"] + pieces["trainer_defaults"] == pieces["config_defaults"]


def test_the_cosine_spans_the_limited_run(trainer_runs):
    """Trainer(limit_train_batches=3) for 2 epochs: the learning rate reaches 0 after the
    6 steps that run, not after 2 whole epochs."""
    pieces, _ = trainer_runs
    assert pieces["steps_run"] == 6
    assert pieces["decay_steps"] == 6
    assert pieces["final_learning_rate"] == pytest.approx(0.0, abs=1e-9)


def test_validation_and_testing_run_at_the_evaluation_batch_size(trainer_runs):
    pieces, _ = trainer_runs
    assert pieces["validation_batches"] == 2 * 3  # 2 epochs of 500 images in batches of 200 (Keras' own: 32)
    assert pieces["test_batches"] == 5  # 1,000 images in batches of 200


def test_fit_turns_the_collector_paused_at_start_on_again(trainer_runs):
    """train.py pauses Python's garbage collector while the run starts; Trainer.fit must
    freeze what exists and turn it on again, or the whole run would train without it."""
    pieces, _ = trainer_runs
    assert pieces["collector_before_fit"] is False
    assert pieces["collector_after_fit"] == [True, True]


def test_pausing_the_collector_leaves_one_turned_off_elsewhere_off():
    import gc

    from model import runtime

    enabled = gc.isenabled()
    try:
        gc.disable()
        runtime.pause_garbage_collection()
        runtime.resume_garbage_collection()
        assert not gc.isenabled()
        gc.enable()
        runtime.pause_garbage_collection()
        assert not gc.isenabled()
        runtime.resume_garbage_collection()
        assert gc.isenabled() and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        (gc.enable if enabled else gc.disable)()


def test_saving_on_torch_does_not_import_tensorflow(trainer_runs):
    """Keras' .keras saving and loading ask whether TensorFlow is installed, importing it
    (2.5 s), only to test objects for TensorFlow types; on torch, with TensorFlow never
    imported, they must not (backends.saving_without_tensorflow), nor must the Trainer's
    fit. The files they wrote load back (the best.keras markers above)."""
    pieces, _ = trainer_runs
    assert pieces["tensorflow_imported_by_saving"] is False
    assert pieces["tensorflow_imported_by_fit"] is False
    assert pieces["best_markers"] == [1.0, 2.0, 2.0, 2.0, 2.0]


def test_saving_on_torch_prints_no_tensorflow_info_lines(trainer_runs):
    """No TensorFlow INFO lines ("I0000 ... oneDNN custom operations are on") in a torch
    process that saved and loaded models: TensorFlow is left unimported there, and where
    it is imported it is imported quietly (backends.import_tensorflow_quietly)."""
    pieces, _ = trainer_runs
    chatter = [line for line in pieces["stderr"].splitlines()
               if re.match(r"I\d{4} ", line) or "absl::InitializeLog" in line or "oneDNN" in line]
    assert not chatter, chatter
