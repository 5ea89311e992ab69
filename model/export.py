"""Exporting a trained model with Keras' own `model.export`, then proving the artifact right.

A `.keras` file from any training backend loads under TensorFlow, so every format is
exported through TensorFlow (export.py selects it before keras is imported): ONNX via
tf2onnx, a SavedModel natively. Each artifact is then loaded in its own runtime
(onnxruntime; TensorFlow's SavedModel loader, through keras.layers.TFSMLayer) and its probabilities on the first
VERIFY_IMAGES test images compared with the Keras model's: they must agree within
VERIFY_TOLERANCE, or the export fails and says by how much.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

# format: the backend it is exported through (see the module docstring).
EXPORT_BACKENDS = {"onnx": "tensorflow", "tf_saved_model": "tensorflow"}
# Formats Keras can write but this project does not yet verify, with what would be needed.
UNSUPPORTED_FORMATS = {
    "litert": "its runtime (ai-edge-litert) is not in the export extra yet",
    "openvino": "its runtime (openvino) is not in the export extra yet",
}
FORMATS = (*EXPORT_BACKENDS, *UNSUPPORTED_FORMATS)
# The packages each format's export and verification import, and where they come from.
FORMAT_PACKAGES = {"onnx": ("tf2onnx", "onnx", "onnxruntime"), "tf_saved_model": ()}
VERIFY_IMAGES = 1000
VERIFY_TOLERANCE = 1e-5
INPUT_NAME = "image"


class ExportError(Exception):
    """The export or its verification failed; the message is one line and says why."""


def check_format(format: str) -> str:
    """The backend `format` is exported through; ExportError for one this project lacks."""
    if format in UNSUPPORTED_FORMATS:
        raise ExportError(f"format {format!r} is not supported by this project yet: {UNSUPPORTED_FORMATS[format]}; "
                          f"supported: {', '.join(EXPORT_BACKENDS)}")
    if format not in EXPORT_BACKENDS:
        raise ExportError(f"unknown format {format!r}; valid formats: {', '.join(EXPORT_BACKENDS)}")
    import importlib.util

    missing = [name for name in FORMAT_PACKAGES[format] if importlib.util.find_spec(name) is None]
    if missing:
        raise ExportError(f"format {format!r} needs {', '.join(missing)}; install them with: "
                          "pip install -c constraints.txt '.[export]'")
    return EXPORT_BACKENDS[format]


def export_model(model, format: str, output: str | os.PathLike) -> Path:
    """`model.export` to `output`. A model loaded from a .keras file has never been
    called, which `export` needs; an explicit input signature (any batch size) stands in
    for that call."""
    import keras

    signature = [keras.InputSpec(shape=(None, *model.input_shape[1:]), dtype="float32", name=INPUT_NAME)]
    try:
        model.export(str(output), format=format, input_signature=signature, verbose=False)
    except Exception as error:
        message = " ".join(str(error).split())[:300]
        raise ExportError(f"Keras could not export the model as {format} ({type(error).__name__}: {message})") from None
    return Path(output)


def export_verified(model, format: str, output: str | os.PathLike, images: np.ndarray) -> float:
    """Export next to `output`, verify (see verify_export), and only then move the
    artifact to `output`, replacing what was there: a failed export or check leaves
    `output` as it was. Returns the largest probability difference found."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    temp = output.with_name(f".{output.name}.tmp{output.suffix}")
    _remove(temp)
    try:
        export_model(model, format, temp)
        difference = verify_export(model, format, temp, images)
        _remove(output)
        os.replace(temp, output)
    finally:
        _remove(temp)
    return difference


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def artifact_predictions(format: str, path: str | os.PathLike, images: np.ndarray) -> np.ndarray:
    """Probabilities from the artifact, run in its own runtime (not through Keras)."""
    if format == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return np.asarray(session.run(None, {session.get_inputs()[0].name: images})[0])
    if format == "tf_saved_model":
        import keras

        # TFSMLayer: TensorFlow's SavedModel loader (tf.saved_model.load) behind a layer;
        # none of the model's Keras code runs.
        layer = keras.layers.TFSMLayer(str(path), call_endpoint="serve")
        outputs = layer(images)
        if isinstance(outputs, dict):
            (outputs,) = outputs.values()
        return np.asarray(keras.ops.convert_to_numpy(outputs))
    raise ExportError(f"no runtime to verify format {format!r}")


def verify_export(model, format: str, path: str | os.PathLike, images: np.ndarray,
                  tolerance: float = VERIFY_TOLERANCE) -> float:
    """The largest difference between the artifact's and the Keras model's probabilities
    on `images`; ExportError when it exceeds `tolerance`."""
    expected = np.asarray(model.predict(images, batch_size=256, verbose=0), dtype=np.float32)
    try:
        found = artifact_predictions(format, path, images)
    except ExportError:
        raise
    except Exception as error:
        message = " ".join(str(error).split())[:300]
        raise ExportError(f"{path} could not be run in its runtime ({type(error).__name__}: {message})") from None
    if found.shape != expected.shape:
        raise ExportError(f"{path} returns shape {found.shape} for {len(images)} images; the model returns {expected.shape}")
    difference = float(np.max(np.abs(found.astype(np.float64) - expected)))
    if not difference <= tolerance:
        raise ExportError(f"{path} disagrees with the Keras model: probabilities differ by up to {difference:.3g} "
                          f"on {len(images)} test images (allowed {tolerance:g})")
    return difference
