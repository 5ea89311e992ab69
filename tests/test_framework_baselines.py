"""The hand-written framework baselines train the same network as Keras does."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.framework import load_baseline
from tests.helpers import BACKENDS, check_value, require_backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_baseline_matches_keras_over_twenty_adam_steps(backend, backend_results):
    require_backend(backend)
    run = check_value(backend_results(backend), "framework_baseline")
    losses = run["baseline_losses"]
    print(f"{backend} baseline vs Keras after 20 steps: max abs weight difference "
          f"{run['max_weight_difference']:.3g} (training moved them up to {run['max_weight_change']:.3g}); mean loss {np.mean(losses):.6f} vs {run['keras_epoch_loss']:.6f}")
    assert run["keras_steps"] == len(losses) == 20
    assert run["max_weight_change"] > 1e-2
    assert run["max_weight_difference"] <= 1e-3
    # Keras' epoch loss is the mean of its 20 batch losses (equal batch sizes).
    assert np.mean(losses) == pytest.approx(run["keras_epoch_loss"], rel=1e-3)
    # From chance level (~2.3) the loss must fall; a baseline that did not update would not.
    assert np.mean(losses[:5]) > np.mean(losses[-5:])
    # With a moving average of the weights (Keras' Adam(use_ema=True)) both end with the
    # average in place of the weights, and the two averages agree as the weights do.
    print(f"{backend} with EMA: max abs difference {run['ema_max_weight_difference']:.3g} "
          f"(average vs plain weights {run['ema_max_average_vs_weights']:.3g})")
    assert run["ema_max_average_vs_weights"] > 1e-3
    assert run["ema_max_weight_difference"] <= 1e-4
    # With label smoothing 0.1 (the default recipe's loss) they agree as well.
    print(f"{backend} with label smoothing: max abs difference {run['smoothing_max_weight_difference']:.3g} "
          f"(vs unsmoothed weights {run['smoothing_max_vs_unsmoothed']:.3g})")
    assert run["smoothing_max_vs_unsmoothed"] > 1e-3
    assert run["smoothing_max_weight_difference"] <= 1e-4
    # Several steps per call (the benchmark's loop where Keras runs steps_per_execution): 2
    # calls of 10 end where 20 calls of 1 do, with the schedule, average and smoothing on.
    print(f"{backend} 2 calls of 10 steps vs 20 of 1: max abs difference "
          f"{run['several_steps_max_weight_difference']:.3g}, last losses {run['several_steps_losses']} "
          f"vs {run['single_steps_losses']}")
    assert run["several_steps_max_weight_change"] > 1e-3
    assert run["several_steps_max_weight_difference"] <= 1e-6
    assert run["several_steps_losses"] == pytest.approx(run["single_steps_losses"], rel=1e-6)
    if backend == "tensorflow":
        # The baseline's other compilation (XLA or not; its convolution and pooling differ),
        # through its several-steps call.
        print(f"tensorflow baseline with jit_compile={run['other_jit_compile']}: max abs difference "
              f"{run['other_jit_max_weight_difference']:.3g}")
        assert run["other_jit_max_weight_difference"] <= 1e-3


def test_unknown_backend_names_what_it_received_and_what_is_valid():
    with pytest.raises(ValueError) as error:
        load_baseline("mxnet")
    assert str(error.value) == "Unsupported backend. Received: backend='mxnet'; valid: jax, tensorflow, torch"
