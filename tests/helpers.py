"""Running the project's code in a subprocess that holds one Keras backend."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from model.config import BACKENDS  # noqa: F401  (the tests' backend parameters)
from model.runtime import install_command

REPO = Path(__file__).resolve().parents[1]
# The key under which the cross_loaded fixture holds train.py's own model.keras.
TRAIN_PY_MODEL = "train.py model.keras"


def require_backend(backend: str) -> None:
    """Skip, with the reason, when a backend's framework is not installed."""
    if not installed(backend):
        pytest.skip(f"{backend} is not installed ({install_command(backend)})")


def backend_env(backend: str, **extra) -> dict:
    # TensorFlow's log level is left to the project (backends.QUIET_DEFAULTS), so tests see what users see.
    env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONUNBUFFERED": "1"}
    env.update({key: str(value) for key, value in extra.items()})
    return env


def run_python(args, backend: str | None = None, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    env = backend_env(backend) if backend else {**os.environ}
    env.update(kwargs.pop("env", {}))
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout, **kwargs)


class StartedPython:
    """A Python subprocess started now and waited for later. Starting one per backend at
    once lets their single-threaded phases (imports, tracing, Python overhead) overlap on
    the machine's cores instead of running one after another."""

    every: list["StartedPython"] = []  # all started in this session, for cleanup at its end

    def __init__(self, args, backend: str | None, logs: Path, env=None, stdin_path: Path | None = None):
        self.args = [sys.executable, *map(str, args)]
        full_env = backend_env(backend) if backend else {**os.environ}
        full_env.update(env or {})
        logs.mkdir(parents=True, exist_ok=True)
        self.stdout_path, self.stderr_path = logs / "stdout.txt", logs / "stderr.txt"
        with open(self.stdout_path, "w") as stdout, open(self.stderr_path, "w") as stderr, \
                open(stdin_path or os.devnull, "rb") as stdin:
            self.process = subprocess.Popen(self.args, cwd=REPO, env=full_env, stdin=stdin, stdout=stdout, stderr=stderr)
        StartedPython.every.append(self)

    def wait(self, timeout: float = 600) -> subprocess.CompletedProcess:
        try:
            returncode = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise
        return subprocess.CompletedProcess(self.args, returncode, self.stdout_path.read_text(), self.stderr_path.read_text())


def start_backend_checks(backend: str, workdir: Path, checks: list[str], env=None) -> StartedPython:
    """Start tests/backend_checks.py under `backend`; collect with backend_check_results."""
    started = StartedPython([REPO / "tests" / "backend_checks.py", workdir / "results.json", workdir, *checks], backend,
                            workdir / "logs", env)
    started.results_path = workdir / "results.json"
    return started


def backend_check_results(started: StartedPython, timeout: float = 600) -> dict:
    """{check: value} of a started backend_checks.py, failing the test with the
    subprocess's stderr if it wrote nothing."""
    result = started.wait(timeout)
    if not started.results_path.exists():
        raise AssertionError(f"{' '.join(result.args[1:])} wrote nothing (rc={result.returncode}):\n{result.stderr[-4000:]}")
    return json.loads(started.results_path.read_text())


def installed(backend: str) -> bool:
    return importlib.util.find_spec(backend) is not None


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
