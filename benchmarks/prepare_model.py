"""The model a benchmark run's predict cells time, made once per run before the rounds:

    python -m benchmarks.prepare_model OUTPUT.keras BATCH_SIZE[,BATCH_SIZE...] [OUTPUT.onnx]

The CNN with its seeded initial weights (inference speed does not depend on the weights'
values, so no training is spent on it), saved as train.py saves model.keras. Prints one
JSON line: the network's training FLOPs per image and the largest matmul of a training
step at each BATCH_SIZE (benchmarks/floor.py), which every training cell's floor uses.
With OUTPUT.onnx (on the TensorFlow backend), also `export.py --format onnx`'s export and
check of OUTPUT.keras, in this process rather than a second one: the line then holds
`onnx_difference`, or `onnx_error` saying why there is no ONNX model.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.runtime import select_backend  # noqa: E402


def main(argv: list[str]) -> int:
    select_backend()
    from benchmarks.floor import largest_matmul, training_flops_per_image
    from model.checkpoint import save_model
    from model.cnn import build_cnn, portable_network, seeded_weights
    from model.config import TrainConfig

    output, batch_sizes = Path(argv[0]), [int(value) for value in argv[1].split(",")]
    network = build_cnn("fast")
    network.set_weights(seeded_weights(network, TrainConfig.seed))
    save_model(portable_network(network), output)
    figures = {"flops_per_image": training_flops_per_image(network),
               "largest_matmul": {str(size): list(largest_matmul(network, size)) for size in batch_sizes}}
    if len(argv) > 2:
        figures.update(export_onnx(output, Path(argv[2])))
    print(json.dumps(figures))
    return 0


def export_onnx(model_path: Path, onnx_path: Path) -> dict:
    """What export.py --model MODEL_PATH --format onnx --output ONNX_PATH does (the same
    library calls), on this process's TensorFlow backend."""
    from model.checkpoint import load_model
    from model.data import load_mnist, scale_images
    from model.export import VERIFY_IMAGES, ExportError, check_format, export_verified

    try:
        check_format("onnx", onnx_path)
        (_, _), (x_test, _) = load_mnist()
        difference = export_verified(load_model(model_path), "onnx", onnx_path, scale_images(x_test[:VERIFY_IMAGES]))
    except ExportError as error:
        return {"onnx_error": f"the ONNX export failed: {error}"}
    return {"onnx_difference": difference}


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
