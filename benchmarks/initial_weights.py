"""The CNN's seeded initial weights without importing keras.

`model.cnn.seeded_weights(network, seed)` reads the shapes off a built Keras network;
the framework baselines must not import keras, so this file lists the same shapes for
model.weights to draw from. tests/test_compare.py checks that the two agree exactly.
"""

from __future__ import annotations

import hashlib

import numpy as np

from model.weights import seeded_weight_arrays

# In Keras' order (network.weights): conv kernel HWIO, conv bias, dense kernel, dense
# bias, output kernel, output bias. 5408 = 13 * 13 * 32, the pooled feature map.
CNN_WEIGHT_SHAPES = ((3, 3, 1, 32), (32,), (5408, 128), (128,), (128, 10), (10,))


def seeded_cnn_weights(seed: int) -> list[np.ndarray]:
    """What `model.cnn.seeded_weights(build_cnn(), seed)` returns, without keras."""
    return seeded_weight_arrays(CNN_WEIGHT_SHAPES, seed)


def weights_digest(weights) -> str:
    """A short fingerprint of a list of arrays (shapes and float32 bytes), so a results
    file shows that every path of a backend started from the same numbers."""
    digest = hashlib.sha256()
    for array in weights:
        array = np.ascontiguousarray(np.asarray(array, dtype="float32"))
        digest.update(str(array.shape).encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:16]
