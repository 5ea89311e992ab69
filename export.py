"""Export a trained model for serving, and verify the artifact in its own runtime.

    python export.py --model runs/latest/model.keras --format onnx --output model.onnx
    python export.py --format tf_saved_model --output saved_model/
    python export.py --format litert --output model.tflite      # openvino: --output model.xml

Keras' own `model.export` writes the artifact; it is then loaded in its runtime and its
probabilities on 1,000 test images must match the Keras model's within 1e-5, or the
command fails and says so. Every format is exported through the TensorFlow backend
(model/export.py says why), whatever backend trained the model. A failed export or
check leaves PATH as it was.
"""

from __future__ import annotations

import argparse
import sys

from model.config import DEFAULT_MODEL
from model.export import FORMATS, VERIFY_IMAGES, VERIFY_TOLERANCE, ExportError, check_format
from model.runtime import UsageError, select_backend


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="a .keras model written by train.py")
    parser.add_argument("--format", required=True, choices=FORMATS, help="artifact format")
    parser.add_argument("--output", required=True, metavar="PATH",
                        help="where the artifact goes: a file for onnx, a folder for tf_saved_model, a .tflite file for litert, "
                             "an .xml file (and the .bin beside it) for openvino; replaced if present")
    parser.add_argument("--data", metavar="PATH",
                        help="mnist.npz or a folder of IDX files for the check; if unset: $MNIST_PATH, the cache, a download")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        backend = check_format(args.format, args.output)
        select_backend(backend)
    except (ExportError, UsageError) as error:
        print(f"export.py: error: {error}", file=sys.stderr)
        return 2

    from model.checkpoint import CheckpointError, load_model
    from model.data import MnistDataError, load_mnist, scale_images
    from model.export import export_verified

    try:
        model = load_model(args.model)
        (_, _), (x_test, _) = load_mnist(args.data)
        difference = export_verified(model, args.format, args.output, scale_images(x_test[:VERIFY_IMAGES]))
    except (CheckpointError, MnistDataError, ExportError) as error:
        print(f"export.py: error: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"export.py: error: cannot write {args.output} ({error.strerror or error})", file=sys.stderr)
        return 1
    print(f"exported {args.model} as {args.format} to {args.output} through the {backend} backend; verified: "
          f"probabilities on {VERIFY_IMAGES:,} test images within {difference:.2g} of the Keras model's "
          f"(allowed {VERIFY_TOLERANCE:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
