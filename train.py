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

from model.arguments import positive_float, positive_int
from model.config import ACCELERATORS, BACKENDS, POOLINGS, STEPS, TrainConfig
from model.runtime import UsageError, select_backend


def parse_args(argv=None) -> argparse.Namespace:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--backend", help="Keras backend, one of " + ", ".join(BACKENDS)
                        + " (default: $KERAS_BACKEND, else keras.json, else tensorflow)")
    parser.add_argument("--epochs", type=positive_int, default=defaults.epochs, help="epochs to train")
    parser.add_argument("--batch-size", type=positive_int, default=defaults.batch_size,
                        help="training batch size: the global batch, split evenly over all devices")
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
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    config = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, output_dir=args.output_dir,
        limit_train_batches=args.limit_train_batches, dry_run=args.dry_run, data=args.data, step=args.step,
        resume=args.resume, pooling=args.pooling, accelerator=args.accelerator, devices=args.devices,
        num_nodes=args.num_nodes, node_rank=args.node_rank, coordinator=args.coordinator,
        collective_timeout_s=args.collective_timeout,
    )
    if args.no_augment:
        config = config.replace(shift_pixels=0.0, rotation_degrees=0.0, zoom=0.0)
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
    if config.world_size > 1:
        from model.training import check_output_dir

        try:
            check_output_dir(config.output_dir)  # once, before any worker starts
        except UsageError as error:
            print(f"train.py: error: {error}", file=sys.stderr)
            return 2
        from backends import backend_module

        # torch starts one process per device here; JAX and TensorFlow run run_rank in this one.
        return backend_module(backend).launch(run_rank, (config,), config)
    return run_rank(0, config)


def run_rank(local_rank: int, config: TrainConfig) -> int:
    """Train as `config` says in this process (one of several under torch's data
    parallel); the exit code, with known failures turned into one line."""
    from model.checkpoint import CheckpointError
    from model.data import MnistDataError
    from model.trainer import NonFiniteLossError
    from model.training import train_and_evaluate

    try:
        # Data parallel: main() checked the output dir before the workers started.
        train_and_evaluate(config, check_output=config.world_size == 1)
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
