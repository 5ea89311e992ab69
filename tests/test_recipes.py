"""Named recipes (train.py --recipe): their values reach the run, explicit flags win, resume
keeps the recipe (and a checkpoint from before a setting existed resumes with the value it
had then), and the learning-rate warm-up some recipes use.

The train.py run and the schedule check run once, on torch (the quickest to start), in two
processes started together; the rest needs no framework."""

from __future__ import annotations

import json
import zipfile
import math

import numpy as np
import pytest

from model.config import RECIPES, RUN_SETTINGS_ADDED, TrainConfig
from model.runtime import UsageError
from model.training import resumed_config, run_settings
from tests.helpers import StartedPython, require_backend

SCHEDULE = r'''
import json
import sys
import zipfile

from model.runtime import select_backend

select_backend("torch")
import numpy as np
from keras import ops

from model.checkpoint import load_model, save_model
from model.config import TrainConfig
from model.module import CNNModule, sparse_crossentropy
from model.training import prepare_run


def rates(optimizer):
    """The learning rate the optimizer uses at each step."""
    found = []
    for step in (0, 5, 10, 55, 100, 120):
        optimizer.iterations.assign(step)
        found.append(float(ops.convert_to_numpy(optimizer.learning_rate)))
    return found


# The loss a module with label smoothing trains with, on two known images.
probabilities = np.array([[0.7, 0.2, 0.1] + [0.0] * 7, [0.1] * 10], "float32")
labels = np.array([0, 3], "int32")
module = CNNModule(label_smoothing=0.1, decay_steps=0).configure()
smoothed = module.compute_loss(y=labels, y_pred=probabilities)

# A checkpoint written before label smoothing existed: its module config has no such key.
saved = save_model(module, sys.argv[1] + "/smoothed.keras")
with zipfile.ZipFile(saved) as archive:
    entries = {name: archive.read(name) for name in archive.namelist()}
config = json.loads(entries["config.json"])
del config["config"]["label_smoothing"]
entries["config.json"] = json.dumps(config)
with zipfile.ZipFile(sys.argv[1] + "/older.keras", "w") as archive:
    for name, data in entries.items():
        archive.writestr(name, data)

# The module prepare_run builds (as train.py's) for settings that are not the defaults.
settings = dict(label_smoothing=0.05, warmup_epochs=0.5, limit_train_batches=4)
prepared, _, _ = prepare_run(TrainConfig(output_dir=None, **settings))
print(json.dumps({"warm": rates(CNNModule(lr=1e-3, decay_steps=100, warmup_steps=10).configure_optimizers()),
                  "plain": rates(CNNModule(lr=1e-3, decay_steps=100).configure_optimizers()),
                  "smoothed_loss": float(ops.convert_to_numpy(smoothed)),
                  "step_loss": float(ops.convert_to_numpy(module.training_step((None, labels), probabilities)[0])),
                  "plain_loss": float(ops.convert_to_numpy(ops.mean(sparse_crossentropy(labels, probabilities)))),
                  "reloaded_smoothing": load_model(saved).label_smoothing,
                  "older_smoothing": load_model(sys.argv[1] + "/older.keras").label_smoothing,
                  "prepared": {"settings": settings, "label_smoothing": prepared.label_smoothing,
                               "warmup_steps": prepared.warmup_steps}}))
'''

EXPLICIT_LR = 0.0042


@pytest.fixture(scope="module")
def recipe_runs(tmp_path_factory):
    """(the schedule's learning rates, the --recipe fast run's process and output dir)."""
    require_backend("torch")
    root = tmp_path_factory.mktemp("recipes")
    schedule = StartedPython(["-c", SCHEDULE, root], None, root / "logs-schedule")
    # --epochs and --lr given: they win over the recipe's (and keep the run short even if
    # the recipe were ignored); the recipe's other values must reach the run.
    run = StartedPython(["train.py", "--backend", "torch", "--recipe", "fast", "--lr", str(EXPLICIT_LR), "--epochs",
                         "1", "--limit-train-batches", "2", "--output-dir", root / "fast"], None, root / "logs-fast")
    result = schedule.wait(300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), (run.wait(300), root / "fast")


def test_a_recipes_values_reach_run_json_and_explicit_flags_win(recipe_runs):
    _, (result, output) = recipe_runs
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((output / "run.json").read_text())["config"]
    assert config["recipe"] == "fast"
    assert config["lr"] == EXPLICIT_LR != RECIPES["fast"]["lr"]  # the flags given win
    assert config["epochs"] == 1 != RECIPES["fast"]["epochs"]
    assert config["limit_train_batches"] == 2
    for name, value in RECIPES["fast"].items():
        if name not in ("lr", "epochs"):
            assert config[name] == value != getattr(TrainConfig(), name), name
    # What the run resumes with is the recipe's too (last.keras's trainer state).
    from model.checkpoint import read_trainer_state

    stored = read_trainer_state(output / "checkpoints" / "last.keras")["run"]
    assert stored["recipe"] == "fast" and stored["lr"] == EXPLICIT_LR
    # And the module that trained got them: its warm-up counted in the limited epoch's
    # steps (0.3 of 2 batches: 1 step; the module's saved config).
    with zipfile.ZipFile(output / "checkpoints" / "last.keras") as archive:
        saved = json.loads(archive.read("config.json"))
    module, optimizer = saved["config"], saved["compile_config"]["optimizer"]["config"]
    assert module["warmup_steps"] == round(RECIPES["fast"]["warmup_epochs"] * 2) == 1
    # Adam's betas: the module's and the optimizer it compiled with.
    betas = [RECIPES["fast"]["adam_beta_1"], RECIPES["fast"]["adam_beta_2"]]
    assert module["adam_betas"] == [optimizer["beta_1"], optimizer["beta_2"]] == betas != [0.9, 0.999]


