"""benchmarks/floor.py: FLOP counts against hand counts, the floor's measurements, the arithmetic."""

import math

import keras
import pytest

from benchmarks import floor
from model.cnn import build_cnn

# The MNIST CNN by hand (model/cnn.py): Conv2D(32, 3x3) on 28x28x1 gives 26x26x32, each
# output a 3*3*1 window; pooling gives 13x13x32 = 5408 inputs to Dense(128), then Dense(10).
CONV_MACS = 26 * 26 * 32 * (3 * 3 * 1)  # 194,688
DENSE_MACS = 5408 * 128  # 692,224
OUTPUT_MACS = 128 * 10  # 1,280
FORWARD_FLOPS = 2 * (CONV_MACS + DENSE_MACS + OUTPUT_MACS)  # 1,776,384
# Backward: weight gradient of every layer + input gradient of all but the conv (the image
# needs none), each as many FLOPs as that layer's forward product.
BACKWARD_FLOPS = 2 * (CONV_MACS + DENSE_MACS + OUTPUT_MACS) + 2 * (DENSE_MACS + OUTPUT_MACS)


def test_training_flops_of_the_mnist_cnn_match_the_hand_count():
    assert FORWARD_FLOPS + BACKWARD_FLOPS == 4_939_776  # the lead's earlier hand count
    assert floor.training_flops_per_image(build_cnn()) == FORWARD_FLOPS + BACKWARD_FLOPS
    assert floor.training_flops_per_image(build_cnn("stock")) == FORWARD_FLOPS + BACKWARD_FLOPS


def test_training_flops_follow_strides_padding_and_a_second_convolution():
    # 16x16x3 -> Conv2D(8, 3, same, stride 2) 8x8x8 -> Conv2D(4, 1) 8x8x4 -> Flatten 256 -> Dense(5).
    network = keras.Sequential([
        keras.Input((16, 16, 3)),
        keras.layers.Conv2D(8, 3, strides=2, padding="same"),
        keras.layers.Conv2D(4, 1),
        keras.layers.Flatten(),
        keras.layers.Dense(5),
    ])
    macs = [8 * 8 * 8 * 27, 8 * 8 * 4 * 8, 256 * 5]
    assert floor.training_flops_per_image(network) == 2 * sum(macs) * 3 - 2 * macs[0]


def test_layers_it_cannot_count_are_refused_by_name():
    network = keras.Sequential([keras.Input((4,)), keras.layers.BatchNormalization(name="norm"), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="'norm' of type BatchNormalization"):
        floor.training_flops_per_image(network)


def test_largest_matmul_is_the_first_dense_layer():
    assert floor.largest_matmul(build_cnn(), 128) == (128, 5408, 128)
    # At batch 4 the first Dense layer is still the largest: 4*5408*128 > conv's 4*676 x 9 x 32.
    assert floor.largest_matmul(build_cnn(), 4) == (4, 5408, 128)
    with pytest.raises(ValueError, match="batch_size=0"):
        floor.largest_matmul(build_cnn(), 0)


def test_matmul_flops_count_a_multiply_and_an_add():
    assert floor.matmul_flops(128, 5408, 128) == 177_209_344


def test_timed_rate_divides_work_by_synced_wall_time(monkeypatch):
    # A clock that only moves when the work runs: each call takes exactly 10 ms and does 0.01
    # units of work, so the rate is 1 unit/s however busy the machine is. min_seconds=0.3
    # makes chunks of 6 calls, so a rate that forgot the calls per chunk would read 1/6.
    clock = {"now": 0.0}
    monkeypatch.setattr(floor.time, "perf_counter", lambda: clock["now"])

    def ten_milliseconds_of_work():
        clock["now"] += 0.01

    assert floor._timed_rate(ten_milliseconds_of_work, 0.01, min_seconds=0.3) == pytest.approx(1.0)


@pytest.mark.parametrize("framework", ["numpy", keras.backend.backend()])
def test_sgemm_gives_a_finite_positive_rate(framework):
    gflops = floor.sgemm_gflops(framework, 32, 48, 16, min_seconds=0.02)
    assert math.isfinite(gflops) and gflops > 0


def test_unknown_framework_is_refused_by_name():
    with pytest.raises(ValueError, match="framework='mxnet'"):
        floor.sgemm_gflops("mxnet", 8, 8, 8)


def test_triad_and_measure_floor_give_finite_positive_figures():
    figures = floor.measure_floor("numpy", (16, 32, 8), min_seconds=0.02, triad_megabytes=4)
    assert set(figures) == {"sgemm_gflops_model_shape", "sgemm_gflops_1024", "triad_gb_s", "seconds"}
    assert all(math.isfinite(value) and value > 0 for value in figures.values())


def test_pct_of_floor_by_hand():
    # 4,939,776 FLOPs per image at 10,000 images/s is 49.39776 GFLOP/s; of a 100 GFLOP/s floor, 49.4%.
    assert floor.achieved_gflops(4_939_776, 10_000) == pytest.approx(49.39776)
    assert floor.pct_of_floor(4_939_776, 10_000, 100.0) == pytest.approx(49.39776)
    assert floor.pct_of_floor(1e9, 2.0, 8.0) == pytest.approx(25.0)
    with pytest.raises(ValueError, match="floor_gflops=0"):
        floor.pct_of_floor(1e9, 2.0, 0)
