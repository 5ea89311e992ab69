"""Train and evaluate the MNIST CNN on one Keras backend.

    KERAS_BACKEND=jax python train.py            # or: python train.py --backend jax
    python train.py --dry-run                    # a few batches, one epoch

The work happens in model.training.train_and_evaluate; this file only parses flags,
fixes the backend before keras is imported, and turns known failures into one line.
"""

from __future__ import annotations

import argparse
import sys

from model.arguments import accuracy_fraction, positive_float, positive_int
from model.config import BACKENDS, POOLINGS, STEPS, TrainConfig
from model.runtime import UsageError, select_backend


def parse_args(argv=None) -> argparse.Namespace:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--backend", help="Keras backend, one of " + ", ".join(BACKENDS)
                        + " (default: $KERAS_BACKEND, else keras.json, else tensorflow)")
    parser.add_argument("--epochs", type=positive_int, default=defaults.epochs, help="epochs to train")
    parser.add_argument("--batch-size", type=positive_int, default=defaults.batch_size, help="training batch size")
    parser.add_argument("--lr", type=positive_float, default=defaults.lr, help="peak Adam learning rate (cosine decay to 0)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed for weights, split, order and augmentation")
    parser.add_argument("--output-dir", default=defaults.output_dir, help="where model.keras, run.json, curves.png go")
    parser.add_argument("--limit-train-batches", type=positive_int, default=defaults.limit_train_batches,
                        metavar="N", help="train on at most N batches per epoch")
    parser.add_argument("--dry-run", action="store_true", help="quick check: one epoch of a few batches")
    parser.add_argument("--data", default=defaults.data, metavar="PATH",
                        help="mnist.npz or a folder of IDX files (default: $MNIST_PATH, cache, download)")
    parser.add_argument("--step", choices=STEPS, default=defaults.step,
                        help="Keras' built-in train step or the backends/ native one")
    parser.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoints/last.keras")
    parser.add_argument("--pooling", choices=POOLINGS, default=defaults.pooling,
                        help="max-pool layer: TiledMaxPooling2D, each backend's fastest exact kernel (fast), "
                             "or keras.layers.MaxPooling2D (stock)")
    parser.add_argument("--no-augment", action="store_true",
                        help="train without the random shift/rotation/zoom augmentation")
    parser.add_argument("--target-accuracy", type=accuracy_fraction, default=defaults.target_accuracy, metavar="A",
                        help="stop after the first epoch whose test accuracy is at least A, e.g. 0.99")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        select_backend(args.backend)
    except UsageError as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        return 2

    from model.checkpoint import CheckpointError
    from model.data import MnistDataError
    from model.trainer import NonFiniteLossError
    from model.training import train_and_evaluate

    config = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, output_dir=args.output_dir,
        limit_train_batches=args.limit_train_batches, dry_run=args.dry_run, data=args.data, step=args.step,
        resume=args.resume, pooling=args.pooling, target_accuracy=args.target_accuracy,
    )
    if args.no_augment:
        config = config.replace(shift_pixels=0.0, rotation_degrees=0.0, zoom=0.0)
    try:
        train_and_evaluate(config)
    except UsageError as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        return 2
    except (MnistDataError, CheckpointError, NonFiniteLossError) as error:
        print(flush=True)  # end Keras' progress-bar line, so the error gets a line of its own
        print(f"train.py: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
