"""Choosing the Keras backend, and describing the machine a run happens on.

A process holds one backend for its life: `select_backend` must run before keras is
imported. Nothing here imports keras at module level.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import platform
import random
import sys
from pathlib import Path

from backends import (framework_environment, framework_flags_in_effect, import_framework_quietly,
                      keep_jax_unimported)
from model.config import BACKENDS


class UsageError(Exception):
    """Bad input from the user; the message is one line and says what to do."""


def install_command(extra: str) -> str:
    """The command that installs this project's optional dependencies `extra`."""
    return f"pip install -c constraints.txt '.[{extra}]'"


def configured_backend() -> tuple[str, str]:
    """(backend, where it came from), as Keras itself would decide it."""
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"], "KERAS_BACKEND"
    keras_home = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras"))
    config_file = keras_home / "keras.json"
    try:
        backend = json.loads(config_file.read_text()).get("backend")
    except (OSError, ValueError):
        backend = None
    if backend:
        return backend, str(config_file)
    return "tensorflow", "Keras' default"


def select_backend(requested: str | None = None) -> str:
    """Fix the Keras backend for this process (before keras is imported) and check that
    its framework is installed. Raises UsageError with a one-line fix otherwise."""
    backend, origin = (requested, "--backend") if requested else configured_backend()
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r} (from {origin}); valid backends: {', '.join(BACKENDS)}")
    if "keras" in sys.modules:
        import keras

        if keras.backend.backend() != backend:
            raise UsageError(f"keras is already running on {keras.backend.backend()!r}; start a new process for {backend!r}")
    if importlib.util.find_spec(backend) is None:  # each backend's package bears its name
        raise UsageError(
            f"backend {backend!r} is not installed; install it with: {install_command(backend)}"
        )
    os.environ.update(framework_environment(backend))
    os.environ["KERAS_BACKEND"] = backend
    keep_jax_unimported(backend)
    import_framework_quietly(backend)
    return backend


# Whether pause_garbage_collection turned the collector off, so that
# resume_garbage_collection turns it on again (a collector turned off elsewhere stays off).
_COLLECTOR_PAUSED = False


def pause_garbage_collection() -> None:
    """Turn Python's cyclic garbage collector off while a run starts (train.py and the
    benchmark's time-to-accuracy cells call this first). Importing a framework and Keras
    makes hundreds of thousands of long-lived objects, which the collector scans again and
    again as they pile up: on torch, 6 full collections and 0.6 s before the first step
    (JAX: 3, 0.18 s; one-off counts with gc.callbacks). The Trainer resumes it when
    training starts (resume_garbage_collection)."""
    global _COLLECTOR_PAUSED
    if gc.isenabled():
        gc.disable()
        _COLLECTOR_PAUSED = True


def resume_garbage_collection() -> None:
    """After pause_garbage_collection: the objects made so far moved to the collector's
    permanent generation (gc.freeze: never scanned again, as a forking server does before
    it forks) and the collector on again, so the full collections during training scan
    only what training makes (a 2-epoch torch fit had one, 0.2 s, over everything).
    Nothing when the collector was not paused here."""
    global _COLLECTOR_PAUSED
    if _COLLECTOR_PAUSED:
        gc.freeze()
        gc.enable()
        _COLLECTOR_PAUSED = False


def seed_everything(seed: int) -> None:
    """`keras.utils.set_random_seed(seed)`, minus its TensorFlow import on the other backends.

    Keras seeds TensorFlow whenever it is installed, which imports it: about 8 s and
    hundreds of MB in a JAX or torch process that never uses it (measured here); Keras'
    `.keras` saving and loading leave it unimported too (backends.saving_without_tensorflow).
    Python's, numpy's and the backend's generators are seeded either way; Keras' own
    generator only feeds the layers' initializers, whose draws `seeded_weights` replaces."""
    import keras
    import numpy

    if keras.backend.backend() == "tensorflow" or "tensorflow" in sys.modules:
        keras.utils.set_random_seed(seed)
        return
    random.seed(seed)
    numpy.random.seed(seed)
    if keras.backend.backend() == "torch":
        import torch

        torch.manual_seed(seed)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_runtime() -> dict:
    """Backend, device and versions of this process (imports keras and the backend)."""
    import keras
    import numpy

    from model.backend import BACKEND as backend

    versions = {"python": platform.python_version(), "keras": keras.__version__, "numpy": numpy.__version__}
    versions.update(backend.versions())
    return {
        "backend": keras.backend.backend(),
        "device": backend.device_name(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "versions": versions,
        # What the framework read at start (select_backend's flags and the user's).
        "framework_flags": framework_flags_in_effect(keras.backend.backend()),
    }
