"""Train and evaluate the MNIST CNN on one Keras backend.

    KERAS_BACKEND=jax python train.py            # or: python train.py --backend jax
    python train.py --dry-run                    # a few batches, one epoch
    python train.py --devices 2                  # data parallel (README: "More than one device")

The work happens in model.training.train_and_evaluate; this file only parses flags,
fixes the backend before keras is imported, and turns known failures into one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from model.arguments import add_config_flags
from model.config import AUGMENTATION_SETTINGS, BACKENDS, NO_AUGMENT, TrainConfig
from model.runtime import UsageError, pause_garbage_collection, resume_garbage_collection, select_backend


def build_parser(**kwargs) -> argparse.ArgumentParser:
    """train.py's flags: --backend and --no-augment, and one per TrainConfig setting
    (model/config.py holds each one's help, type and default)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], **kwargs)
    parser.add_argument("--backend", help="Keras backend, one of " + ", ".join(BACKENDS)
                        + " (default: $KERAS_BACKEND, else keras.json, else tensorflow)")
    parser.add_argument(NO_AUGMENT, action="store_true",
                        help="train without the random shift/rotation/zoom augmentation (default: off)")
    return add_config_flags(parser, TrainConfig)


def config_from(args: argparse.Namespace, given: set[str]) -> TrainConfig:
    """The TrainConfig the parsed flags ask for: --recipe's values, then the flags in
    `given` (those set on the command line) over them."""
    names = {field.name for field in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**{name: value for name, value in vars(args).items() if name in names})
    if args.no_augment:
        config = config.replace(**dict.fromkeys(AUGMENTATION_SETTINGS, 0.0))
    return config.with_recipe(config.recipe, keep=given)


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def given_settings(argv=None) -> set[str]:
    """The config fields the user set on the command line (--resume checks only these)."""
    unset = object()  # not a string, so argparse does not run it through a flag's type
    parser = build_parser()
    parser.set_defaults(**{action.dest: unset for action in parser._actions if action.dest != "help"})
    given = {name for name, value in vars(parser.parse_args(argv)).items() if value is not unset}
    names = {name for name in given if name != "no_augment"}
    if "no_augment" in given:
        names |= set(AUGMENTATION_SETTINGS)
    return names


def resume_command(args) -> str:
    """The command that continues this run (--resume reads every setting from the checkpoint)."""
    from model.runtime import configured_backend

    parts = ["python train.py", "--backend", args.backend or configured_backend()[0], "--output-dir", args.output_dir]
    if args.data:
        parts += ["--data", args.data]
    return " ".join(parts + ["--resume"])


def main(argv=None) -> int:
    # Off while the frameworks load and the run is set up; the Trainer turns it on again,
    # and so does the end of main when no training started (an error, a finished run).
    pause_garbage_collection()
    try:
        return _main(argv)
    finally:
        resume_garbage_collection()


def _main(argv) -> int:
    args = parse_args(argv)
    given = given_settings(argv)
    config = config_from(args, given)
    try:
        backend = select_backend(args.backend)
        # Hook (model/devices.py): refuse what cannot run, and set what the framework
        # reads when it starts (JAX's CPU device count), before keras is imported.
        from model.devices import check_placement, prepare_environment

        check_placement(config, backend)
        prepare_environment(config, backend)
    except UsageError as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        return 2

    def launch(config, resumed_from) -> int:
        # Data parallel, called with the output dir locked and checked: torch starts one
        # process per device here; JAX and TensorFlow run run_rank in this process.
        from backends import backend_module

        return backend_module(backend).launch(run_rank, (config, resumed_from, args), config)

    def train() -> int:
        from model.training import train_and_evaluate

        result = train_and_evaluate(config, given=given, launch=launch if config.world_size > 1 else None)
        return result if isinstance(result, int) else 0  # an exit code from the launcher, or run.json's contents

    return report_errors(train, args)


def run_rank(local_rank: int, config: TrainConfig, resumed_from, args) -> int:
    """One data-parallel worker (of several under torch): trains in the output dir the
    launcher locked; the exit code, with known failures turned into one line."""
    from model.training import train_in_directory

    def train() -> int:
        train_in_directory(config, Path(config.output_dir), print, resumed_from)
        return 0

    return report_errors(train, args)


def report_errors(run, args) -> int:
    """run()'s exit code, with known failures turned into one line."""
    # Light imports only: the output dir and a resume checkpoint are checked (and refused)
    # before keras and the framework load, which takes seconds.
    from model.checkpoint import CheckpointError
    from model.data import MnistDataError

    def trainer_errors() -> tuple:
        if "model.trainer" not in sys.modules:  # raised only once training code was imported
            return ()
        from model.trainer import NonFiniteLossError, TrainingInterrupted

        return NonFiniteLossError, TrainingInterrupted

    try:
        return run()
    except KeyboardInterrupt:
        # Ctrl-C outside training (imports and data before it, testing and writing the
        # outputs after it), where no handler of ours is installed.
        last = Path(args.output_dir) / "checkpoints" / "last.keras"
        if last.exists():
            print(f"\ntrain.py: stopped by Ctrl-C outside training; {last} is kept; "
                  f"continue with: {resume_command(args)}", file=sys.stderr)
        else:
            print("\ntrain.py: stopped by Ctrl-C before training began; no checkpoint was written", file=sys.stderr)
        return 130
    except UsageError as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        return 2
    except (MnistDataError, CheckpointError, *trainer_errors()) as error:
        print(flush=True)  # end Keras' progress-bar line, so the error gets a line of its own
        if type(error).__name__ == "TrainingInterrupted":
            resume = f"; continue with: {resume_command(args)}" if "kept" in error.checkpoint_note else ""
            print(f"train.py: stopped by Ctrl-C at epoch {error.epoch}, step {error.step} of {error.steps_per_epoch}; "
                  f"{error.checkpoint_note}{resume}", file=sys.stderr)
            return 130
        print(f"train.py: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
