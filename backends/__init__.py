"""The one dispatch point from a Keras backend name to this project's backend file.

Each backend file mirrors the others: the same public names in the same order, the
same section comments, so that diffing two of them shows only framework lines.
Only this package (and the native baselines in benchmarks/) imports jax, tensorflow
or torch directly.
"""

from __future__ import annotations

import importlib
from types import ModuleType

BACKEND_MODULES = {
    "jax": "backends.jax_backend",
    "tensorflow": "backends.tensorflow_backend",
    "torch": "backends.torch_backend",
}
EXTRAS = {"jax": "jax", "tensorflow": "tensorflow", "torch": "torch"}


def backend_module(name: str | None = None) -> ModuleType:
    """The backend file for `name` (default: the backend Keras is running on)."""
    if name is None:
        import keras

        name = keras.backend.backend()
    if name not in BACKEND_MODULES:
        raise ValueError(f"Unsupported backend. Received: backend={name!r}; valid: {', '.join(BACKEND_MODULES)}")
    return importlib.import_module(BACKEND_MODULES[name])


def native_train_step(module, *args):
    return backend_module().train_step(module, *args)


def native_test_step(module, *args):
    return backend_module().test_step(module, *args)
