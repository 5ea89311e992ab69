"""The three backends compute the same thing, from one set of numpy-seeded weights."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from tests.helpers import BACKENDS, arrays, check_value

PAIRS = list(itertools.combinations(BACKENDS, 2))
PAIR_IDS = [f"{a}-{b}" for a, b in PAIRS]


@pytest.fixture
def dumps(backend_results):
    return lambda backend: check_value(backend_results(backend), "equivalence")


@pytest.mark.parametrize("first, second", PAIRS, ids=PAIR_IDS)
def test_logits_agree(first, second, dumps):
    (a,), (b,) = arrays(dumps(first)["logits"]), arrays(dumps(second)["logits"])
    assert a.shape == (256, 10)
    difference = float(np.abs(a - b).max())
    print(f"logits {first}-{second}: max abs difference {difference:.3g}")
    assert difference <= 1e-5


@pytest.mark.parametrize("first, second", PAIRS, ids=PAIR_IDS)
def test_batch_loss_and_gradients_agree(first, second, dumps):
    loss_a, loss_b = dumps(first)["loss"], dumps(second)["loss"]
    assert abs(loss_a - loss_b) <= 1e-5 * abs(loss_a), (loss_a, loss_b)
    gradients_a, gradients_b = arrays(dumps(first)["gradients"]), arrays(dumps(second)["gradients"])
    assert [g.shape for g in gradients_a] == [g.shape for g in gradients_b]
    worst = 0.0
    for g_a, g_b in zip(gradients_a, gradients_b):
        scale = float(np.abs(g_a).max())
        assert scale > 0
        relative = float(np.abs(g_a - g_b).max()) / scale
        worst = max(worst, relative)
        assert relative <= 1e-4, (g_a.shape, relative)
    print(f"gradients {first}-{second}: loss rel diff {abs(loss_a - loss_b) / abs(loss_a):.3g}, "
          f"worst max|ga-gb|/max|ga| {worst:.3g}")


@pytest.mark.parametrize("first, second", PAIRS, ids=PAIR_IDS)
def test_twenty_adam_steps_agree(first, second, dumps):
    assert dumps(first)["steps_keras"] == dumps(second)["steps_keras"] == 20
    weights_a, weights_b = arrays(dumps(first)["weights_keras"]), arrays(dumps(second)["weights_keras"])
    difference = max(float(np.abs(a - b).max()) for a, b in zip(weights_a, weights_b))
    print(f"20 Adam steps {first}-{second}: max abs weight difference {difference:.3g}")
    assert difference <= 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_native_step_matches_keras_step(backend, dumps):
    result = dumps(backend)
    assert result["steps_native"] == result["steps_keras"] == 20
    # Keras' step never enters backends/; the native run does (once per trace on XLA).
    assert result["native_step_calls_keras"] == 0 and result["native_step_calls_native"] >= 1
    keras_step, native_step = arrays(result["weights_keras"]), arrays(result["weights_native"])
    difference = max(float(np.abs(a - b).max()) for a, b in zip(keras_step, native_step))
    print(f"native vs keras step on {backend}: max abs weight difference {difference:.3g}")
    assert difference <= 1e-4


@pytest.mark.parametrize("saver, loader", list(itertools.product(BACKENDS, BACKENDS)),
                         ids=[f"{s}-to-{l}" for s, l in itertools.product(BACKENDS, BACKENDS)])
def test_checkpoint_loads_across_backends(saver, loader, backend_results, cross_loaded):
    (expected,) = arrays(check_value(backend_results(saver), "equivalence")["probabilities"])
    (loaded,) = arrays(cross_loaded(loader)[saver])
    assert loaded.shape == expected.shape == (10_000, 10)
    assert np.array_equal(loaded.argmax(1), expected.argmax(1))
    difference = float(np.abs(loaded - expected).max())
    print(f"checkpoint {saver} -> {loader}: max abs probability difference {difference:.3g}")
    assert difference <= 1e-5
