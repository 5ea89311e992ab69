"""What predict.py does: read images, preprocess them as MNIST, predict, report.

`collect_inputs` expands folders and `-` (standard input); `preprocess_inputs` turns each
into a 28x28 digit (model/preprocess.py) or a one-line error; `predict_digits` loads the
model and predicts the good ones in batches. Results are plain dicts, one per input,
in the order given: {"file", "digit", "probability", "top3"} or {"file", "error"}.
"""

from __future__ import annotations

import os
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from backends import KERAS_PREDICT
from model.preprocess import IMAGE_SUFFIXES, ImageError, open_image, mnist_style

STDIN = "-"
TOP_K = 3
# A contact sheet shows at most this many images (one page a person can still read).
SHEET_LIMIT = 100


@dataclass
class Input:
    """One image to predict: where it came from and what became of it."""

    file: str
    source: object  # a path, or the bytes read from standard input
    image: object = None  # the upright PIL image, once read
    digit_image: np.ndarray | None = None  # float32 (28, 28), what the model sees
    error: str | None = None
    result: dict = field(default_factory=dict)


def collect_inputs(arguments: list[str], stdin=None) -> list[Input]:
    """One Input per file named, per image file in a folder named (sorted by name), and
    for `-` the bytes of standard input. A folder with no images is itself an error."""
    inputs = []
    for argument in arguments:
        if argument == STDIN:
            stream = stdin if stdin is not None else sys.stdin.buffer
            inputs.append(Input("<stdin>", stream.read()))
            continue
        path = Path(argument)
        if path.is_dir():
            members = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not members:
                inputs.append(Input(argument, path, error=f"folder holds no images ({', '.join(IMAGE_SUFFIXES)})"))
            inputs.extend(Input(str(member), member) for member in members)
        else:
            inputs.append(Input(argument, path))
    return inputs


def preprocess_inputs(inputs: list[Input]) -> list[Input]:
    """Read and preprocess each input; a failure becomes its `error`, the rest go on."""
    for item in inputs:
        if item.error:
            continue
        try:
            item.image = open_image(item.source)
            item.digit_image = mnist_style(item.image)
        except ImageError as error:
            item.error = str(error)
    return inputs


def top_predictions(probabilities: np.ndarray, k: int = TOP_K) -> list[dict]:
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [{"digit": int(d), "probability": float(probabilities[d])} for d in order]


def predictor(model):
    """(path, predict) serving the loaded network `model`: predict(images) takes float32
    images (N, 28, 28, 1) and returns their probabilities as numpy, by the backend's
    fastest path (`BACKEND.predictor`: torch runs the project's fused forward of the same
    weights, the others Keras' `predict_on_batch`), which must give `predict_on_batch`'s
    probabilities exactly on a probe of random images, else `predict_on_batch` serves (a
    network other than this CNN's, whose weights might still fit its layers)."""
    from model.backend import BACKEND
    from model.cnn import training_network

    def fused_network():
        try:
            return training_network(model)
        except ValueError:  # weights that do not fit this CNN's layers
            return None

    path, predict = BACKEND.predictor(model, fused_network)
    if predict != model.predict_on_batch:
        probe = np.random.default_rng(0).random((8, 28, 28, 1), dtype=np.float32)
        try:
            same = np.array_equal(predict(probe), np.asarray(model.predict_on_batch(probe)))
        except Exception:  # noqa: BLE001 - a network that cannot take the probe: Keras' call says why, later
            same = False
        if not same:
            return KERAS_PREDICT, model.predict_on_batch
    return path, predict


def predict_digits(model, inputs: list[Input], batch_size: int = 256) -> list[Input]:
    """Fill each good input's `result` with the model's prediction."""
    good = [item for item in inputs if item.error is None]
    if not good:
        return inputs
    images = np.stack([item.digit_image for item in good])[..., None].astype(np.float32)
    _, predict = predictor(model)
    probabilities = np.concatenate([np.asarray(predict(images[start : start + batch_size]), dtype=np.float64)
                                    for start in range(0, len(images), batch_size)])
    for item, row in zip(good, probabilities):
        top = top_predictions(row)
        item.result = {"file": item.file, "digit": top[0]["digit"], "probability": top[0]["probability"], "top3": top}
    return inputs


def result_record(item: Input) -> dict:
    """What --json prints for one input."""
    return {"file": item.file, "error": item.error} if item.error else item.result


def result_line(item: Input) -> str:
    """What a person reads for one input."""
    if item.error:
        return f"{item.file}: {item.error}"
    top = ", ".join(f"{entry['digit']} {entry['probability']:.3f}" for entry in item.result["top3"])
    return f"{item.file}: {item.result['digit']} (probability {item.result['probability']:.3f}; top 3: {top})"


def write_contact_sheet(inputs: list[Input], path: str | os.PathLike) -> Path:
    """A PNG with, per input, the image as given, the 28x28 the model saw, and the
    prediction (or the error), so a person can see what the model saw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from model.checkpoint import atomic_write

    shown = inputs[:SHEET_LIMIT]
    columns = min(4, max(1, len(shown)))
    rows = -(-len(shown) // columns)
    figure, axes = plt.subplots(rows, 2 * columns, figsize=(3.2 * columns, 1.9 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for index, item in enumerate(shown):
        given, seen = axes[index // columns, 2 * (index % columns)], axes[index // columns, 2 * (index % columns) + 1]
        if item.image is not None:
            thumbnail = item.image.convert("RGB")
            thumbnail.thumbnail((160, 160))
            given.imshow(np.asarray(thumbnail))
        if item.digit_image is not None:
            seen.imshow(item.digit_image, cmap="gray", vmin=0, vmax=1)
        name = Path(item.file).name if item.file != "<stdin>" else item.file
        given.set_title(name if len(name) <= 22 else "…" + name[-21:], fontsize=7)
        if item.error:
            seen.set_title("error", fontsize=8, color="crimson")
            seen.text(0.5, 0.5, textwrap.fill(item.error, 26), fontsize=5, ha="center", va="center",
                      transform=seen.transAxes, color="crimson")
        else:
            seen.set_title(f"{item.result['digit']}  ({item.result['probability']:.0%})", fontsize=9)
    title = "input | what the model saw (28x28) and its prediction"
    if len(inputs) > len(shown):
        title += f"; first {len(shown)} of {len(inputs)} images"
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    atomic_write(path, lambda temp: figure.savefig(temp, dpi=100, format="png"))
    plt.close(figure)
    return Path(path)
