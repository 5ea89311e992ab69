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
