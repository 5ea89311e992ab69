"""Predict the digit in photos or scans with a trained model, on any Keras backend.

    python predict.py photo.jpg scans/ [--model runs/latest/model.keras] [--json] [--sheet sheet.png]
    cat digit.png | python predict.py -

Each image is prepared as MNIST prepared its digits (model/preprocess.py). A file that
cannot be read or holds no digit gets a one-line error; the others are still predicted,
and the exit code is 1 if any failed. The work happens in model/prediction.py.
"""

from __future__ import annotations

import argparse
import json
import sys

from model.config import BACKENDS, DEFAULT_MODEL
from model.runtime import UsageError, select_backend


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("images", nargs="+", metavar="IMAGE",
                        help="image files (PNG, JPEG, BMP, GIF, ...), folders of them, or - for standard input")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="a .keras model written by train.py")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object per image: file, digit, probability, top3 (or file, error)")
    parser.add_argument("--sheet", metavar="PATH", help="write a contact sheet PNG: each input, what the model saw, its prediction")
    parser.add_argument("--backend", help="Keras backend, one of " + ", ".join(BACKENDS)
                        + " (default: $KERAS_BACKEND, else keras.json, else tensorflow)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.images.count("-") > 1:
        print("predict.py: error: '-' (standard input) may be given once", file=sys.stderr)
        return 2
    try:
        select_backend(args.backend)
    except UsageError as error:
        print(f"predict.py: error: {error}", file=sys.stderr)
        return 2

    from model.prediction import collect_inputs, preprocess_inputs, result_line, result_record

    # Images first: reading them needs no keras, and their errors are reported whatever the model.
    inputs = preprocess_inputs(collect_inputs(args.images))
    if any(item.error is None for item in inputs):
        from model.checkpoint import CheckpointError, load_model
        from model.prediction import predict_digits

        try:
            model = load_model(args.model)
        except CheckpointError as error:
            print(f"predict.py: error: {error}", file=sys.stderr)
            return 1
        predict_digits(model, inputs)
    for item in inputs:
        if args.json:
            print(json.dumps(result_record(item)), flush=True)
        elif item.error:
            print(f"predict.py: error: {result_line(item)}", file=sys.stderr, flush=True)
        else:
            print(result_line(item), flush=True)
    if args.sheet:
        from model.prediction import write_contact_sheet

        try:
            write_contact_sheet(inputs, args.sheet)
        except OSError as error:
            print(f"predict.py: error: cannot write contact sheet {args.sheet} ({error.strerror or error})", file=sys.stderr)
            return 1
    failed = sum(item.error is not None for item in inputs)
    if failed:
        print(f"predict.py: {failed} of {len(inputs)} images failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
