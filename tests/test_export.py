"""export.py: each format exported, verified in its runtime, and bad input.

The four exports run once each (the `exports` fixture in conftest.py, shared with the
inference test); the ONNX artifact is also checked here, in onnxruntime,
against the trained model's own probabilities computed on another backend (torch).
"""

from __future__ import annotations

import numpy as np
import pytest

from model.data import scale_images
from model.export import VERIFY_IMAGES, ExportError, verify_export
from tests.conftest import EXPORTED_FORMATS as SUPPORTED
from tests.helpers import run_python


@pytest.mark.parametrize("format", SUPPORTED)
def test_export_is_verified(exports, format):
    result, output = exports[format]
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"through the tensorflow backend; verified: probabilities on {VERIFY_IMAGES:,} test images within" in result.stdout
    assert output.exists() and (format != "openvino" or output.with_suffix(".bin").is_file())
    assert not list(output.parent.glob(".*.tmp*")), "temporary artifact left behind"


def test_onnx_matches_the_model_in_onnxruntime(exports, trained_model, mnist_arrays):
    """The ONNX file, run here in onnxruntime at any batch size, gives the probabilities the
    model gave on torch, where it was trained."""
    import onnxruntime

    _, output = exports["onnx"]
    _, expected = trained_model
    (_, _), (x_test, _) = mnist_arrays
    session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    images = scale_images(x_test[:VERIFY_IMAGES])
    found = session.run(None, {name: images})[0]
    assert np.abs(found - expected[:VERIFY_IMAGES]).max() < 1e-5
    single = session.run(None, {name: images[:1]})[0]
    assert np.abs(single - expected[:1]).max() < 1e-5


def test_verification_fails_when_the_artifact_disagrees(exports, mnist_arrays):
    """verify_export's check is real: a model whose probabilities differ from the artifact's
    by more than the tolerance is reported, with the difference."""
    import onnxruntime

    _, output = exports["onnx"]
    (_, _), (x_test, _) = mnist_arrays
    images = scale_images(x_test[:100])
    session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    truth = session.run(None, {session.get_inputs()[0].name: images})[0]

    class Model:
        def __init__(self, offset):
            self.offset = offset

        def predict(self, images, **_):
            return truth + self.offset

    assert verify_export(Model(0.0), "onnx", output, images) == 0.0
    with pytest.raises(ExportError, match=r"disagrees with the Keras model: probabilities differ by up to 3e-05"):
        verify_export(Model(3e-5), "onnx", output, images)


@pytest.mark.parametrize("format, output, reason", [
    ("litert", "model.onnx", "--output for format 'litert' must end with .tflite"),
    ("openvino", "model", "--output for format 'openvino' must end with .xml"),
    ("onnx", "folder", "is a folder; format 'onnx' writes a file"),
    ("tf_saved_model", "folder", "exists and is not a SavedModel folder"),
], ids=["litert", "openvino", "onnx-over-a-folder", "saved-model-over-a-folder"])
def test_bad_output_is_one_line(format, output, reason, tmp_path):
    """Refused before anything is loaded, and nothing there is touched."""
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.txt").write_text("the user's own file")
    result = run_python(["export.py", "--format", format, "--output", tmp_path / output], timeout=120)
    assert result.returncode == 2
    assert reason in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["folder", "notes.txt"]


def test_bad_model_leaves_output_alone(tmp_path):
    output = tmp_path / "model.onnx"
    output.write_bytes(b"the previous artifact")
    result = run_python(["export.py", "--model", tmp_path / "missing.keras", "--format", "onnx", "--output", output], timeout=300)
    assert result.returncode == 1
    assert "export.py: error: checkpoint" in result.stderr and "missing.keras does not exist" in result.stderr
    assert "Traceback" not in result.stderr
    assert output.read_bytes() == b"the previous artifact"
