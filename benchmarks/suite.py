"""A whole benchmark run: prepare the predict model, run the rounds, write one results
JSON, its Markdown and chart.

`run_suite(cells, mode, ...)` prepares once what the cells share (benchmarks/
prepare_model.py: the seeded CNN as model.keras and its ONNX export via export.py;
the network's FLOPs per training image and largest matmul), runs the rounds
(benchmarks/rounds.py), summarizes every cell from its rounds (benchmarks/summary.py),
writes `<output_dir>/<UTC time>-<commit>.json` atomically, then draws the report from
that file alone (benchmarks/report.py), so they always match it.
"""

from __future__ import annotations

import importlib.util
import json
import secrets
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.cells import REPO, Cell, cell_environment, cell_identity, empty_result
from benchmarks.initial_weights import CNN_WEIGHT_SHAPES
from benchmarks.machine import commit_info, describe_machine, package_versions, steal_counters, steal_pct
from benchmarks.measure import ONNX_RUNTIME, PATHS, PREDICT, TIME_TO_ACCURACY, no_gpu_reason
from benchmarks.report import load_runs, write_report
from benchmarks.rounds import ANCHOR_PATH, run_rounds
from benchmarks.summary import summarize_cells
from model.config import TrainConfig

# full: 5 rounds; per training cell 10 warm-up steps then a 60-step window; time to 99%
# test accuracy on train.py's default and fast recipes (model/config.py RECIPES), once per
# backend and recipe; predict cells 200 calls at batch 1 and 20 at batch 1024, every
# round. quick: a check that every cell works, not a measurement, in under 3 minutes on
# 2 cores (each cell's process start, imports and compilation take most of its 5-15 s):
# the same cells once, short windows, a light floor (model-shape sgemm, 64 MB triad),
# time to 50% test accuracy (default recipe only) on the first 2,000 test images with 50
# batches per epoch; --rounds R repeats keras-fit and its baseline R times (the other
# cells run once). Time-to-accuracy cells skip Keras' validation pass: evaluation is left
# out of the time (as DAWNBench does); the per-epoch test check is timed apart. A
# keras-fit cell on N > 1 devices runs as many rounds as the other paths.
MODES = {
    "full": {"rounds": 5, "warmup_steps": 10, "window_steps": 60, "time_to_accuracy_rounds": 1, "predict_rounds": None,
             "time_to_accuracy_recipes": ["default", "fast"],
             "other_path_rounds": None,
             "target_accuracy": 0.99, "limit_train_batches": None, "test_images": None, "validate": False,
             "predict_warmup": {"1": 20, "1024": 3}, "predict_calls": {"1": 200, "1024": 20},
             "floor": {"min_seconds": 0.3, "triad_megabytes": 512, "large_sgemm": True},
             "whole_epoch_data": True, "timeout_s": 300, "time_to_accuracy_timeout_s": 1800},
    "quick": {"rounds": 1, "warmup_steps": 3, "window_steps": 10, "time_to_accuracy_rounds": 1, "predict_rounds": 1,
              "time_to_accuracy_recipes": ["default"],
              "other_path_rounds": 1,
              "target_accuracy": 0.5, "limit_train_batches": 50, "test_images": 2000, "validate": False,
              "predict_warmup": {"1": 3, "1024": 1}, "predict_calls": {"1": 20, "1024": 2},
              "floor": {"min_seconds": 0.05, "triad_megabytes": 64, "large_sgemm": False},
              "whole_epoch_data": False, "timeout_s": 180, "time_to_accuracy_timeout_s": 300},
}
DEFAULT_RESULTS_DIR = REPO / "benchmarks" / "results"
# Tried in this order for the one process that builds the predict model (TensorFlow alone
# when there are ONNX cells: it exports the model too, as export.py does through TensorFlow).
PREPARE_BACKENDS = ("torch", "jax", "tensorflow")
ONNX_EXPORT_BACKEND = "tensorflow"


def run_settings(mode: str, cells: list[Cell], overrides: dict) -> dict:
    settings = {key: value for key, value in MODES[mode].items()}
    settings.update({key: value for key, value in overrides.items() if value is not None})
    defaults = TrainConfig()
    settings.update(
        mode=mode,
        batch_sizes=sorted({cell.batch_size for cell in cells if cell.path in PATHS}),
        backends=list(dict.fromkeys(cell.backend for cell in cells)),
        devices=list(dict.fromkeys(cell.device for cell in cells)),
        device_counts=sorted({cell.device_count for cell in cells if cell.path in PATHS}),
        paths=list(dict.fromkeys(cell.path for cell in cells)),
        time_to_accuracy_recipes=list(dict.fromkeys(cell.recipe for cell in cells if cell.path == TIME_TO_ACCURACY)),
        train_config={key: value for key, value in defaults.to_dict().items()
                      if key not in ("batch_size", "limit_train_batches", "dry_run", "output_dir", "resume")},
        step_timing="one window of warmup_steps + window_steps full batches inside one prepared epoch; "
                    "the backend's synchronize before every clock read (benchmarks/window.py)",
    )
    return settings


