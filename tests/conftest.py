"""Fixtures shared by the whole test suite."""

import json

import pytest

from model.data import load_mnist


@pytest.fixture(scope="session")
def mnist_arrays():
    """Real, verified MNIST in Keras' layout: from the user's cache, or fetched once and cached."""
    arrays = load_mnist()
    for pair in arrays:
        for array in pair:
            # Every test shares these arrays: one that edits them in place would corrupt the others.
            array.flags.writeable = False
    return arrays


# Checks that run once per backend in one subprocess (see tests/backend_checks.py).
BACKEND_CHECKS = ["architecture", "short_training", "equivalence", "checkpoint_safety", "framework_baseline", "fast_pooling"]


@pytest.fixture(scope="session")
def backend_results(tmp_path_factory):
    """backend -> {check: {"ok", "value" | "error"}}; each backend's checks run once."""
    from tests.helpers import require_backend, run_backend_checks

    cache = {}

    def results(backend: str) -> dict:
        require_backend(backend)
        if backend not in cache:
            cache[backend] = run_backend_checks(backend, tmp_path_factory.mktemp(f"checks-{backend}"), BACKEND_CHECKS)
        return cache[backend]

    return results


@pytest.fixture(scope="session")
def dry_runs(tmp_path_factory):
    """backend -> (finished `train.py --dry-run` process, its output dir); run once per
    backend and shared, as the NaN test starts from the checkpoint it leaves."""
    from tests.helpers import require_backend, run_python

    cache = {}

    def results(backend: str):
        require_backend(backend)
        if backend not in cache:
            output = tmp_path_factory.mktemp(f"dry-run-{backend}") / "run"
            cache[backend] = run_python(["train.py", "--dry-run", "--output-dir", output], backend, timeout=300), output
        return cache[backend]

    return results


@pytest.fixture(scope="session")
def cross_loaded(backend_results, dry_runs, tmp_path_factory):
    """loader -> {saver: predictions file}: one process per loader backend loads every
    backend's checkpoint, and its own dry run's model.keras, and predicts all 10,000
    test images with each."""
    from tests.helpers import BACKENDS, TRAIN_PY_MODEL, check_value, require_backend, run_backend_checks

    cache = {}

    def results(loader: str) -> dict:
        require_backend(loader)
        if loader not in cache:
            checkpoints = {}
            for saver in BACKENDS:
                require_backend(saver)
                checkpoints[saver] = check_value(backend_results(saver), "equivalence")["checkpoint"]
            dry_run, output = dry_runs(loader)
            if dry_run.returncode == 0:
                checkpoints[TRAIN_PY_MODEL] = str(output / "model.keras")
            workdir = tmp_path_factory.mktemp(f"load-{loader}")
            out = run_backend_checks(loader, workdir, ["load_checkpoints"], env={"CHECKPOINTS": json.dumps(checkpoints)})
            cache[loader] = check_value(out, "load_checkpoints")
        return cache[loader]

    return results
