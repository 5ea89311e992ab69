"""Train and evaluate the MNIST CNN on one Keras backend.

    KERAS_BACKEND=jax python train.py            # or: python train.py --backend jax
    python train.py --dry-run                    # a few batches, one epoch

The work happens in model.training.train_and_evaluate; this file only parses flags,
fixes the backend before keras is imported, and turns known failures into one line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from model.arguments import accuracy_fraction, int_in_range, positive_float, positive_int
from model.config import BACKENDS, POOLINGS, SEED_RANGE, STEPS, TrainConfig
from model.runtime import UsageError, select_backend


def build_parser(**kwargs) -> argparse.ArgumentParser:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter, **kwargs)
    parser.add_argument("--backend", help="Keras backend, one of " + ", ".join(BACKENDS)
                        + " (default: $KERAS_BACKEND, else keras.json, else tensorflow)")
    parser.add_argument("--epochs", type=positive_int, default=defaults.epochs, help="epochs to train")
    parser.add_argument("--batch-size", type=positive_int, default=defaults.batch_size, help="training batch size")
    parser.add_argument("--lr", type=positive_float, default=defaults.lr, help="peak Adam learning rate (cosine decay to 0)")
    parser.add_argument("--seed", type=int_in_range(*SEED_RANGE), default=defaults.seed,
                        help=f"seed for weights, split, order and augmentation, {SEED_RANGE[0]} to {SEED_RANGE[1]}")
    parser.add_argument("--output-dir", default=defaults.output_dir, help="where model.keras, run.json, curves.png go")
    parser.add_argument("--limit-train-batches", type=positive_int, default=defaults.limit_train_batches,
                        metavar="N", help="train on at most N batches per epoch")
    parser.add_argument("--dry-run", action="store_true", help="quick check: one epoch of a few batches")
    parser.add_argument("--data", default=defaults.data, metavar="PATH",
                        help="mnist.npz or a folder of IDX files (default: $MNIST_PATH, cache, download)")
    parser.add_argument("--step", choices=STEPS, default=defaults.step,
                        help="Keras' built-in train step or the backends/ native one")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in OUTPUT_DIR from checkpoints/last.keras, with its settings")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the previous run in OUTPUT_DIR (without it, a new run there is refused)")
    parser.add_argument("--pooling", choices=POOLINGS, default=defaults.pooling,
                        help="max-pool layer: TiledMaxPooling2D, each backend's fastest exact kernel (fast), "
                             "or keras.layers.MaxPooling2D (stock)")
    parser.add_argument("--no-augment", action="store_true",
                        help="train without the random shift/rotation/zoom augmentation")
    parser.add_argument("--target-accuracy", type=accuracy_fraction, default=defaults.target_accuracy, metavar="A",
                        help="stop after the first epoch whose test accuracy is at least A, e.g. 0.99")
    return parser


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
        names |= {"shift_pixels", "rotation_degrees", "zoom"}
    return names


def resume_command(args) -> str:
    """The command that continues this run (--resume reads every setting from the checkpoint)."""
    from model.runtime import configured_backend

    parts = ["python train.py", "--backend", args.backend or configured_backend()[0], "--output-dir", args.output_dir]
    if args.data:
        parts += ["--data", args.data]
    return " ".join(parts + ["--resume"])


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        select_backend(args.backend)
    except UsageError as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        return 2

    # Light imports only: the output dir and a resume checkpoint are checked (and refused)
    # before keras and the framework load, which takes seconds.
    from model.checkpoint import CheckpointError
    from model.data import MnistDataError
    from model.training import train_and_evaluate

    def trainer_errors() -> tuple:
        if "model.trainer" not in sys.modules:  # raised only once training code was imported
            return ()
        from model.trainer import NonFiniteLossError, TrainingInterrupted

        return NonFiniteLossError, TrainingInterrupted

    config = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, output_dir=args.output_dir,
        limit_train_batches=args.limit_train_batches, dry_run=args.dry_run, data=args.data, step=args.step,
        resume=args.resume, overwrite=args.overwrite, pooling=args.pooling, target_accuracy=args.target_accuracy,
    )
    if args.no_augment:
        config = config.replace(shift_pixels=0.0, rotation_degrees=0.0, zoom=0.0)
    try:
        train_and_evaluate(config, given=given_settings(argv))
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
