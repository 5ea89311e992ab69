"""train.py --target-accuracy: training stops after the first epoch whose test accuracy
reaches the target, and says so."""

from __future__ import annotations

import json

import pytest

from tests.helpers import require_backend, run_python
from tests.test_cli import assert_one_line_error


@pytest.mark.slow
def test_train_stops_at_the_target_accuracy_and_says_so(tmp_path):
    require_backend("torch")
    output = tmp_path / "run"
    # Any network beats 5% on ten balanced classes: the first epoch's check reaches it.
    result = run_python(["train.py", "--epochs", "3", "--limit-train-batches", "4", "--target-accuracy", "0.05",
                         "--output-dir", output], "torch", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "reached the target 0.05 after epoch 1; stopping training there (--target-accuracy)" in result.stdout
    run = json.loads((output / "run.json").read_text())
    assert [entry["epoch"] for entry in run["history"]] == [1]
    assert run["config"]["target_accuracy"] == 0.05 and run["config"]["epochs"] == 3
    assert (output / "model.keras").exists()


@pytest.mark.parametrize("value", ["1.5", "0", "abc"])
def test_bad_target_accuracy_is_a_one_line_error(value):
    result = run_python(["train.py", "--target-accuracy", value], timeout=60)
    assert_one_line_error(result, 2, "--target-accuracy", "between 0 and 1", value)
