"""The CNN, a short real training run and train.py end to end, on every backend."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from backends import FRAMEWORK_FLAGS, QUIET_DEFAULTS, framework_environment
from backends.layers import pooled_conv_windows
from tests.helpers import BACKENDS, TRAIN_PY_MODEL, arrays, check_value, require_backend, run_python

EXPECTED_LAYERS = [
    ["conv2d", [26, 26, 32], 320],
    ["max_pooling2d", [13, 13, 32], 0],
    ["flatten", [5408], 0],
    ["dense", [128], 692352],
    ["probabilities", [10], 1290],
]


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_shapes_and_parameter_counts(backend, backend_results):
    architecture = check_value(backend_results(backend), "architecture")
    for pooling in ("fast", "stock"):
        assert architecture[pooling]["layers"] == EXPECTED_LAYERS, pooling
        assert architecture[pooling]["total_params"] == 693_962, pooling
    assert architecture["seeded"] == {"weights_are_the_seeds": True, "rebuilt_kernels_random": True,
                                      "initializers": ["bias_initializer=Zeros", "kernel_initializer=GlorotUniform"]}


@pytest.mark.parametrize("backend", BACKENDS)
def test_short_training_on_real_mnist_learns(backend, backend_results):
    run = check_value(backend_results(backend), "short_training")
    assert run["steps"] == 64
    # From the same numpy-seeded weights: chance level (~2.30) before, well below after.
    assert run["test_loss_before"] > 2.0
    assert run["test_loss_after"] < 0.5 * run["test_loss_before"]
    assert run["train_loss_per_epoch"][1] < run["train_loss_per_epoch"][0]
    # 64 steps of 128 images reach about 0.9 on all 10,000 test images; 0.85 leaves margin.
    assert run["test_accuracy_after"] > 0.85


@pytest.mark.only_backends("tensorflow", "torch", reason="its training_data returns datamodule.batches_from "
                            "itself, which the check would compare with itself")
@pytest.mark.parametrize("backend", BACKENDS)
def test_fit_is_fed_the_data_modules_batches_in_order(backend, backend_results):
    fed = check_value(backend_results(backend), "training_data")
    if backend == "torch" and fed["converted_in_place"] is not None:  # None: moved to a GPU, a copy by nature
        # Fed as tensors that Keras' conversion passes through, not copied batch by batch.
        assert fed["converted_in_place"], "Keras copies every batch fit() is fed (backends/torch_backend.py)"
    # 4,450 images, batches of 100: 44 of 100 and one of 50 per epoch, for epochs 1 and 2,
    # made ahead in 3 pieces per epoch.
    assert fed["expected_batch_sizes"] == ([100] * 44 + [50]) * 2 and fed["pieces_per_epoch"] == 3
    assert fed["calls"] == {"epoch_pieces": 2, "epoch_piece": 0}  # every piece from the stream
    assert fed["batch_sizes"] == fed["expected_batch_sizes"]
    assert fed["dtypes"] == ["float32", "int32"]
    assert fed["all_equal"], "the batches fit() is fed differ from MNISTDataModule.batches_from's"


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_fit_stopped_early_leaves_no_augmentation_thread(backend, backend_results):
    # The Trainer's teardown stops it: tf.data keeps the feed's Python function (and its
    # stream) alive after fit, and a generator is closed only when collected.
    assert check_value(backend_results(backend), "augmentation_thread")["threads_left"] == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_py_dry_run_writes_model_run_json_and_curves(backend, dry_runs, cross_loaded, mnist_arrays):
    result, output = dry_runs(backend)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"backend {backend}" in result.stdout
    assert "test accuracy" in result.stdout
    run = json.loads((output / "run.json").read_text())
    for key in ("backend", "device", "versions", "config", "history", "test_accuracy", "test_loss",
                "epoch_seconds", "step_ms_median"):
        assert key in run, key
    assert run["backend"] == backend
    assert run["config"]["epochs"] == 1 and run["config"]["limit_train_batches"] == 5
    # The 5 steps in one call of Keras' step function where the backend takes several.
    assert run["steps_per_epoch"] == 5 and run["steps_per_execution"] == (1 if backend == "torch" else 5)
    assert len(run["history"]) == 1 and {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(run["history"][0])
    # train.py put the backend's framework flags in its environment before keras started.
    if backend in FRAMEWORK_FLAGS:
        _, _, variable, flags = FRAMEWORK_FLAGS[backend]
        assert set(flags) <= set(run["framework_flags"][variable].split())
    else:
        assert run["framework_flags"] == {}
    assert (output / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # model.keras loads back in safe mode (in the cross-loading process of this backend)
    # and predicts a probability distribution for each test image.
    probabilities, _ = arrays(cross_loaded(backend)[TRAIN_PY_MODEL])
    assert probabilities.shape == (10_000, 10)
    assert np.abs(probabilities.sum(axis=1) - 1).max() < 1e-5
    # run.json's test figures are model.keras' own on the 10,000 test images.
    labels = mnist_arrays[1][1]
    assert (probabilities.argmax(axis=1) == labels).mean() == pytest.approx(run["test_accuracy"], abs=1e-4)
    # The run's loss: the cross-entropy against its smoothed labels (Keras' label_smoothing).
    smoothing = run["config"]["label_smoothing"]
    targets = np.eye(10)[labels] * (1 - smoothing) + smoothing / 10
    cross_entropy = -(targets * np.log(np.clip(probabilities, 1e-7, 1 - 1e-7))).sum(axis=1).mean()
    assert cross_entropy == pytest.approx(run["test_loss"], rel=1e-3)


def test_tensorflow_run_prints_no_info_chatter(dry_runs):
    """TensorFlow's C++ INFO lines ("I0000 ... oneDNN custom operations are on", "XLA
    service ... initialized") are off by default (backends.QUIET_DEFAULTS,
    backends.import_framework_quietly); the dry run's environment (tests/helpers.py
    backend_env) leaves the level to the project, as a user's shell would."""
    require_backend("tensorflow")
    result, _ = dry_runs("tensorflow")
    assert result.returncode == 0, result.stderr[-3000:]
    chatter = [line for line in result.stderr.splitlines()
               if re.match(r"I\d{4} ", line) or "absl::InitializeLog" in line]
    assert not chatter, chatter


