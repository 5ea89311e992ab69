"""Train and evaluate the MNIST CNN on one Keras backend.

    KERAS_BACKEND=jax python train.py            # or: python train.py --backend jax
    python train.py --dry-run                    # a few batches, one epoch
    python train.py --devices 2                  # data parallel (README: "More than one device")

The work happens in model.training.train_and_evaluate; this file only parses flags,
fixes the backend before keras is imported, and turns known failures into one line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from model.arguments import accuracy_fraction, int_in_range, positive_float, positive_int
from model.config import ACCELERATORS, BACKENDS, POOLINGS, RECIPES, SEED_RANGE, STEPS, TrainConfig
from model.runtime import UsageError, select_backend


def build_parser(**kwargs) -> argparse.ArgumentParser:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter, **kwargs)
    parser.add_argument("--backend", help="Keras backend, one of " + ", ".join(BACKENDS)
                        + " (default: $KERAS_BACKEND, else keras.json, else tensorflow)")
    parser.add_argument("--recipe", choices=tuple(RECIPES), default=defaults.recipe,
                        help="a named set of settings (model/config.py RECIPES); flags given explicitly override "
                             "its values. " + "; ".join(f"{name}: {describe_recipe(name)}" for name in RECIPES))
    parser.add_argument("--epochs", type=positive_int, default=defaults.epochs, help="epochs to train")
    parser.add_argument("--batch-size", type=positive_int, default=defaults.batch_size,
                        help="training batch size: the global batch, split evenly over all devices")
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
    devices = parser.add_argument_group("more than one device (data parallel)")
    devices.add_argument("--accelerator", choices=ACCELERATORS, default=defaults.accelerator,
                         help="auto: GPUs when the framework sees any, else CPU")
    devices.add_argument("--devices", type=positive_int, default=defaults.devices, metavar="N",
                         help="devices per machine (on CPU, N simulated devices sharing the cores)")
    devices.add_argument("--num-nodes", type=positive_int, default=defaults.num_nodes, metavar="M",
                         help="machines (jax and torch); run this command once on each")
    devices.add_argument("--node-rank", type=int, default=defaults.node_rank, metavar="R",
                         help="this machine's rank, 0..M-1")
    devices.add_argument("--coordinator", default=defaults.coordinator, metavar="HOST:PORT",
                         help="address of the machine with --node-rank 0 (needed with --num-nodes > 1)")
    devices.add_argument("--collective-timeout", type=positive_float, default=defaults.collective_timeout_s,
                         metavar="SECONDS", help="stop when a collective waits longer (a worker died or hangs)")
    return parser


def describe_recipe(name: str) -> str:
    values = RECIPES[name]
    return ", ".join(f"{field}={value}" for field, value in values.items()) if values else "the defaults shown"


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
    config = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, output_dir=args.output_dir,
        limit_train_batches=args.limit_train_batches, dry_run=args.dry_run, data=args.data, step=args.step,
        resume=args.resume, overwrite=args.overwrite, pooling=args.pooling, target_accuracy=args.target_accuracy,
        accelerator=args.accelerator,
        devices=args.devices, num_nodes=args.num_nodes, node_rank=args.node_rank, coordinator=args.coordinator,
        collective_timeout_s=args.collective_timeout,
    )
    if args.no_augment:
        config = config.replace(shift_pixels=0.0, rotation_degrees=0.0, zoom=0.0)
    config = config.with_recipe(args.recipe, keep=given_settings(argv))
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

        result = train_and_evaluate(config, given=given_settings(argv), launch=launch if config.world_size > 1 else None)
        return result if isinstance(result, int) else 0  # an exit code from the launcher, or run.json's contents

    return report_errors(train, args)


def run_rank(local_rank: int, config: TrainConfig, resumed_from, args) -> int:
    """One data-parallel worker (of several under torch): trains in the output dir the
    launcher locked; the exit code, with known failures turned into one line."""
    from pathlib import Path

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