def test_prepare_run_gives_the_module_the_configs_smoothing_and_warm_up(recipe_runs):
    """No recipe changes the default smoothing now, so a module that took CNNModule's own
    default would pass the run above: here both settings are not the defaults."""
    prepared = recipe_runs[0]["prepared"]
    assert prepared["label_smoothing"] == prepared["settings"]["label_smoothing"] != TrainConfig.label_smoothing
    # Half of an epoch limited to 4 batches: 2 steps.
    assert prepared["warmup_steps"] == round(prepared["settings"]["warmup_epochs"] * 4) == 2


def test_a_module_saved_before_label_smoothing_existed_reloads_without_it(recipe_runs):
    """Trainer._restore rebuilds the module from last.keras (load_model): a checkpoint whose
    module config has no label_smoothing trained with none, whatever today's default is."""
    schedule, _ = recipe_runs
    assert schedule["reloaded_smoothing"] == 0.1  # a saved value is kept
    assert schedule["older_smoothing"] == RUN_SETTINGS_ADDED["label_smoothing"] == 0.0 != TrainConfig.label_smoothing


def test_warm_up_rises_linearly_then_the_cosine_runs_over_the_remaining_steps(recipe_runs):
    schedule, _ = recipe_runs
    # Steps 0, 5, 10 of a 10-step warm-up to 1e-3; then a cosine over the other 90 steps.
    assert schedule["warm"] == pytest.approx([0.0, 5e-4, 1e-3, 5e-4, 0.0, 0.0], abs=1e-9)
    cosine = [1e-3 * 0.5 * (1 + math.cos(math.pi * min(step, 100) / 100)) for step in (0, 5, 10, 55, 100, 120)]
    assert schedule["plain"] == pytest.approx(cosine, abs=1e-9)  # without warm-up: as before


def test_label_smoothing_is_keras_formula_in_compile_and_in_the_native_step(recipe_runs):
    schedule, _ = recipe_runs
    probabilities = np.clip(np.array([[0.7, 0.2, 0.1] + [0.0] * 7, [0.1] * 10]), 1e-7, 1 - 1e-7)
    targets = np.eye(10)[[0, 3]] * 0.9 + 0.01  # (1 - 0.1) on the label, 0.1 / 10 on every class
    expected = float(np.mean(-(targets * np.log(probabilities)).sum(axis=-1)))
    assert schedule["smoothed_loss"] == pytest.approx(expected, rel=1e-5)
    assert schedule["step_loss"] == pytest.approx(expected, rel=1e-5)
    assert schedule["plain_loss"] == pytest.approx(float(np.mean(-np.log(probabilities[[0, 1], [0, 3]]))), rel=1e-5)


def test_an_unknown_recipe_names_the_valid_ones():
    with pytest.raises(ValueError, match="recipe='turbo'; valid: default, fast"):
        TrainConfig().with_recipe("turbo")


def test_explicit_settings_are_kept_over_the_recipes():
    config = TrainConfig(lr=EXPLICIT_LR).with_recipe("fast", keep={"lr"})
    assert config.lr == EXPLICIT_LR != RECIPES["fast"]["lr"] and config.epochs == RECIPES["fast"]["epochs"] and config.recipe == "fast"
    assert TrainConfig().with_recipe("default") == TrainConfig()


def test_resume_restores_the_recipe_and_refuses_another():
    fast = TrainConfig().with_recipe("fast")
    # train.py --resume with no other flag: the config starts as the default recipe's.
    resumed = resumed_config(TrainConfig(resume=True), run_settings(fast), given={"resume"})
    assert resumed == fast.replace(resume=True)
    with pytest.raises(UsageError, match=r"--recipe default \(checkpoint: fast\)"):
        resumed_config(TrainConfig(resume=True), run_settings(fast), given={"resume", "recipe"})


def test_a_checkpoint_from_before_recipes_resumes_with_the_settings_runs_had_then():
    """Such a checkpoint lacks recipe, warm-up and label smoothing: it resumes with the
    values every run had before they existed (RUN_SETTINGS_ADDED), not today's defaults."""
    stored = {name: value for name, value in run_settings(TrainConfig()).items() if name not in RUN_SETTINGS_ADDED}
    resumed = resumed_config(TrainConfig(), stored, given=set())
    assert resumed == TrainConfig().replace(**RUN_SETTINGS_ADDED) != TrainConfig()
    assert resumed.label_smoothing == 0.0 and resumed.recipe == "default"