# The fused convolution and pooling on a shape other than this CNN's (3 input channels, a
# 5x5 kernel, 4x4 pooling), relative to the largest output: on an AVX2 host (2026-12-08)
# 5.6e-8 (JAX, eager and compiled), 1.5e-7 (TensorFlow under XLA), about one float32 ulp;
# 0.0 on the AVX-512 hosts before. A wrong window differs by the values' own size.
OTHER_SHAPE_TOLERANCE = 1e-6

JAX_AFTER_KERAS = """
import sys
from model.runtime import select_backend
select_backend()
import keras
from keras.src.callbacks import orbax_checkpoint  # the module that imported jax at load
print("jax imported with keras:", "jax" in sys.modules)
import jax
print("jax importable:", jax.numpy.add(1, 2) == 3)
"""


@pytest.mark.only_backends("tensorflow", "torch", reason="keras on JAX imports jax, its framework")
@pytest.mark.parametrize("backend", BACKENDS)
def test_keras_and_tensorflow_load_without_jax_and_leave_it_importable(backend):
    """Keras' orbax callback and TensorFlow's lite utilities import jax when they load, wherever
    it is installed (backends._JAX_IMPORTERS): after select_backend they load without it on
    TensorFlow and torch (0.3-0.45 s of a start, 69-105 MB), and jax still imports when
    asked for."""
    require_backend(backend)
    result = run_python(["-c", JAX_AFTER_KERAS], backend, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "jax imported with keras: False" in result.stdout, result.stdout
    assert "jax importable: True" in result.stdout, result.stdout


@pytest.mark.parametrize("backend", BACKENDS)
def test_fast_pooling_equals_stock_max_pooling(backend, backend_results):
    result = check_value(backend_results(backend), "fast_pooling")
    assert result["forward_shape"] == [128, 13, 13, 32]
    assert result["forward_equal"], "TiledMaxPooling2D's output differs from keras.layers.MaxPooling2D's"
    assert result["probabilities_equal"]
    print(f"pooling on {backend}: gradient max relative difference {result['gradient_max_relative_difference']:.3g}")
    assert result["gradient_max_relative_difference"] <= 1e-5
    if backend == "tensorflow":
        # Under XLA the layer is the strided maximum (no reduce-window), equal to the stock layer.
        assert result["xla_stock_reduce_window"] and not result["xla_tiled_reduce_window"]
        assert result["xla_forward_equal"]
        assert result["xla_gradient_max_relative_difference"] <= 1e-5


@pytest.mark.only_backends("torch", reason="fuse_optimizer does nothing here (Keras' update runs inside the compiled step), "
                            "so Keras' weight average would be compared with itself")
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_adam_and_weight_average_equal_keras_own(backend, backend_results):
    """backends/<backend>.fuse_optimizer: on torch Adam's update runs as torch's fused Adam
    kernel and the weight average as one _foreach_lerp_ per weight; their values must be Keras' own
    within float32 rounding (weights of magnitude up to ~4 moved by 0.3), and the optimizer
    must stay Keras' torch Adam (nothing is saved differently)."""
    run = check_value(backend_results(backend), "moving_average")
    assert run["classes"][0] == run["classes"][1]
    # Keras called each fused update once per step.
    assert run["fused_calls"] == 3
    assert run["fused_adam_calls"] == 3
    assert run["max_weight_change"] > 0.1
    assert run["max_average_vs_weights"] > 1e-2
    assert run["max_average_difference"] <= 1e-5
    assert run["max_weight_difference"] <= 1e-5


@pytest.mark.only_backends("torch", reason="fuse_optimizer does nothing here (the schedule runs inside the compiled "
                            "step), so Keras' schedule would be compared with itself")
@pytest.mark.parametrize("backend", BACKENDS)
def test_learning_rate_on_the_host_equals_keras_schedule(backend, backend_results):
    """backends/torch_backend.py fuse_optimizer: a CosineDecay's learning rate computed on
    the host from the step count must be Keras' own float32 value at every step, bit for
    bit (warm-up, decay, alpha, and past the end), so training is unchanged by it; a
    schedule Keras computes in int32, or one set on the optimizer later, stays Keras'."""
    run = check_value(backend_results(backend), "learning_rate")
    if run["count_devices"] != ["cpu"]:
        pytest.skip("the step count lives on a GPU: Keras' own schedule runs, nothing to compare")
    # The int-valued schedule, which Keras computes in int32, stays Keras'.
    assert run["replaced"] == [True, True, True, False]
    assert run["steps"] == 320 + 310 + 127 + 30 + 3
    assert run["unequal_count"] == 0, run["unequal"]


@pytest.mark.only_backends("torch", reason="fuse_loss_and_metrics does nothing here (Keras' loss and metrics run "
                            "inside the compiled step), so Keras' would be compared with itself")
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_loss_and_metrics_equal_keras_own(backend, backend_results):
    """backends/torch_backend.py fuse_loss_and_metrics: the smoothed cross-entropy, the loss
    tracker and the accuracy computed by torch ops called directly must give Keras' own
    values bit for bit (every batch's logs, the partial batch's included, the history with
    validation, the weights after 12 steps), and must really run: 12 training and 6
    validation losses, and each step's two results; with sample weights Keras' paths run;
    and train.py's Trainer must fuse the module it trains."""
    run = check_value(backend_results(backend), "fused_loss_and_metrics")
    assert run["fused_by_trainer"] == ["compute_loss", "compute_metrics"]
    assert run["batches"] == 12
    assert run["fused_calls"] == {"smoothed_crossentropy": 18, "_mean_result": 36}
    assert run["stock_calls"] == {"smoothed_crossentropy": 0, "_mean_result": 0}
    assert run["batch_logs_equal"], "a batch's loss or accuracy differs from Keras' own"
    assert run["history_equal"], run["history"]
    assert run["weights_max_difference"] == 0.0
    assert run["weighted_equal"]
    assert run["weighted_fused_calls"] == {"smoothed_crossentropy": 0, "_mean_result": 0}


@pytest.mark.parametrize("backend", BACKENDS)
def test_serving_path_predicts_what_predict_on_batch_does(backend, backend_results):
    """model.prediction.predictor, what predict.py and the benchmark's predict cells serve
    with: on torch the fused forward of the same weights, on JAX and TensorFlow Keras'
    predict_on_batch; either way predict_on_batch's probabilities exactly, at batch 1024
    and 1. A network that is not this CNN, even one whose weights fit its layers (a tanh
    convolution), is served by predict_on_batch (its path is what counts: its equality then
    compares predict_on_batch with itself)."""
    run = check_value(backend_results(backend), "serving")
    expected = "torch-fused-forward" if backend == "torch" else "keras-predict_on_batch"
    assert run["cnn"]["path"] == expected
    for name in ("tanh", "dense"):
        assert run[name]["path"] == "keras-predict_on_batch", name
    for name, found in run.items():
        assert found["equal_1024"] and found["equal_1"], name


@pytest.mark.only_backends("jax", "tensorflow", reason="Keras' torch trainer takes one step per call: the check "
                            "would compare a run with itself")
@pytest.mark.parametrize("backend", BACKENDS)
def test_several_steps_per_call_train_the_same_epochs(backend, backend_results):
    """Trainer "auto" runs several steps per call of Keras' step function (compile's
    steps_per_execution) where the backend takes them: 18 steps an epoch, at most 16 a
    call, so 9. Every epoch must still end after its own 18 steps (validation and
    checkpoint see that epoch's weights), and training must equal one step per call."""
    run = check_value(backend_results(backend), "steps_per_execution")
    assert run["steps_per_execution"] == 9
    assert run["call_ends"] == [8, 17, 8, 17]
    assert run["epoch_steps"] == run["single_epoch_steps"] == [18, 36]
    assert run["histories_equal"], "the history differs from one step per call's"
    assert run["weights_max_difference"] == 0.0


def test_pooled_conv_windows_cover_each_pooling_offset():
    """Sub-grid (r, c) of a 3x3 "valid" convolution of 28x28 inputs (26x26) is the stride-2
    convolution of rows and columns r..r+26 and c..c+26; no windows where the pooling would
    drop a row, or the size is only known when the step runs."""
    windows = pooled_conv_windows((None, 28, 28, 1), (3, 3, 1, 32), 2)
    assert windows == [(slice(row, row + 27), slice(column, column + 27)) for row in (0, 1) for column in (0, 1)]
    # A 5x3 kernel on 12x16 inputs: an 8x14 convolution, which 4x4 pools do not tile; 2x2
    # pools do, in 4x7 sub-grids: rows 2*3+5 = 11 and columns 2*6+3 = 15 from each offset.
    assert pooled_conv_windows((2, 12, 16, 3), (5, 3, 3, 4), 4) is None
    assert pooled_conv_windows((2, 12, 16, 3), (5, 3, 3, 4), 2)[3] == (slice(1, 12), slice(1, 16))
    assert pooled_conv_windows((None, None, 28, 1), (3, 3, 1, 32), 2) is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_without_layer_wrappers_equals_calling_the_network(backend, backend_results):
    """backends/layers.py forward: the layers' own calls, with the ReLU convolution and its
    pooling fused into one, give the network's probabilities exactly and its gradients
    within 1e-5 (TensorFlow and JAX: also compiled by XLA), with no Layer.__call__ on the
    way; a network whose __call__ does something (an activity regularizer's loss) and a
    float16 input still go through Keras, and a LoRA convolution is never fused."""
    run = check_value(backend_results(backend), "layer_calls")
    assert run["fused_calls"] == 1, "the convolution and pooling were not fused (backends/layers.py)"
    assert run["forward_equal"], "forward's probabilities differ from network(...)'s"
    assert max(run["gradient_relative_differences"]) <= 1e-5, run["gradient_relative_differences"]
    assert run["layer_calls_network"] >= 5
    assert run["layer_calls_forward"] == 0
    assert run["regularized_layer_calls"] >= 1 and run["regularized_losses"] == 1
    assert run["float16_layer_calls"] >= 5 and run["float16_forward_equal"], "a float16 input skipped Keras' casting"
    # CNNModule.__call__: Keras' wrapping skipped in the steps' form only where every step
    # runs the Python (eager torch); symbolic inputs, training=None and no training argument
    # (Keras takes it from an enclosing call) always go through Keras.
    assert run["calls_eagerly"] == (backend == "torch")
    assert run["module_calls"] == {"steps": 0 if backend == "torch" else 1, "training_none": 1, "no_training": 1,
                                   "symbolic": 1}
    assert run["module_output_equal"], "module(images) differs from its network's output"
    assert run["lora_calls_before_after"] == [4, 5] and run["lora_fused_after"] == 0
    assert run["lora_forward_shape"] == [4, 10]
    # Another shape (3 input channels, a 5x5 kernel, 4x4 pooling) checks the fused call's
    # windows. Its 75 taps a sum may be added in another order than the convolution's on some
    # CPUs (an AVX2 host, not an AVX-512 one: last-bit differences), where this CNN's 9 are
    # not; a wrong window would differ by the values' own size.
    assert run["other_fused_calls"] == 1
    assert run["other_forward_relative_difference"] <= OTHER_SHAPE_TOLERANCE, \
        f"a 5x5 kernel with 4x4 pooling fused wrongly: {run['other_forward_relative_difference']:.3g}"
    if backend in ("tensorflow", "jax"):
        assert run["xla_forward_equal"], "forward's probabilities differ from network(...)'s under XLA"
        assert max(run["xla_gradient_relative_differences"]) <= 1e-5, run["xla_gradient_relative_differences"]
        assert run["xla_other_forward_relative_difference"] <= OTHER_SHAPE_TOLERANCE, \
            f"a 5x5 kernel with 4x4 pooling fused wrongly under XLA: {run['xla_other_forward_relative_difference']:.3g}"
        # Compiled, the fused call is four stride-2 convolutions, one per pooling offset: on
        # TensorFlow XLA's (its HLO for the CPU), on JAX matrix products (pooled_conv) on a
        # CPU, and the full convolution elsewhere.
        # (convolutions, products), the dense layers' 2 included
        expected = (4, 2) if backend == "tensorflow" else (0, 6) if run["jax_on_cpu"] else (1, 2)
        assert (run["xla_forward_convolutions"], run["xla_forward_products"]) == expected, \
            (run["xla_forward_convolutions"], run["xla_forward_products"])
    if backend == "tensorflow":
        # Without XLA (eager, or tf.function as on AVX-512 CPUs): one convolution and MaxPool.
        assert run["graph_forward_ops"] == ["Conv2D", "MaxPool"], run["graph_forward_ops"]


@pytest.mark.only_backends("tensorflow", reason="JAX always compiles with XLA and torch runs eagerly; only "
                            "TensorFlow's choice follows the CPU")
@pytest.mark.parametrize("backend", BACKENDS)
def test_tensorflow_uses_xla_except_on_avx512_cpus(backend, backend_results):
    run = check_value(backend_results(backend), "xla_choice")
    assert run["applies"]
    assert run["has_avx512"] == {"avx512": True, "avx2": False} and run["missing_file"] is False
    assert run["jit_compile"] == {"avx512": False, "avx2": True, "gpu_on_avx512": True}
    assert run["deterministic"] is False


@pytest.mark.only_backends("jax", reason="the XLA_FLAGS convolution setting is JAX's alone")
@pytest.mark.parametrize("backend", BACKENDS)
def test_jax_convolutions_compile_to_xla_own_kernels(backend, backend_results):
    """backends.FRAMEWORK_FLAGS keeps XLA:CPU's convolutions out of YNNPACK (single-threaded
    for this CNN's); the other backends have no such flag."""
    result = check_value(backend_results(backend), "compiled_convolution")
    assert FRAMEWORK_FLAGS["jax"][3][0] in result["xla_flags"].split()
    assert result["ynnpack"] is False, "XLA compiled the convolution to YNNPACK: the XLA_FLAGS setting did not take"


@pytest.mark.only_backends("jax", reason="the pooled convolution with its own gradients is JAX's (TensorFlow "
                            "and torch use their frameworks' convolution and pooling gradients)")
@pytest.mark.parametrize("backend", BACKENDS)
def test_jax_pooled_convolution_equals_the_stock_ops(backend, backend_results):
    """backends/jax_backend.py pooled_conv: the stock convolution and max pooling's values,
    exactly for this CNN's shape and within about an ulp for another, and their inputs' and
    kernel's gradients within 1e-5, where pooling windows
    hold equal maxima too (the gradient goes to the first, as the stock pooling's does)."""
    result = check_value(backend_results(backend), "pooled_conv")
    if not result["applies"]:
        pytest.skip("pooled_conv is JAX's CPU path; JAX computes on another device here")
    this_cnn, other = result["cases"]
    assert this_cnn["shape"] == [[8, 28, 28, 1], [3, 3, 1, 32], 2], this_cnn["shape"]
    assert this_cnn["forward_equal"], "pooled_conv's values differ from the stock convolution and pooling's"
    # The other shape's 75 taps a sum: last-bit differences on some CPUs (OTHER_SHAPE_TOLERANCE).
    assert other["forward_relative_difference"] <= OTHER_SHAPE_TOLERANCE, other["forward_relative_difference"]
    for case in result["cases"]:
        assert case["tied_maxima"] > 0, "the inputs made no equal maxima: the tie rule went unchecked"
        assert max(case["gradient_relative_differences"]) <= 1e-5, case["gradient_relative_differences"]
    refusal = result["untiled_refusal"]
    assert refusal and "pool_size=2" in refusal and "(1, 13, 13, 1)" in refusal and "keras.ops.conv" in refusal, refusal


def test_framework_flags_are_appended_and_the_users_own_win():
    require_backend("jax")  # the flags are only added where jaxlib is installed
    _, _, variable, (flag,) = FRAMEWORK_FLAGS["jax"]
    name = flag.split("=", 1)[0]
    assert framework_environment("jax", {})[variable] == flag
    assert framework_environment("jax", {variable: "--xla_dump_to=/tmp/x"})[variable] == f"--xla_dump_to=/tmp/x {flag}"
    own = f"{name}=LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"
    assert framework_environment("jax", {variable: own})[variable] == own
    assert framework_environment("torch", {"A": "1"}) == {"A": "1", **QUIET_DEFAULTS}
    assert framework_environment("tensorflow", {}) == QUIET_DEFAULTS


def test_tensorflow_info_lines_are_off_unless_the_user_set_the_level():
    assert QUIET_DEFAULTS == {"TF_CPP_MIN_LOG_LEVEL": "1"}  # 1: INFO off, warnings kept
    for backend in BACKENDS:
        assert framework_environment(backend, {})["TF_CPP_MIN_LOG_LEVEL"] == "1"
        assert framework_environment(backend, {"TF_CPP_MIN_LOG_LEVEL": "0"})["TF_CPP_MIN_LOG_LEVEL"] == "0"
