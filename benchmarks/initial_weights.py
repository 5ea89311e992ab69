"""The CNN's seeded initial weights without importing keras.

`model.cnn.seeded_weights(network, seed)` reads the shapes off a built Keras network;
the framework baselines must not import keras, so this file lists the same shapes and
draws the same numbers. tests/test_compare.py checks that the two agree exactly.
"""

from __future__ import annotations

import hashlib

import numpy as np

# In Keras' order (network.weights): conv kernel HWIO, conv bias, dense kernel, dense
# bias, output kernel, output bias. 5408 = 13 * 13 * 32, the pooled feature map.
CNN_WEIGHT_SHAPES = ((3, 3, 1, 32), (32,), (5408, 128), (128,), (128, 10), (10,))


def seeded_cnn_weights(seed: int) -> list[np.ndarray]:
    """What `model.cnn.seeded_weights(build_cnn(), seed)` returns: glorot_uniform kernels
    (limit sqrt(6 / (fan_in + fan_out))) drawn in order from one generator, zero biases."""
    rng = np.random.default_rng(seed)
    weights = []
    for shape in CNN_WEIGHT_SHAPES:
        if len(shape) == 1:
            weights.append(np.zeros(shape, dtype="float32"))
            continue
        receptive_field = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
        fan_in, fan_out = shape[-2] * receptive_field, shape[-1] * receptive_field
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        weights.append(rng.uniform(-limit, limit, size=shape).astype("float32"))
    return weights


def weights_digest(weights) -> str:
    """A short fingerprint of a list of arrays (shapes and float32 bytes), so a results
    file shows that every path of a backend started from the same numbers."""
    digest = hashlib.sha256()
    for array in weights:
        array = np.ascontiguousarray(np.asarray(array, dtype="float32"))
        digest.update(str(array.shape).encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:16]
