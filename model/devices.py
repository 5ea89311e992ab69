"""Where a run trains: the accelerator, how many devices, how many machines.

`train.py --accelerator {auto,cpu,gpu} --devices N [--num-nodes M --node-rank R
--coordinator HOST:PORT]` trains data-parallel through each framework's own engine
(`DataParallel` in backends/<backend>_backend.py):
- JAX: keras.distribution.DataParallel (XLA inserts the all-reduce); N CPU devices are
  simulated with JAX_NUM_CPU_DEVICES, set here before JAX starts;
- TensorFlow: tf.distribute.MirroredStrategy, the module built and compiled in its scope;
  N CPU devices are logical devices. One machine only (keras-team/keras#20585);
- torch: DistributedDataParallel, one process per device, which train.py starts itself
  (torch.multiprocessing, Gloo on CPU, NCCL on GPU).

`--batch-size` is the global batch; every replica gets batch_size / (devices * num_nodes)
images of it. Nothing here imports keras or a framework: `check_placement` and
`prepare_environment` run before keras is imported.
"""

from __future__ import annotations

import os

from model.config import ACCELERATORS, TrainConfig
from model.runtime import UsageError

# The environment variable that gives JAX N CPU devices; read when JAX starts.
JAX_CPU_DEVICES = "JAX_NUM_CPU_DEVICES"


def nearest_multiples(value: int, factor: int) -> list[int]:
    """The multiples of `factor` next to `value` (one when `value` is one)."""
    below, above = value // factor * factor, -(-value // factor) * factor
    return [size for size in dict.fromkeys((below, above)) if size > 0]


def check_batch_size(batch_size: int, replicas: int) -> None:
    if batch_size % replicas:
        sizes = " or ".join(str(size) for size in nearest_multiples(batch_size, replicas))
        raise UsageError(f"--batch-size {batch_size} does not split evenly over {replicas} devices; "
                         f"use a multiple of {replicas}, such as {sizes}")


def parse_coordinator(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--coordinator {text!r} is not HOST:PORT (for example 10.0.0.1:29500)")
    return host, int(port)


def check_placement(config: TrainConfig, backend: str) -> None:
    """Refuse, in one line, what cannot run, before any framework starts."""
    if config.accelerator not in ACCELERATORS:
        raise UsageError(f"unknown accelerator {config.accelerator!r}; valid: {', '.join(ACCELERATORS)}")
    if config.num_nodes > 1:
        if backend == "tensorflow":
            raise UsageError("TensorFlow cannot train on several machines with Keras 3 (MultiWorkerMirroredStrategy "
                             "fails, keras-team/keras#20585); use --backend jax or torch, or --num-nodes 1")
        if backend == "jax":
            # Measured on localhost with 2 processes: the steps train, but Keras' saving
            # gathers the replicated weights with a collective that only rank 0 enters.
            raise UsageError("JAX on several machines is not supported yet (saving a checkpoint from rank 0 needs "
                             "every process; README 'More than one device'); use --backend torch, or --num-nodes 1")
        if not config.coordinator:
            raise UsageError("--num-nodes > 1 needs --coordinator HOST:PORT (the machine with --node-rank 0)")
        parse_coordinator(config.coordinator)
    if not 0 <= config.node_rank < config.num_nodes:
        raise UsageError(f"--node-rank {config.node_rank} is not in 0..{config.num_nodes - 1} (--num-nodes {config.num_nodes})")
    check_batch_size(config.batch_size, config.world_size)


def prepare_environment(config: TrainConfig, backend: str, environ=None) -> None:
    """Settings a framework reads once, when it starts: call after select_backend, before
    keras is imported."""
    environ = os.environ if environ is None else environ
    if config.accelerator == "cpu":
        # The frameworks then see no GPU, so "cpu" means CPU even on a GPU machine.
        environ["CUDA_VISIBLE_DEVICES"] = ""
        if backend == "jax":
            environ["JAX_PLATFORMS"] = "cpu"
    if backend == "jax" and config.devices > 1 and config.accelerator != "gpu":
        # Only the CPU platform reads it: on a GPU machine with "auto" it is harmless.
        environ.setdefault(JAX_CPU_DEVICES, str(config.devices))


def start_engine(config: TrainConfig):
    """The backend's DataParallel engine for `config`, or None for one device on one
    machine (the plain path, unchanged). Call before the module is built."""
    from model.backend import BACKEND

    if config.world_size == 1:
        if config.accelerator == "gpu" and BACKEND.device_name().startswith("cpu"):
            raise UsageError("--accelerator gpu: this backend sees no GPU; use --accelerator cpu or auto")
        return None
    try:
        return BACKEND.DataParallel(
            accelerator=config.accelerator, devices=config.devices, num_nodes=config.num_nodes,
            node_rank=config.node_rank, coordinator=config.coordinator, timeout_s=config.collective_timeout_s)
    except (RuntimeError, ValueError) as error:
        raise UsageError(" ".join(str(error).split())) from None
