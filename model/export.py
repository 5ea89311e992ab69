"""Exporting a trained model with Keras' own `model.export`, then proving the artifact right.

A `.keras` file from any training backend loads under TensorFlow, so every format is
exported through TensorFlow (export.py selects it before keras is imported): ONNX via
tf2onnx, a SavedModel natively, LiteRT via TensorFlow's converter, OpenVINO via
openvino.convert_model. Each artifact is then loaded in its own runtime (onnxruntime;
TensorFlow's SavedModel loader, through keras.layers.TFSMLayer; ai-edge-litert's
interpreter; OpenVINO's CPU plugin in float32) and its probabilities on the first
VERIFY_IMAGES test images compared with the Keras model's: they must agree within
VERIFY_TOLERANCE, or the export fails and says by how much.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

# format: the backend it is exported through (see the module docstring).
EXPORT_BACKENDS = {"onnx": "tensorflow", "tf_saved_model": "tensorflow", "litert": "tensorflow", "openvino": "tensorflow"}
FORMATS = tuple(EXPORT_BACKENDS)
# The packages each format's export and verification import (all in the export extra).
FORMAT_PACKAGES = {"onnx": ("tf2onnx", "onnx", "onnxruntime"), "tf_saved_model": (), "litert": ("ai_edge_litert",),
                   "openvino": ("openvino",)}
# The file name ending Keras requires of --output, where it requires one.
FORMAT_SUFFIXES = {"litert": ".tflite", "openvino": ".xml"}
VERIFY_IMAGES = 1000
VERIFY_TOLERANCE = 1e-5
INPUT_NAME = "image"


class ExportError(Exception):
    """The export or its verification failed; the message is one line and says why."""


def check_format(format: str, output: str | os.PathLike | None = None) -> str:
    """The backend `format` is exported through; ExportError for an unknown format, a
    missing runtime, or an --output name Keras would refuse."""
    if format not in EXPORT_BACKENDS:
        raise ExportError(f"unknown format {format!r}; valid formats: {', '.join(EXPORT_BACKENDS)}")
    import importlib.util

    missing = [name for name in FORMAT_PACKAGES[format] if importlib.util.find_spec(name) is None]
    if missing:
        from model.runtime import install_command

        raise ExportError(f"format {format!r} needs {', '.join(missing)}; install them with: {install_command('export')}")
    if output is not None:
        check_output(format, output)
    return EXPORT_BACKENDS[format]


def check_output(format: str, output: str | os.PathLike) -> None:
    """ExportError unless `output` names something an export of `format` may replace: a
    new path, or an artifact of the same kind (never a folder of other things)."""
    suffix = FORMAT_SUFFIXES.get(format)
    if suffix and not str(output).endswith(suffix):
        raise ExportError(f"--output for format {format!r} must end with {suffix}, got {str(output)!r}")
    path = Path(output)
    if format == "tf_saved_model":
        if path.is_file() or (path.is_dir() and any(path.iterdir()) and not (path / "saved_model.pb").is_file()):
            raise ExportError(f"--output {str(output)!r} exists and is not a SavedModel folder; "
                              "name a new folder (it would be replaced)")
    elif path.is_dir():
        raise ExportError(f"--output {str(output)!r} is a folder; format {format!r} writes a file: name the file")


def artifact_files(format: str, path: Path) -> list[Path]:
    """The paths one artifact occupies: OpenVINO's weights sit beside its .xml."""
    return [path, path.with_suffix(".bin")] if format == "openvino" else [path]


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
    temp = output.with_name(f".{output.stem}.tmp{output.suffix}")
    for path in artifact_files(format, temp):
        _remove(path)
    try:
        export_model(model, format, temp)
        difference = verify_export(model, format, temp, images)
        for source, target in zip(artifact_files(format, temp), artifact_files(format, output)):
            _remove(target)
            os.replace(source, target)
    finally:
        for path in artifact_files(format, temp):
            _remove(path)
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
    if format == "litert":
        from ai_edge_litert.interpreter import Interpreter

        interpreter = Interpreter(model_path=str(path))
        (given,), (returned,) = interpreter.get_input_details(), interpreter.get_output_details()
        interpreter.resize_tensor_input(given["index"], images.shape)
        interpreter.allocate_tensors()
        interpreter.set_tensor(given["index"], images)
        interpreter.invoke()
        return np.asarray(interpreter.get_tensor(returned["index"]))
    if format == "openvino":
        import openvino

        # OpenVINO computes in bfloat16 on CPUs that have it unless told otherwise; a
        # served model would too, but the check is of the export, in float32.
        compiled = openvino.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        return np.asarray(compiled(images)[compiled.output(0)])
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