def run_command(command: list, env: dict, timeout_s: float) -> tuple[bool, str]:
    """(succeeded, stdout or the last line of the error)."""
    try:
        result = subprocess.run([str(part) for part in command], cwd=REPO, env=env, capture_output=True, text=True,
                                timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout_s:g} s"
    if result.returncode != 0:
        lines = [line for line in (result.stderr or result.stdout).splitlines() if line.strip()]
        return False, (lines[-1] if lines else f"exit code {result.returncode}")
    return True, result.stdout


def prepare_model(folder: Path, batch_sizes: list[int], stream, onnx: bool) -> dict:
    """model.keras (seeded weights), its FLOPs and largest matmul, and model.onnx; what
    could not be made is None, with the reason under `*_error`."""
    started = time.perf_counter()
    prepared = {"model": None, "onnx": None, "flops_per_image": None, "largest_matmul": {}}
    exporter = onnx and importlib.util.find_spec(ONNX_EXPORT_BACKEND) is not None
    candidates = (ONNX_EXPORT_BACKEND,) if exporter else PREPARE_BACKENDS
    backend = next((name for name in candidates if importlib.util.find_spec(name)), None)
    if backend is None:
        prepared["model_error"] = "no Keras backend installed"
        return prepared
    model, export = folder / "model.keras", folder / "model.onnx"
    ok, output = run_command([sys.executable, "-m", "benchmarks.prepare_model", model, ",".join(map(str, batch_sizes)),
                              *([export] if exporter else [])],
                             cell_environment(Cell(backend, "cpu", PREDICT, 1)), 600)
    if not ok:
        prepared["model_error"] = f"preparing the model on {backend} failed: {output}"
        return prepared
    prepared.update(json.loads(output.strip().splitlines()[-1]), model=str(model), prepared_on=backend)
    if onnx and not exporter:
        prepared["onnx_error"] = (f"the ONNX export goes through {ONNX_EXPORT_BACKEND} (model/export.py), which is "
                                  f"not installed; install it with: pip install -c constraints.txt '.[export]'")
    elif onnx and "onnx_error" not in prepared:
        prepared["onnx"] = str(export)
    prepared["seconds"] = round(time.perf_counter() - started, 1)
    stream.write(f"prepared the predict model on {backend} in {prepared['seconds']:.0f} s"
                 f"{'; ' + prepared['onnx_error'] if prepared.get('onnx_error') else ''}\n")
    return prepared


def model_shape(prepared: dict, batch_size: int) -> list[int]:
    """The largest matmul of a training step, for the floor: from the Keras model when it
    was prepared, else the dense layer's (batch, 5408, 128), which the keras-free weight
    shapes give."""
    return prepared["largest_matmul"].get(str(batch_size)) or [batch_size, *CNN_WEIGHT_SHAPES[2]]


def rounds_for(cell: Cell, settings: dict) -> int:
    if cell.path == TIME_TO_ACCURACY:
        return settings["time_to_accuracy_rounds"]
    if cell.path == PREDICT:
        return settings["predict_rounds"] or settings["rounds"]
    if cell.path in PATHS and (cell.path not in (ANCHOR_PATH, "framework") or cell.device_count > 1):
        return settings["other_path_rounds"] or settings["rounds"]
    return settings["rounds"]


def cell_spec(cell: Cell, settings: dict, prepared: dict) -> dict:
    """What the cell's process measures."""
    if cell.path == TIME_TO_ACCURACY:
        return {key: settings[key] for key in ("target_accuracy", "limit_train_batches", "test_images", "validate")}
    if cell.path == PREDICT:
        return {"model": prepared["model"], "onnx": prepared["onnx"], "warmup": settings["predict_warmup"],
                "calls": settings["predict_calls"]}
    return {"warmup_steps": settings["warmup_steps"], "window_steps": settings["window_steps"],
            "floor": settings["floor"], "whole_epoch_data": settings["whole_epoch_data"],
            "model_shape": model_shape(prepared, cell.batch_size)}


