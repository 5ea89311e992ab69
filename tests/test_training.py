"""In-process tests of model/training.py and model/runtime.py that need no Keras backend:
the curves figure, where the backend choice comes from, and the one-way dependencies
(entry scripts -> model/ -> backends/)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from model.runtime import configured_backend
from model.training import curves_figure
from tests.helpers import REPO


@pytest.mark.parametrize("epochs", [1, 2, 4, 7, 20])
def test_curves_have_whole_epoch_ticks(epochs):
    import matplotlib.pyplot as plt

    history = [{"epoch": e, "loss": 1 / e, "accuracy": 1 - 1 / (e + 1), "val_loss": 1.1 / e,
                "val_accuracy": 1 - 1.1 / (e + 1)} for e in range(1, epochs + 1)]
    figure = curves_figure(history, "test")
    try:
        assert len(figure.axes) == 2
        for axis in figure.axes:
            low, high = axis.get_xlim()
            ticks = [tick for tick in axis.get_xticks() if low <= tick <= high]
            assert ticks, axis.get_xticks()
            assert all(float(tick).is_integer() for tick in ticks), (axis.get_ylabel(), ticks)
            assert [line.get_label() for line in axis.get_lines()] == ["train", "validation"]
            np.testing.assert_array_equal(axis.get_lines()[0].get_xdata(), range(1, epochs + 1))
    finally:
        plt.close(figure)


@pytest.fixture
def keras_home(tmp_path, monkeypatch):
    monkeypatch.delenv("KERAS_BACKEND", raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    return tmp_path


def test_backend_comes_from_keras_json_when_keras_backend_is_unset(keras_home):
    (keras_home / "keras.json").write_text(json.dumps({"backend": "torch", "floatx": "float32"}))
    assert configured_backend() == ("torch", str(keras_home / "keras.json"))


def test_keras_backend_variable_wins_over_keras_json(keras_home, monkeypatch):
    (keras_home / "keras.json").write_text(json.dumps({"backend": "torch"}))
    monkeypatch.setenv("KERAS_BACKEND", "jax")
    assert configured_backend() == ("jax", "KERAS_BACKEND")


@pytest.mark.parametrize("content", [None, "{not json", json.dumps({"floatx": "float32"})],
                         ids=["no-file", "broken", "no-backend-key"])
def test_without_a_usable_keras_json_the_default_is_tensorflow(keras_home, content):
    if content is not None:
        (keras_home / "keras.json").write_text(content)
    assert configured_backend() == ("tensorflow", "Keras' default")


def test_train_py_names_keras_json_in_an_unknown_backend_error(keras_home):
    (keras_home / "keras.json").write_text(json.dumps({"backend": "mxnet"}))
    result = subprocess.run([sys.executable, "train.py"], cwd=REPO, capture_output=True, text=True, timeout=60,
                            env={**__import__("os").environ})
    assert result.returncode == 2, result.stderr
    assert f"unknown backend 'mxnet' (from {keras_home / 'keras.json'})" in result.stderr


def _imports(path):
    """(module imported, whether at the file's top level) for each import in `path`."""
    import ast

    tree = ast.parse(path.read_text())
    top = set(map(id, tree.body))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.module, id(node) in top, [alias.name for alias in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, id(node) in top, []


def test_dependencies_point_one_way():
    """entry scripts -> model/ -> backends/ (README 'Layout'): backends/ never imports
    model/; model/ imports backends/ only at a file's top, and reaches a backend's file
    only through model/backend.py (resolved once)."""
    for path in sorted((REPO / "backends").glob("*.py")):
        assert not [name for name, _, _ in _imports(path) if name.split(".")[0] == "model"], path
    for path in sorted((REPO / "model").glob("*.py")):
        for name, at_top, names in _imports(path):
            if name.split(".")[0] != "backends":
                continue
            assert at_top, f"{path.name} imports {name} inside a function"
            assert path.name == "backend.py" or "backend_module" not in names, f"{path.name} looks up a backend file"
