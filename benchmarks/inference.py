"""Inference speed of a trained model, in a process that holds one Keras backend, and of
its ONNX export in onnxruntime (the peer a user would pick for serving):

    python -m benchmarks.inference --model runs/latest/model.keras [--onnx model.onnx] [--backend jax]

prints one JSON object: per runtime, per batch size (1: latency; 1024: throughput), the
raw seconds of every timed call, after `warmup` untimed calls. Statistics (medians,
percentiles, confidence intervals) are the benchmark's job, not this module's.

The Keras path is what predict.py serves with (`model.prediction.predictor`, its `path` in
the row): on JAX and TensorFlow `model.predict_on_batch`, one compiled forward pass
returning numpy, what a server calling Keras per request runs; on torch
the project's fused forward of the same weights under `torch.no_grad()`, the same
probabilities. Each call is followed by the backend's device sync before the clock is read
(a no-op on CPU, where the numpy result already waits for the device). The images are MNIST test
images, cycled, so each call sees different data.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

LATENCY_BATCH = 1
THROUGHPUT_BATCH = 1024
DEFAULT_WARMUP = {LATENCY_BATCH: 20, THROUGHPUT_BATCH: 3}
DEFAULT_CALLS = {LATENCY_BATCH: 200, THROUGHPUT_BATCH: 20}


def time_calls(predict, images: np.ndarray, batch_size: int, warmup: int, calls: int, synchronize=lambda: None) -> list[float]:
    """Seconds of each of `calls` timed calls of predict(batch), after `warmup` untimed ones."""
    count = max(1, min(8, len(images) // batch_size))  # distinct batches, cycled
    batches = [np.ascontiguousarray(np.resize(images[index * batch_size:], (batch_size, *images.shape[1:])))
               for index in range(count)]
    for index in range(warmup):
        predict(batches[index % len(batches)])
    synchronize()
    seconds = []
    for index in range(calls):
        started = time.perf_counter()
        predict(batches[index % len(batches)])
        synchronize()  # the device has finished before the clock is read
        seconds.append(time.perf_counter() - started)
    return seconds


def measure(predict, images, warmup: dict, calls: dict, synchronize=lambda: None) -> dict:
    return {str(batch_size): {"batch_size": batch_size, "warmup_calls": warmup[batch_size],
                              "seconds": time_calls(predict, images, batch_size, warmup[batch_size], calls[batch_size], synchronize)}
            for batch_size in (LATENCY_BATCH, THROUGHPUT_BATCH)}


def keras_inference(model_path, images: np.ndarray, warmup=DEFAULT_WARMUP, calls=DEFAULT_CALLS) -> dict:
    """Per batch size, the seconds of each call serving the .keras model as predict.py
    does (model.prediction.predictor), in the backend this process holds."""
    import keras

    from model.backend import BACKEND
    from model.checkpoint import load_model
    from model.prediction import predictor
    from model.runtime import describe_runtime

    model = load_model(model_path)
    path, predict = predictor(model)
    results = measure(predict, images, warmup, calls, BACKEND.synchronize)
    runtime = describe_runtime()
    return {"runtime": keras.backend.backend(), "path": path, "device": runtime["device"],
            "versions": runtime["versions"], "batches": results}


def onnx_inference(onnx_path, images: np.ndarray, warmup=DEFAULT_WARMUP, calls=DEFAULT_CALLS) -> dict:
    """The same for an ONNX file in onnxruntime's CPU provider (default session options)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    results = measure(lambda batch: session.run(None, {name: batch}), images, warmup, calls)
    return {"runtime": "onnxruntime", "path": "onnxruntime-cpu", "device": "cpu",
            "versions": {"onnxruntime": onnxruntime.__version__}, "batches": results}


def summarize_row(row: dict) -> dict:
    """A benchmark cell's figures from one row: batch-1 latency (median, p99, ms) and
    batch-1024 throughput (images / total seconds of the timed calls), plus the raw calls."""
    latency = np.asarray(row["batches"][str(LATENCY_BATCH)]["seconds"]) * 1000.0
    throughput = row["batches"][str(THROUGHPUT_BATCH)]["seconds"]
    return {
        "runtime_path": row["path"], "device_name": row["device"], "runtime_versions": row["versions"],
        "latency_ms_median": float(np.median(latency)), "latency_ms_p99": float(np.percentile(latency, 99)),
        "throughput_images_per_s": THROUGHPUT_BATCH * len(throughput) / float(np.sum(throughput)),
        "latency_calls": int(latency.size), "throughput_calls": len(throughput),
        "latency_ms": [round(float(value), 4) for value in latency],
        "throughput_s": [round(float(value), 5) for value in throughput],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a .keras model written by train.py")
    parser.add_argument("--onnx", help="its ONNX export (export.py --format onnx), timed in onnxruntime too")
    parser.add_argument("--backend", help="Keras backend (default: $KERAS_BACKEND, else keras.json, else tensorflow)")
    parser.add_argument("--calls", type=int, nargs=2, default=[DEFAULT_CALLS[1], DEFAULT_CALLS[1024]], metavar=("LATENCY", "THROUGHPUT"),
                        help="timed calls at batch 1 and at batch 1024 (default: %(default)s)")
    parser.add_argument("--warmup", type=int, nargs=2, default=[DEFAULT_WARMUP[1], DEFAULT_WARMUP[1024]], metavar=("LATENCY", "THROUGHPUT"),
                        help="untimed calls first, at batch 1 and at batch 1024 (default: %(default)s)")
    args = parser.parse_args(argv)
    if min(args.calls) < 1 or min(args.warmup) < 0:
        parser.error(f"--calls must be positive and --warmup not negative, got {args.calls} and {args.warmup}")

    from model.runtime import UsageError, select_backend

    try:
        select_backend(args.backend)
    except UsageError as error:
        parser.exit(2, f"inference: error: {error}\n")
    from model.checkpoint import CheckpointError
    from model.data import load_mnist, scale_images

    warmup = dict(zip((LATENCY_BATCH, THROUGHPUT_BATCH), args.warmup))
    calls = dict(zip((LATENCY_BATCH, THROUGHPUT_BATCH), args.calls))
    (_, _), (x_test, _) = load_mnist()
    images = scale_images(x_test)
    try:
        rows = [keras_inference(args.model, images, warmup, calls)]
    except CheckpointError as error:
        parser.exit(1, f"inference: error: {error}\n")
    if args.onnx:
        try:
            rows.append(onnx_inference(args.onnx, images, warmup, calls))
        except Exception as error:  # onnxruntime raises its own types for a bad file
            parser.exit(1, f"inference: error: {args.onnx} could not be run in onnxruntime ({' '.join(str(error).split())[:300]})\n")
    print(json.dumps({"model": str(args.model), "onnx": args.onnx, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
