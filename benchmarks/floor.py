"""What the machine itself can do, to say what fraction of it a training path reaches.

A cell measures, in its own process and framework, before and after its timing window:
sgemm GFLOP/s at the model's largest matmul shape and at 1024^3, and memory bandwidth
(a STREAM triad). It counts the model's training FLOPs per image from its layer shapes;
achieved GFLOP/s = FLOPs per image * images/s, and pct_of_floor compares that with sgemm.

Each framework is imported only inside the function that times it, so that a process
holding one backend never loads another.
"""

from __future__ import annotations

import math
import statistics
import time

import numpy as np

FRAMEWORKS = ("jax", "tensorflow", "torch", "numpy")
LARGE_SGEMM = (1024, 1024, 1024)


def matmul_flops(m: int, k: int, n: int) -> int:
    """FLOPs of an (m x k) @ (k x n) product: one multiply and one add per term."""
    return 2 * m * k * n


def _weighted_layers(model) -> list:
    """The model's layers in order, nested models flattened."""
    layers = []
    for layer in model.layers:
        layers.extend(_weighted_layers(layer) if hasattr(layer, "layers") else [layer])
    return layers


def _matmul_shape(layer) -> tuple[int, int, int] | None:
    """(positions, k, n) of a Dense or ConvND layer seen as a matmul for ONE image: a Dense
    layer multiplies each of its input's positions (1 for a flat input) by its kernel; a
    convolution is the im2col product (output positions) x (kernel window * input channels
    per group) x (filters). None for layers without weights; other weighted layers are refused."""
    import keras

    if not layer.weights:
        return None
    if not isinstance(layer, (keras.layers.Dense, keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)):
        raise ValueError(f"training_flops_per_image counts Dense and ConvND layers only. Received: layer "
                         f"{layer.name!r} of type {type(layer).__name__}; add its count to benchmarks/floor.py.")
    output_shape = tuple(layer.output.shape)
    channels_first = getattr(layer, "data_format", "channels_last") == "channels_first"
    spatial = output_shape[2:] if channels_first else output_shape[1:-1]
    kernel_shape = tuple(layer.kernel.shape)
    return math.prod(spatial), math.prod(kernel_shape[:-1]), kernel_shape[-1]


def training_flops_per_image(model) -> int:
    """Forward + backward FLOPs of one training image, from the model's layer shapes.

    Counts the matmul work of Dense and ConvND layers, 2 FLOPs per multiply-add. Forward:
    one product per layer. Backward: the weight gradient (as many FLOPs as the forward
    product) and the input gradient (as many again), except for the first weighted layer,
    whose input is the image and needs no gradient. So 3x forward minus the first layer's
    forward. Not counted: bias adds, activations, pooling, the loss and the optimizer's
    update (elementwise work, under 2% of the total for the MNIST CNN: 21,770 bias adds and
    about as many ReLUs against 4.9 M matmul FLOPs). This gives the lead's hand count of
    4,939,776 for the MNIST CNN (tests/test_floor.py writes that count out independently).
    """
    forward = [positions * k * n * 2 for positions, k, n in filter(None, map(_matmul_shape, _weighted_layers(model)))]
    if not forward:
        raise ValueError(f"Model {model.name!r} has no Dense or ConvND layer to count FLOPs of.")
    return 3 * sum(forward) - forward[0]


