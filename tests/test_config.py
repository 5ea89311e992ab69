"""train.py's flags are built from TrainConfig (model/config.py, model/arguments.py):
one edit adds a setting, every help states its default once, and the flags give back
the config. In-process, no Keras backend."""

from __future__ import annotations

import argparse
import dataclasses
import re
from dataclasses import dataclass

import pytest

import train
from model.arguments import add_config_flags, positive_int
from model.config import NO_AUGMENT, RUN_SETTINGS, TrainConfig, setting


def option_helps(parser: argparse.ArgumentParser) -> dict[str, str]:
    """{flag: its help as --help prints it (argparse's %-formatting applied)}."""
    formatter = parser._get_formatter()
    return {action.option_strings[0]: formatter._expand_help(action) for action in parser._actions
            if action.option_strings and action.dest != "help"}


def test_every_help_states_its_default_once():
    helps = option_helps(train.build_parser())
    assert len(helps) > 20
    for flag, text in helps.items():
        assert text.count("(default:") == 1, (flag, text)
    assert "(default: None)" not in train.build_parser().format_help()
    assert helps["--epochs"].endswith(f"(default: {TrainConfig.epochs})")
    assert helps["--data"].endswith("(default: $MNIST_PATH, else the cache, else a download)")


def test_no_flags_give_the_default_config_and_every_flag_reaches_its_field():
    assert train.config_from(train.parse_args([]), train.given_settings([])) == TrainConfig()
    argv = ["--epochs", "3", "--batch-size", "64", "--lr", "0.01", "--seed", "7", "--eval-batch-size", "500",
            "--limit-train-batches", "9", "--dry-run", "--step", "native", "--pooling", "stock", "--data", "m.npz",
            "--output-dir", "out", "--resume", "--overwrite", "--target-accuracy", "0.9", "--accelerator", "cpu",
            "--devices", "2", "--num-nodes", "2", "--node-rank", "1", "--coordinator", "h:1",
            "--collective-timeout", "5", NO_AUGMENT, "--recipe", "fast"]
    # The recipe's values where no flag was given; the flags given win over it.
    config = train.config_from(train.parse_args(argv), train.given_settings(argv))
    assert config == TrainConfig(
        epochs=3, batch_size=64, lr=0.01, seed=7, eval_batch_size=500, limit_train_batches=9, dry_run=True,
        step="native", pooling="stock", data="m.npz", output_dir="out", resume=True, overwrite=True,
        target_accuracy=0.9, accelerator="cpu", devices=2, num_nodes=2, node_rank=1, coordinator="h:1",
        collective_timeout_s=5.0, shift_pixels=0.0, rotation_degrees=0.0, zoom=0.0, recipe="fast",
        warmup_epochs=0.3, adam_beta_1=0.8, adam_beta_2=0.99, label_smoothing=0.1, ema_momentum=None)
    # Every field with a help is a flag of train.py: the argv above names each one.
    flags = {field.name for field in dataclasses.fields(TrainConfig) if field.metadata.get("help")}
    assert {name for name in flags if getattr(config, name) == getattr(TrainConfig(), name)} == set()


def test_a_new_setting_is_one_edit():
    @dataclass(frozen=True)
    class Extended(TrainConfig):
        cooldown_epochs: int = setting(2, "epochs at the final learning rate", type=positive_int, metavar="N")

    parser = add_config_flags(argparse.ArgumentParser(), Extended)
    assert parser.parse_args(["--cooldown-epochs", "4"]).cooldown_epochs == 4
    assert parser.parse_args([]).cooldown_epochs == 2
    assert option_helps(parser)["--cooldown-epochs"] == "epochs at the final learning rate (default: 2)"
    with pytest.raises(SystemExit) as refused:
        parser.parse_args(["--cooldown-epochs", "0"])
    assert refused.value.code == 2


def test_run_settings_and_the_flags_that_set_them():
    """What --resume compares, each named by its flag in the refusal."""
    assert RUN_SETTINGS == {
        "epochs": "--epochs", "batch_size": "--batch-size", "lr": "--lr", "seed": "--seed", "ema_momentum": None,
        "validation_size": None, "shift_pixels": NO_AUGMENT, "rotation_degrees": NO_AUGMENT, "zoom": NO_AUGMENT,
        "limit_train_batches": "--limit-train-batches", "step": "--step", "pooling": "--pooling",
        "warmup_epochs": None, "adam_beta_1": None, "adam_beta_2": None, "label_smoothing": None,
        "recipe": "--recipe"}
    assert train.given_settings(["--lr", "0.1", NO_AUGMENT]) == {"lr", "shift_pixels", "rotation_degrees", "zoom"}


def test_help_text_with_a_percent_sign_is_printed_as_written():
    @dataclass(frozen=True)
    class Percent:
        share: float = setting(0.5, "share of the data, in % of it")

    text = option_helps(add_config_flags(argparse.ArgumentParser(), Percent))["--share"]
    assert re.fullmatch(r"share of the data, in % of it \(default: 0\.5\)", text), text
