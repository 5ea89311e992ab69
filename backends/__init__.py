"""The one dispatch point from a Keras backend name to this project's backend file.

Each backend file mirrors the others: the same public names in the same order, the
same section comments, so that diffing two of them shows only framework lines.
Only this package (and the native baselines in benchmarks/) imports jax, tensorflow
or torch directly.
"""

from __future__ import annotations

import importlib
import os
import re
from importlib import metadata
from types import ModuleType

BACKEND_MODULES = {
    "jax": "backends.jax_backend",
    "tensorflow": "backends.tensorflow_backend",
    "torch": "backends.torch_backend",
}
EXTRAS = {"jax": "jax", "tensorflow": "tensorflow", "torch": "torch"}

# Settings a framework reads once, when it starts (XLA: when its first client is made),
# so they go into a process's environment before keras is imported: by
# model.runtime.select_backend (train.py, tests/backend_checks.py) and by
# benchmarks/cells.py for every benchmark cell, framework baselines included.
# backend: (package, lowest version measured with, variable, flags). XLA aborts on a flag
# it does not know, hence the version floor.
FRAMEWORK_FLAGS = {
    # jaxlib 0.10's XLA:CPU hands convolutions to YNNPACK by default, where this CNN's
    # (one input channel, and the kernel gradient: a conv with a 26x26 "kernel") run on one
    # thread: 8.8 and 10.3 ms of a 28-31 ms step (jax.profiler). With YNNPACK kept for
    # the matrix products only, XLA's own (Eigen) convolutions run them: the JAX step
    # 28-31 -> 21-23 ms here. TensorFlow's XLA takes the flag and runs the same either way.
    "jax": ("jaxlib", (0, 10), "XLA_FLAGS", ["--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"]),
}


def backend_module(name: str | None = None) -> ModuleType:
    """The backend file for `name` (default: the backend Keras is running on)."""
    if name is None:
        import keras

        name = keras.backend.backend()
    if name not in BACKEND_MODULES:
        raise ValueError(f"Unsupported backend. Received: backend={name!r}; valid: {', '.join(BACKEND_MODULES)}")
    return importlib.import_module(BACKEND_MODULES[name])


def framework_environment(backend: str, environ=None) -> dict:
    """`environ` (default os.environ) plus FRAMEWORK_FLAGS[backend], as a new dict: each
    flag is appended to the variable's flags unless one of the same name is there (the
    user's own setting wins). Unchanged when the framework is missing or older."""
    env = dict(os.environ if environ is None else environ)
    if backend not in FRAMEWORK_FLAGS:
        return env
    package, lowest, variable, flags = FRAMEWORK_FLAGS[backend]
    try:
        version = tuple(int(part) for part in re.findall(r"\d+", metadata.version(package))[: len(lowest)])
    except metadata.PackageNotFoundError:
        return env
    if version < lowest:
        return env
    present = env.get(variable, "").split()
    names = {flag.split("=", 1)[0] for flag in present}
    env[variable] = " ".join(present + [flag for flag in flags if flag.split("=", 1)[0] not in names])
    return env


def framework_flags_in_effect(backend: str) -> dict:
    """{variable: its value in this process} for the variable FRAMEWORK_FLAGS sets for
    `backend` (empty for a backend without one): what results files record."""
    if backend not in FRAMEWORK_FLAGS:
        return {}
    variable = FRAMEWORK_FLAGS[backend][2]
    return {variable: os.environ.get(variable, "")}


def native_train_step(module, *args):
    return backend_module().train_step(module, *args)


def native_test_step(module, *args):
    return backend_module().test_step(module, *args)