def unpreparable(cell: Cell, prepared: dict, no_gpu: str | None = None) -> str | None:
    """Why a cell cannot run: a GPU cell on a machine without one (`no_gpu`, decided once
    here instead of in a process per cell), a predict cell whose model or export is
    missing; else None."""
    if cell.device == "gpu" and no_gpu:
        return no_gpu
    if cell.path != PREDICT:
        return None
    if prepared["model"] is None:
        return prepared.get("model_error") or "no model prepared"
    return prepared.get("onnx_error") if cell.backend == ONNX_RUNTIME else None


def results_stem(output_dir: Path, when: datetime, commit: dict) -> Path:
    short = commit.get("short") or "nocommit"
    return output_dir / f"{when.strftime('%Y%m%dT%H%M%SZ')}-{short}{'-dirty' if commit.get('dirty') else ''}"


def run_suite(cells: list[Cell], mode: str = "full", output_dir: str | Path | None = None, stream=None,
              **overrides) -> tuple[Path, str]:
    """Run `cells` (overrides: rounds, order_seed, timeout_s, target_accuracy...); returns
    the results JSON's path and the Markdown report."""
    from model.checkpoint import write_json
    from model.rundir import check_writable  # before minutes of rounds

    stream = stream or sys.stderr
    settings = run_settings(mode, cells, overrides)
    settings.setdefault("order_seed", secrets.randbelow(2**31))
    machine, commit, versions = describe_machine(), commit_info(), package_versions()
    when = datetime.now(timezone.utc)
    output_dir = check_writable(Path(output_dir) if output_dir else DEFAULT_RESULTS_DIR / machine["slug"])
    stem = results_stem(output_dir, when, commit)
    stream.write(f"{len(cells)} cells x {settings['rounds']} rounds ({mode} mode, order seed {settings['order_seed']}) "
                 f"on {machine['slug']} at commit {commit.get('short')}{' (dirty)' if commit.get('dirty') else ''}; "
                 f"results go to {output_dir}\n")
    started, steal_before = time.perf_counter(), steal_counters()
    with tempfile.TemporaryDirectory(prefix="benchmark-model-") as folder:
        needs_model = any(cell.path != "framework" for cell in cells)
        prepared = (prepare_model(Path(folder), settings["batch_sizes"] or [TrainConfig.batch_size], stream,
                                  onnx=any(cell.backend == ONNX_RUNTIME for cell in cells))
                    if needs_model else {"model": None, "onnx": None, "flops_per_image": None, "largest_matmul": {}})
        no_gpu = no_gpu_reason() if any(cell.device == "gpu" for cell in cells) else None
        blocked = {cell: unpreparable(cell, prepared, no_gpu) for cell in cells}
        runnable = [cell for cell in cells if not blocked[cell]]
        if len(runnable) < len(cells):
            stream.write(f"{len(cells) - len(runnable)} cells not started: "
                         f"{'; '.join(dict.fromkeys(reason for reason in blocked.values() if reason))}\n")
        results = run_rounds(
            runnable, order_seed=settings["order_seed"], stream=stream,
            rounds_for=lambda cell: rounds_for(cell, settings),
            spec_for=lambda cell: cell_spec(cell, settings, prepared),
            timeout_s=lambda cell: settings["time_to_accuracy_timeout_s" if cell.path == TIME_TO_ACCURACY else "timeout_s"])
    machine["steal_pct"] = steal_pct(steal_before, steal_counters())
    settings["wall_s"] = round(time.perf_counter() - started, 1)
    settings["model"] = {key: value for key, value in prepared.items() if key not in ("model", "onnx")}
    rows = []
    for cell in cells:
        rounds = results.get(cell) or [{**empty_result(cell, "skipped", blocked[cell]), "round": 0}]
        for result in rounds:
            if cell.path in PATHS:
                result["flops_per_image"] = prepared["flops_per_image"]
        rows.append({"machine": machine["slug"], **cell_identity(cell), "rounds": rounds})
    run = {"benchmark": "mnist-cnn-backends", "edition": 2, "machine": machine, "commit": commit,
           "datetime": when.isoformat(timespec="seconds").replace("+00:00", "Z"), "versions": versions,
           "settings": settings, "cells": rows}
    json_path = stem.with_suffix(".json")
    run["cells"] = summarize_cells([{**row, "rounds": [{**r, "source": json_path.name} for r in row["rounds"]]}
                                    for row in rows])
    json_path = write_json(json_path, run)
    report, markdown, chart = write_report(load_runs([json_path]), stem)
    stream.write(f"{len(cells)} cells in {settings['wall_s']:.0f} s; wrote {json_path}, {markdown.name}, {chart.name}\n")
    return json_path, report
