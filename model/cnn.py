"""The one definition of the MNIST CNN, written against `keras`; the one layer with a
per-backend kernel (TiledMaxPooling2D) takes it from backends/ (model/backend.py).

Input(28,28,1) -> Conv2D(32,3,relu) -> MaxPooling2D(2) -> Flatten -> Dense(128,relu)
-> Dense(10,softmax): 693,962 parameters, the same network as the Keras 2 original.
"""

from __future__ import annotations

import keras

from model.backend import BACKEND
from model.config import POOLINGS

INPUT_SHAPE = (28, 28, 1)
NUM_CLASSES = 10


@keras.saving.register_keras_serializable(package="mnist_cnn")
class TiledMaxPooling2D(keras.layers.Layer):
    """pxp/stride-p max pooling over an exactly tiled NHWC input, computed by each
    backend's fastest correct kernel (`max_pool` in backends/<backend>_backend.py).

    Same forward values as `keras.layers.MaxPooling2D(p)` when height and width are
    divisible by p, gradients within 1e-5 (tested). Why it exists, per backend: the
    `max_pool` docstrings in backends/. The layer holds no weights and saves and loads
    on every backend.
    """

    def __init__(self, pool_size: int = 2, **kwargs):
        super().__init__(**kwargs)
        self.pool_size = int(pool_size)

    def compute_output_shape(self, input_shape):
        batch, height, width, channels = input_shape
        p = self.pool_size
        return (batch, None if height is None else height // p, None if width is None else width // p, channels)

    def build(self, input_shape):
        _, height, width, _ = input_shape
        p = self.pool_size
        if height is not None and height % p or width is not None and width % p:
            raise ValueError(
                f"TiledMaxPooling2D needs height and width divisible by pool_size={p}. "
                f"Received: input_shape={tuple(input_shape)}; use keras.layers.MaxPooling2D instead."
            )

    @property
    def exact_max_pool_size(self) -> int:
        """What a backend's forward may fuse with the ReLU convolution before it
        (backends/layers.py): a pxp/stride-p max pooling that drops no row or column."""
        return self.pool_size

    def call(self, inputs):
        return BACKEND.max_pool(inputs, self.pool_size)

    def get_config(self):
        return {**super().get_config(), "pool_size": self.pool_size}


def build_cnn(pooling: str = "fast", seed: int | None = None) -> keras.Model:
    """Build the CNN. `pooling="stock"` uses keras.layers.MaxPooling2D; "fast" the
    numerically identical TiledMaxPooling2D (see its docstring). With `seed`, the initial
    weights are seeded_weights(network, seed) (drawn with numpy: the same numbers on every
    backend) and Keras' random initializers never run (on JAX each of their draws compiles
    a program: about 1 s per network); the layers' configs keep Keras' initializers."""
    network = _network(pooling, placeholders=seed is not None)
    if seed is not None:
        network.set_weights(seeded_weights(network, seed))
    return network


def _network(pooling: str, placeholders: bool = False) -> keras.Model:
    """The CNN; with `placeholders`, its variables start at zero (Keras' Zeros, no random
    draw) for weights set right after, and the layers get their own initializers back."""
    if pooling == "fast":
        pool = TiledMaxPooling2D(2, name="max_pooling2d")
    elif pooling == "stock":
        pool = keras.layers.MaxPooling2D(2, name="max_pooling2d")
    else:
        raise ValueError(f"Unsupported pooling. Received: pooling={pooling!r}; valid: {', '.join(POOLINGS)}")
    layers = [
        keras.layers.Conv2D(32, 3, activation="relu", name="conv2d"),
        pool,
        keras.layers.Flatten(name="flatten"),
        keras.layers.Dense(128, activation="relu", name="dense"),
        keras.layers.Dense(NUM_CLASSES, activation="softmax", name="probabilities"),
    ]
    if not placeholders:
        return keras.Sequential([keras.Input(INPUT_SHAPE, name="image"), *layers], name="mnist_cnn")
    weighted = [layer for layer in layers if hasattr(layer, "kernel_initializer")]
    own = [(layer.kernel_initializer, layer.bias_initializer) for layer in weighted]
    for layer in weighted:
        layer.kernel_initializer = layer.bias_initializer = keras.initializers.Zeros()
    network = keras.Sequential([keras.Input(INPUT_SHAPE, name="image"), *layers], name="mnist_cnn")
    for layer, (kernel_initializer, bias_initializer) in zip(weighted, own):
        layer.kernel_initializer, layer.bias_initializer = kernel_initializer, bias_initializer
    return network


def portable_network(network: keras.Model) -> keras.Model:
    """The network as a run delivers it (`model.keras`, `best.keras`): the same weights in
    stock Keras layers only, keras.layers.MaxPooling2D in place of TiledMaxPooling2D (which
    holds no weights and computes the same values), so the file loads with nothing but
    Keras and a backend installed: `keras.saving.load_model(path)`."""
    return _with_pooling(network, "stock")


def training_network(network: keras.Model) -> keras.Model:
    """The inverse of portable_network: a loaded network with its weights in the project's
    fast TiledMaxPooling2D layer, for training it further at full speed."""
    return _with_pooling(network, "fast")


def _with_pooling(network: keras.Model, pooling: str) -> keras.Model:
    rebuilt = _network(pooling, placeholders=True)
    rebuilt.set_weights(network.get_weights())
    return rebuilt


def seeded_weights(network: keras.Model, seed: int) -> list:
    """Initial weights drawn with numpy, so every backend starts from the same numbers
    (Keras' own initializers draw differently per backend); see model/weights.py."""
    from model.weights import seeded_weight_arrays

    return seeded_weight_arrays([tuple(variable.shape) for variable in network.weights], seed)
