"""The one dispatch point from a Keras backend name to this project's backend file.

Each backend file mirrors the others: the same public names in the same order, the
same section comments, so that diffing two of them shows only framework lines.
Only this package (and the native baselines in benchmarks/) imports jax, tensorflow
or torch directly.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.util
import os
import re
import sys
import tempfile
from importlib import metadata
from types import ModuleType

# The serving path every backend can take (each backend file's `predictor`).
KERAS_PREDICT = "keras-predict_on_batch"

BACKEND_MODULES = {
    "jax": "backends.jax_backend",
    "tensorflow": "backends.tensorflow_backend",
    "torch": "backends.torch_backend",
}

# Settings a framework reads once, when it starts (XLA: when its first client is made),
# so they go into a process's environment before keras is imported: by
# model.runtime.select_backend (train.py, tests/backend_checks.py) and by
# benchmarks/cells.py for every benchmark cell, framework baselines included.
# backend: (package, lowest version measured with, variable, flags). XLA aborts on a flag
# it does not know, hence the version floor.
FRAMEWORK_FLAGS = {
    # jaxlib 0.10's XLA:CPU hands convolutions and matrix products to YNNPACK by default,
    # where this CNN's convolutions (one input channel, and the kernel gradient: a conv with
    # a 26x26 "kernel") ran on one thread: 8.8 and 10.3 ms of a 28-31 ms step
    # (jax.profiler). With YNNPACK kept for reductions only, XLA's own (Eigen) kernels run
    # the convolutions and the products: Eigen's product sums a row's taps in the order its
    # convolution does, so jax_backend.pooled_conv's products give the stock convolution's
    # values exactly (tested), and the dense layers' gradient took 3.3 ms against 3.6-3.7
    # with YNNPACK's products (one-off timings, jax_backend.pooled_conv's docstring) and
    # 4.2-4.3 with YNNPACK off altogether (an empty value): hence REDUCE, not nothing.
    # The value replaces XLA's whole list of what YNNPACK takes.
    # TensorFlow's XLA is not given the flag.
    "jax": ("jaxlib", (0, 10), "XLA_FLAGS", ["--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_REDUCE"]),
}

# Defaults every backend's process gets unless the user set the variable: TensorFlow's C++
# INFO lines ("XLA service ... initialized", "Compiled cluster using XLA!") would come
# before the run's first line. Level 1 drops INFO and keeps warnings and errors. Every
# backend gets it: a JAX or torch process that imports TensorFlow (a tf.data input, Keras'
# saving where saving_without_tensorflow cannot tell it TensorFlow is absent) stays quiet.
QUIET_DEFAULTS = {"TF_CPP_MIN_LOG_LEVEL": "1"}
# The lines TensorFlow's import writes before its logging reads TF_CPP_MIN_LOG_LEVEL
# (absl's "before absl::InitializeLog()" notice and "I0000 ... oneDNN custom operations are on").
_EARLY_INFO_LINES = re.compile(r"^(I\d{4} [\d:.]+ +\d+ \S+:\d+\] |WARNING: All log messages before absl::InitializeLog\(\))")


def backend_module(name: str | None = None) -> ModuleType:
    """The backend file for `name` (default: the backend Keras is running on)."""
    if name is None:
        import keras

        name = keras.backend.backend()
    if name not in BACKEND_MODULES:
        raise ValueError(f"Unsupported backend. Received: backend={name!r}; valid: {', '.join(BACKEND_MODULES)}")
    return importlib.import_module(BACKEND_MODULES[name])


def framework_environment(backend: str, environ=None) -> dict:
    """`environ` (default os.environ) plus QUIET_DEFAULTS and FRAMEWORK_FLAGS[backend], as a
    new dict: a QUIET_DEFAULTS variable only where unset, each flag appended to the
    variable's flags unless one of the same name is there (the user's own setting wins).
    The flags are left out when the framework is missing or older."""
    env = dict(os.environ if environ is None else environ)
    for variable, value in QUIET_DEFAULTS.items():
        env.setdefault(variable, value)
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


def import_framework_quietly(backend: str) -> None:
    """Import TensorFlow (for the tensorflow backend; nothing for the others) with the INFO
    lines it writes to stderr before TF_CPP_MIN_LOG_LEVEL applies dropped, and every other
    line (warnings, errors) passed on. For a process whose TF_CPP_MIN_LOG_LEVEL asks for
    INFO (below 1), nothing is dropped."""
    if backend == "tensorflow":
        import_tensorflow_quietly()


def import_tensorflow_quietly() -> None:
    """Import TensorFlow as import_framework_quietly does, when it is installed and not
    imported yet (also where Keras' saving would import it: saving_without_tensorflow)."""
    if "tensorflow" in sys.modules or importlib.util.find_spec("tensorflow") is None:
        return
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0") in ("", "0"):
        return  # INFO asked for (or nothing set): TensorFlow's own lines, when Keras imports it
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode(errors="replace").splitlines(keepends=True)
            sys.stderr.write("".join(line for line in lines if not _EARLY_INFO_LINES.match(line)))
            sys.stderr.flush()


# Modules that import jax when they load, wherever jax is installed, on every backend, only
# to fall back when it is absent (`try: import jax ... except ImportError`), for features
# this project's TensorFlow and torch processes do not use. Without it, one-off on this
# host: select_backend and `import keras` 3.00 -> 2.71 s on torch, 3.02 -> 2.57 s on
# TensorFlow (5 alternating processes each, medians); a time-to-accuracy run's peak memory
# 1,129 -> 1,060 MB and 1,444 -> 1,339 MB (benchmarks/results/.../jax-unimported-ab/).
_JAX_IMPORTERS = {
    "keras.src.callbacks.orbax_checkpoint",  # a shim on jax.monitoring for Keras' orbax callback
    "tensorflow.lite.python.util",  # jax.jit, for TFLite's conversion of JAX functions
}


class _JaxKeptFromImporters(importlib.abc.MetaPathFinder):
    """Answers `import jax` from a module in _JAX_IMPORTERS, while jax is not imported, with
    ModuleNotFoundError (the module's own fallback); every other import, of jax too, is left
    to the other finders."""

    def find_spec(self, name, path=None, target=None):
        if name != "jax" or "jax" in sys.modules:
            return None
        frame = sys._getframe(1)
        while frame is not None and frame.f_code.co_filename.startswith("<frozen importlib"):
            frame = frame.f_back  # importlib's own frames, up to the import statement's
        importer = frame.f_globals.get("__name__") if frame is not None else None
        if importer in _JAX_IMPORTERS:
            raise ModuleNotFoundError(f"jax is not imported for {importer} on this backend", name="jax")
        return None


def keep_jax_unimported(backend: str) -> None:
    """On TensorFlow and torch, import keras and TensorFlow without importing jax: the
    modules in _JAX_IMPORTERS load as where jax is not installed. Nothing else changes: jax
    stays importable, by the user or by anything that needs it. Call before either import."""
    if backend != "jax" and not any(isinstance(finder, _JaxKeptFromImporters) for finder in sys.meta_path):
        sys.meta_path.insert(0, _JaxKeptFromImporters())


@contextlib.contextmanager
def saving_without_tensorflow():
    """Keras' .keras saving or loading inside, without importing TensorFlow where it is not
    imported yet. On every backend Keras asks whether TensorFlow is installed, importing it
    when it is, only to test whether an object is a tf.TensorShape, tf.DType or
    tf.TypeSpec (keras/src/saving/serialization_lib.py); while TensorFlow was never
    imported no object can be one, so Keras' lazy module is told it is absent for the
    call: the same files, without the import's 2.5 s and ~0.5 GB on JAX and torch. Where
    TensorFlow is imported (its backend, a tf.data input), or the lazy module has no such
    flag, TensorFlow is imported quietly (import_tensorflow_quietly) and Keras asks as
    before."""
    from keras.src.utils import module_utils

    lazy = module_utils.tensorflow
    # vars(): the lazy module's getattr would import TensorFlow for a missing attribute.
    available = vars(lazy).get("_available", True)
    if "tensorflow" in sys.modules or available is True:
        import_tensorflow_quietly()
        yield
        return
    if available is False:  # not installed, or an enclosing block already said it is absent
        yield
        return
    lazy._available = False
    try:
        yield
    finally:
        lazy._available = None


def framework_flags_in_effect(backend: str) -> dict:
    """{variable: its value in this process} for the variable FRAMEWORK_FLAGS sets for
    `backend` (empty for a backend without one): what results files record."""
    if backend not in FRAMEWORK_FLAGS:
        return {}
    variable = FRAMEWORK_FLAGS[backend][2]
    return {variable: os.environ.get(variable, "")}
