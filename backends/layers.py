"""The forward pass every backend file's `forward` runs: a network's layers called one by
one, without Keras' `Layer.__call__` around each, with one pair of layers computed
together by the backend's `conv_relu_pool`. Keras-only code: no framework is imported here.

Why: `Layer.__call__` wraps every call in Python (binding the call's signature, name
scopes, mask and autocast checks, the call context), which eager torch runs at every step
(XLA and tf.function run it once, when tracing); and a ReLU convolution followed by a max
pooling over exact tiles is cheaper as relu(max_pool(conv + bias)), where Keras computes
max_pool(relu(conv + bias)): max commutes with ReLU (which never decreases), so the values
are the same and the ReLU runs over a quarter of them.
"""

from __future__ import annotations

import functools
import inspect
import weakref

_LAYER_CALLS = weakref.WeakKeyDictionary()


def forward(network, images, training: bool, conv_relu_pool, takes_plain_calls: bool):
    """`network(images, training=training)`, computed by each layer's own `call` in turn
    (`layer_calls`) when `takes_plain_calls` (the backend's check that `images` is a float32
    tensor of its framework: symbolic Keras inputs and other dtypes go through Keras)."""
    calls = layer_calls(network, conv_relu_pool)
    if not calls or not takes_plain_calls:
        return network(images, training=training)
    for call, takes_training in calls:
        images = call(images, training=training) if takes_training else call(images)
    return images


def layer_calls(network, conv_relu_pool) -> list:
    """[(call, whether it takes `training`)]: each layer's own `call`, except that a ReLU
    Conv2D followed by an exact-tiling max pool is one call, `conv_relu_pool(conv,
    pool_size, inputs)`; [] for a network that needs Keras' `__call__`: not a built
    Sequential, or a layer that is not float32, makes a mask, adds losses or regularizes
    its activity. Cached per built network and its layers (a layer added, removed or
    changed, e.g. by enable_lora or quantize, makes the calls anew)."""
    key = tuple((id(layer), layer.dtype_policy.name, getattr(layer, "lora_enabled", False)) for layer in network.layers)
    cached = _LAYER_CALLS.get(network)
    if cached is not None and cached[0] == key:
        return cached[1]
    calls = _layer_calls(network, conv_relu_pool)
    if network.built:
        _LAYER_CALLS[network] = (key, calls)
    return calls


def _layer_calls(network, conv_relu_pool) -> list:
    import keras

    if not isinstance(network, keras.Sequential) or not network.built:
        return []
    calls = []
    for layer in network.layers:
        plain = (layer.built and not layer.losses and layer.activity_regularizer is None
                 and layer.dtype_policy.name == "float32"
                 and type(layer).compute_mask is keras.layers.Layer.compute_mask
                 and not isinstance(layer, keras.Model))
        if not plain:
            return []
        calls.append((layer.call, "training" in inspect.signature(layer.call).parameters))
    for index in range(len(calls) - 1):
        conv, pool_size = network.layers[index], exact_max_pool_size(network.layers[index + 1])
        if pool_size and is_plain_relu_conv(conv):
            calls[index : index + 2] = [(functools.partial(conv_relu_pool, conv, pool_size), False)]
            break
    return calls


def is_plain_relu_conv(layer) -> bool:
    """Whether `layer` is a biased 2-D ReLU convolution of NHWC inputs with unit strides
    and dilation and no padding (what the backends' `conv_relu_pool` compute)."""
    import keras

    return (type(layer) is keras.layers.Conv2D and layer.activation is keras.activations.relu and layer.use_bias
            and not layer.lora_enabled
            and layer.data_format == "channels_last" and layer.padding == "valid" and layer.groups == 1
            and tuple(layer.strides) == (1, 1) and tuple(layer.dilation_rate) == (1, 1))


def pooled_conv_windows(inputs_shape, kernel_shape, pool_size: int) -> list[tuple[slice, slice]] | None:
    """The input windows (rows, columns) whose "valid" convolutions with stride pool_size
    give the pool_size**2 strided sub-grids of the stride-1 "valid" convolution of NHWC
    inputs, sub-grid (r, c) holding its output rows r, r + p, ... and columns c, c + p, ...
    (so the max pool of the convolution is their elementwise maximum); None when the
    inputs' height or width is not known while tracing, or the output is not tiled exactly."""
    height, width = inputs_shape[1], inputs_shape[2]
    kernel_height, kernel_width = kernel_shape[0], kernel_shape[1]
    if height is None or width is None:
        return None
    rows, columns = height - kernel_height + 1, width - kernel_width + 1
    if rows % pool_size or columns % pool_size:
        return None
    row_span = pool_size * (rows // pool_size - 1) + kernel_height
    column_span = pool_size * (columns // pool_size - 1) + kernel_width
    return [(slice(row, row + row_span), slice(column, column + column_span))
            for row in range(pool_size) for column in range(pool_size)]


def exact_max_pool_size(layer) -> int | None:
    """p when `layer` is a pxp/stride-p max pooling of NHWC inputs that drops nothing
    (model.cnn.TiledMaxPooling2D says so with `exact_max_pool_size`), else None."""
    return getattr(layer, "exact_max_pool_size", None)
