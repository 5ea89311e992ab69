"""benchmarks/inference.py: the timing loop, and one short run of its command line."""

from __future__ import annotations

import json

import numpy as np

from benchmarks.inference import LATENCY_BATCH, THROUGHPUT_BATCH, time_calls
from tests.helpers import run_python


def test_time_calls_warms_up_and_syncs_before_each_clock_read():
    events = []
    images = np.arange(10, dtype=np.float32).reshape(10, 1)
    seconds = time_calls(lambda batch: events.append(("call", float(batch[0, 0]), len(batch))), images, 3, warmup=2,
                         calls=4, synchronize=lambda: events.append(("sync",)))
    assert len(seconds) == 4 and all(value > 0 for value in seconds)
    # Two untimed calls, a sync, then every timed call followed by a sync.
    assert [event[0] for event in events] == ["call", "call", "sync"] + ["call", "sync"] * 4
    # Batches of the asked size, cycling over different images.
    assert {event[2] for event in events if event[0] == "call"} == {3}
    assert [event[1] for event in events if event[0] == "call"] == [0.0, 3.0] + [0.0, 3.0, 6.0, 0.0]


def test_inference_command_line(trained_model, exports):
    model, _ = trained_model
    _, onnx_file = exports["onnx"]
    result = run_python(["-m", "benchmarks.inference", "--model", model, "--onnx", onnx_file, "--calls", "5", "2",
                         "--warmup", "1", "1"], "torch", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(result.stdout)["rows"]
    assert [row["runtime"] for row in rows] == ["torch", "onnxruntime"]
    for row in rows:
        batches = row["batches"]
        assert set(batches) == {str(LATENCY_BATCH), str(THROUGHPUT_BATCH)}
        assert len(batches["1"]["seconds"]) == 5 and len(batches["1024"]["seconds"]) == 2
        # A batch of 1,024 images takes longer than one image: the calls really ran.
        assert np.median(batches["1024"]["seconds"]) > np.median(batches["1"]["seconds"]) > 0