def largest_matmul(model, batch_size: int) -> tuple[int, int, int]:
    """(m, k, n) of the largest forward matmul of a training step at `batch_size`
    (128 x 5408 x 128 for the MNIST CNN's first Dense layer at batch 128). The backward
    products of that layer are the same FLOPs in transposed shapes."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer. Received: batch_size={batch_size!r}")
    shapes = [(batch_size * positions, k, n)
              for positions, k, n in filter(None, map(_matmul_shape, _weighted_layers(model)))]
    return max(shapes, key=lambda shape: math.prod(shape))


def _timed_rate(run_once, work: float, min_seconds: float) -> float:
    """Median over timed chunks of `work` / seconds per call of `run_once`, which must return
    only once its result is ready (it syncs the device itself). Two calls warm up first
    (compilation, allocation, thread pools); then chunks of calls are timed until
    `min_seconds` has passed and at least 3 chunks are done."""
    run_once()
    run_once()
    start = time.perf_counter()
    run_once()
    calls_per_chunk = max(1, int(min_seconds / 5 / max(time.perf_counter() - start, 1e-9)))
    rates, total = [], 0.0
    while total < min_seconds or len(rates) < 3:
        start = time.perf_counter()
        for _ in range(calls_per_chunk):
            run_once()
        elapsed = time.perf_counter() - start
        total += elapsed
        rates.append(work * calls_per_chunk / elapsed)
    return statistics.median(rates)


def _matmul_runner(framework: str, m: int, k: int, n: int):
    """A function doing one float32 (m x k) @ (k x n) product in `framework` on its default
    device, returning once the product is computed (synced), so that a clock read after it
    sees finished work. Precision is the framework's default for float32, the same the
    model's layers get (on Ampere and later GPUs JAX and TensorFlow use TF32, torch does not)."""
    rng = np.random.default_rng(0)
    a_host = rng.standard_normal((m, k), dtype=np.float32)
    b_host = rng.standard_normal((k, n), dtype=np.float32)
    if framework == "numpy":
        # numpy's matmul (BLAS) is synchronous: it returns with the product computed.
        return lambda: np.matmul(a_host, b_host)
    if framework == "jax":
        import jax
        import jax.numpy as jnp

        a, b = jax.device_put(a_host), jax.device_put(b_host)
        product = jax.jit(jnp.matmul)
        # JAX dispatches asynchronously: block on the result before the clock is read.
        return lambda: product(a, b).block_until_ready()
    if framework == "tensorflow":
        import tensorflow as tf

        a, b = tf.constant(a_host), tf.constant(b_host)
        # Eager TF may run on a GPU stream; reading the result to host waits for it.
        return lambda: tf.linalg.matmul(a, b).numpy()
    if framework == "torch":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        a, b = torch.from_numpy(a_host).to(device), torch.from_numpy(b_host).to(device)
        if device == "cuda":
            def run():
                result = torch.mm(a, b)
                # CUDA kernels run asynchronously: wait for them before reading a clock.
                torch.cuda.synchronize()
                return result
            return run
        # On CPU torch.mm is synchronous (it returns with the product computed): no sync needed.
        return lambda: torch.mm(a, b)
    raise ValueError(f"Unsupported framework. Received: framework={framework!r}; valid: {', '.join(FRAMEWORKS)}")


def sgemm_gflops(framework: str, m: int, k: int, n: int, min_seconds: float = 0.3) -> float:
    """float32 matmul GFLOP/s of `framework` at shape (m, k, n): the median over chunks timed
    with time.perf_counter after warm-up, each call synced before the clock is read."""
    if min(m, k, n) < 1:
        raise ValueError(f"Matmul dimensions must be positive. Received: m={m}, k={k}, n={n}")
    return _timed_rate(_matmul_runner(framework, m, k, n), matmul_flops(m, k, n) / 1e9, min_seconds)


def triad_gb_s(megabytes: float = 512, min_seconds: float = 0.3) -> float:
    """Memory bandwidth in GB/s from a STREAM triad a = b + s * c on float64 arrays whose
    three together take `megabytes` (512 MB: far larger than any last-level cache here).

    Bytes are counted as STREAM counts them: 3 arrays per pass (read b and c, write a).
    numpy does the triad in two ufuncs (a = s * c; a += b), which moves 5 arrays, so the
    figure is below the bus's peak: a repeatable floor for the same code on two machines,
    not the hardware's rating."""
    if megabytes <= 0:
        raise ValueError(f"megabytes must be positive. Received: megabytes={megabytes!r}")
    length = max(1, int(megabytes * 1e6 / 3 / 8))
    b = np.full(length, 1.0)
    c = np.full(length, 2.0)
    a = np.empty(length)
    scalar = 3.0

    def triad():
        np.multiply(c, scalar, out=a)
        np.add(a, b, out=a)

    return _timed_rate(triad, 3 * a.nbytes / 1e9, min_seconds)


def measure_floor(framework: str, model_shape: tuple[int, int, int], min_seconds: float = 0.3,
                  triad_megabytes: float = 512, large_sgemm: bool = True) -> dict:
    """The machine's floor as `framework` sees it now: sgemm at the model's largest matmul
    shape and (large_sgemm) at 1024^3, the triad's bandwidth, and how long measuring took.
    A light floor (--quick: small triad, no 1024^3) checks the code, not the machine."""
    start = time.perf_counter()
    floor = {
        "sgemm_gflops_model_shape": sgemm_gflops(framework, *model_shape, min_seconds=min_seconds),
        "sgemm_gflops_1024": sgemm_gflops(framework, *LARGE_SGEMM, min_seconds=min_seconds) if large_sgemm else None,
        "triad_gb_s": triad_gb_s(triad_megabytes, min_seconds=min_seconds),
    }
    floor["seconds"] = time.perf_counter() - start
    return floor


def achieved_gflops(flops_per_image: float, images_per_s: float) -> float:
    """Training GFLOP/s a path reached: FLOPs per image times images per second."""
    return flops_per_image * images_per_s / 1e9


def pct_of_floor(flops_per_image: float, images_per_s: float, floor_gflops: float) -> float:
    """Achieved GFLOP/s as a percentage of the floor's sgemm GFLOP/s."""
    if not (math.isfinite(floor_gflops) and floor_gflops > 0):
        raise ValueError(f"floor_gflops must be a positive number. Received: floor_gflops={floor_gflops!r}")
    return 100.0 * achieved_gflops(flops_per_image, images_per_s) / floor_gflops
