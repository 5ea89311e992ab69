"""Running the project's code in a subprocess that holds one Keras backend."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BACKENDS = ("jax", "tensorflow", "torch")
# The key under which the cross_loaded fixture holds train.py's own model.keras.
TRAIN_PY_MODEL = "train.py model.keras"


def require_backend(backend: str) -> None:
    """Skip, with the reason, when a backend's framework is not installed."""
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed (pip install -c constraints.txt '.[{backend}]')")


def backend_env(backend: str, **extra) -> dict:
    env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.update({key: str(value) for key, value in extra.items()})
    return env


def run_python(args, backend: str | None = None, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    env = backend_env(backend) if backend else {**os.environ}
    env.update(kwargs.pop("env", {}))
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def run_backend_checks(backend: str, workdir: Path, checks: list[str], timeout: float = 600, env=None) -> dict:
    """Run tests/backend_checks.py under `backend`; returns {check: value}, failing the
    test with the subprocess's traceback if a check raised."""
    out = workdir / "results.json"
    result = run_python([REPO / "tests" / "backend_checks.py", out, workdir, *checks], backend, timeout=timeout,
                        env=env or {})
    if not out.exists():
        raise AssertionError(f"backend_checks under {backend} wrote nothing (rc={result.returncode}):\n{result.stderr[-4000:]}")
    return json.loads(out.read_text())


def check_value(results: dict, name: str):
    """The value a backend check returned, or a test failure carrying its traceback."""
    entry = results[name]
    assert entry["ok"], f"check {name} raised:\n{entry['error']}"
    return entry["value"]


def arrays(path: str) -> list:
    """The arrays a backend check saved with numpy.savez, in order."""
    import numpy as np

    with np.load(path) as npz:
        return [npz[f"arr_{i}"] for i in range(len(npz.files))]
