"""Fixtures shared by the whole test suite."""

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

