"""The model a run delivers opens in a plain Keras 3 install, without this project's code."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from model.data import scale_images
from tests.helpers import BACKENDS, TRAIN_PY_MODEL, arrays

# Run with `python -I` from an empty folder: no project folder on sys.path, no user site,
# no PYTHONPATH. The virtualenv still holds this project as an editable install, so the
# child also refuses, loudly, any import of the project's packages.
PLAIN_KERAS_LOAD = r"""
import json, sys
PROJECT = {"model", "backends", "benchmarks", "tests"}

class RefuseProjectImports:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in PROJECT:
            raise ImportError(f"the plain-Keras user imported this project's {name!r}")

sys.meta_path.insert(0, RefuseProjectImports())
import keras
import numpy as np

images = np.load(sys.argv[1])
report = {}
for index, path in enumerate(sys.argv[2:]):
    model = keras.saving.load_model(path, safe_mode=True)
    np.save(f"probabilities_{index}.npy", model.predict(images, batch_size=1000, verbose=0))
    report[path] = sorted({type(layer).__module__.split(".")[0] for layer in model.layers})
print(json.dumps({"backend": keras.backend.backend(), "layer_packages": report}))
"""


def load_in_plain_keras(backend: str, paths: list, images: np.ndarray, folder) -> tuple[dict, list]:
    folder.mkdir()
    np.save(folder / "images.npy", images)
    env = {"PATH": os.environ["PATH"], "HOME": str(folder), "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "2"}
    child = subprocess.run([sys.executable, "-I", "-c", PLAIN_KERAS_LOAD, "images.npy", *map(str, paths)],
                           cwd=folder, env=env, capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    report = json.loads(child.stdout.strip().splitlines()[-1])
    return report, [np.load(folder / f"probabilities_{index}.npy") for index in range(len(paths))]


@pytest.mark.parametrize("backend", BACKENDS)
def test_trained_model_loads_in_plain_keras_with_the_projects_predictions(backend, dry_runs, cross_loaded, mnist_arrays,
                                                                         tmp_path):
    result, output = dry_runs(backend)
    assert result.returncode == 0, result.stderr[-3000:]
    model_file, best_file = output / "model.keras", output / "checkpoints" / "best.keras"
    report, (plain, plain_best) = load_in_plain_keras(backend, [model_file, best_file],
                                                      scale_images(mnist_arrays[1][0]), tmp_path / "plain")
    assert report["backend"] == backend
    assert report["layer_packages"] == {str(model_file): ["keras"], str(best_file): ["keras"]}
    # Inside the project, the same file back in the fast pooling layer (what further
    # training would use) predicts the same probabilities.
    _, in_project = arrays(cross_loaded(backend)[TRAIN_PY_MODEL])
    difference = float(np.abs(plain - in_project).max())
    print(f"{backend}: plain Keras vs project, max probability difference {difference:.3g}")
    assert difference <= 1e-6
    accuracy = float((plain.argmax(axis=1) == mnist_arrays[1][1]).mean())
    assert accuracy == pytest.approx(json.loads((output / "run.json").read_text())["test_accuracy"], abs=1e-4)
    assert plain_best.shape == (10_000, 10) and np.abs(plain_best.sum(axis=1) - 1).max() < 1e-5
