"""The one definition of the MNIST CNN, written only against `keras` and `keras.ops`.

Input(28,28,1) -> Conv2D(32,3,relu) -> MaxPooling2D(2) -> Flatten -> Dense(128,relu)
-> Dense(10,softmax): 693,962 parameters, the same network as the Keras 2 original.
"""

from __future__ import annotations

import keras
from keras import ops

from model.config import LAYER_SETS

INPUT_SHAPE = (28, 28, 1)
NUM_CLASSES = 10


@keras.saving.register_keras_serializable(package="mnist_cnn")
class PatchConv2D(keras.layers.Conv2D):
    """keras.layers.Conv2D (same weights, config and output) whose valid, stride-1
    convolution is computed under XLA (JAX, TensorFlow) as one matrix product of the
    image patches (im2col): the kh*kw shifted views of the input side by side, times
    the kernel reshaped to (kh*kw*channels, filters).

    Why: with one input channel, XLA:CPU's convolution and above all its kernel
    gradient are slow; measured here (conv + relu + its gradients, batch 128, the two
    forms interleaved) 18.4 -> 13.6 ms on JAX and 12.7 -> 9.4 ms on TensorFlow. On
    torch the native convolution was faster than the patch product (31.6 vs 41.8 ms)
    and is used as is, as it is for any stride, dilation, padding or group count.
    """

    def _patch_form_applies(self) -> bool:
        return (keras.backend.backend() in ("jax", "tensorflow") and self.padding == "valid"
                and tuple(self.strides) == (1, 1) and tuple(self.dilation_rate) == (1, 1)
                and self.groups == 1 and self.data_format == "channels_last")

    def convolution_op(self, inputs, kernel):
        if not self._patch_form_applies():
            return super().convolution_op(inputs, kernel)
        kernel_height, kernel_width, channels, filters = kernel.shape
        out_height = inputs.shape[1] - kernel_height + 1
        out_width = inputs.shape[2] - kernel_width + 1
        # (i, j, channel) order along the last axis: the row-major order of kernel's first three axes.
        patches = ops.concatenate(
            [inputs[:, i : i + out_height, j : j + out_width, :] for i in range(kernel_height) for j in range(kernel_width)],
            axis=-1,
        )
        return ops.matmul(patches, ops.reshape(kernel, (kernel_height * kernel_width * channels, filters)))


@keras.saving.register_keras_serializable(package="mnist_cnn")
class TiledMaxPooling2D(keras.layers.Layer):
    """2x2/stride-2 max pooling over an exactly tiled input, written so that every
    backend gets its fastest correct formulation.

    Same forward values as `keras.layers.MaxPooling2D(2)` when height and width are
    even (tested). Why it exists: the stock layer's gradient is slow under XLA:CPU,
    which lowers it to `select_and_scatter`, a scalar loop nest (about 69 of 90 ms per
    step on JAX here). Under XLA (JAX, TensorFlow) this layer takes the elementwise
    maximum of the p*p strided sub-grids, whose gradient is a cheap compare-and-mask
    (measured faster than reshape + max); on torch the native max-pool kernel is
    the fastest of the three and is used as is.
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

    def call(self, inputs):
        p = self.pool_size
        if keras.backend.backend() == "torch":
            return ops.max_pool(inputs, pool_size=p, strides=p, padding="valid", data_format="channels_last")
        pooled = None
        for row in range(p):
            for column in range(p):
                tile = inputs[:, row::p, column::p, :]
                pooled = tile if pooled is None else ops.maximum(pooled, tile)
        return pooled

    def get_config(self):
        return {**super().get_config(), "pool_size": self.pool_size}


def build_cnn(layers: str = "fast") -> keras.Model:
    """Build the CNN. `layers="stock"` uses keras.layers.Conv2D and MaxPooling2D; "fast"
    their drop-in equivalents PatchConv2D and TiledMaxPooling2D (same weights and
    outputs, faster gradients; see their docstrings)."""
    if layers == "fast":
        conv, pool = PatchConv2D, TiledMaxPooling2D
    elif layers == "stock":
        conv, pool = keras.layers.Conv2D, keras.layers.MaxPooling2D
    else:
        raise ValueError(f"Unsupported layers. Received: layers={layers!r}; valid: {', '.join(LAYER_SETS)}")
    return keras.Sequential(
        [
            keras.Input(INPUT_SHAPE, name="image"),
            conv(32, 3, activation="relu", name="conv2d"),
            pool(2, name="max_pooling2d"),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(128, activation="relu", name="dense"),
            keras.layers.Dense(NUM_CLASSES, activation="softmax", name="probabilities"),
        ],
        name="mnist_cnn",
    )


def seeded_weights(network: keras.Model, seed: int) -> list:
    """Initial weights drawn with numpy, so every backend starts from the same numbers
    (Keras' own initializers draw differently per backend); see model/weights.py."""
    from model.weights import seeded_weight_arrays

    return seeded_weight_arrays([tuple(variable.shape) for variable in network.weights], seed)
