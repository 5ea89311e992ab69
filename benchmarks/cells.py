"""The benchmark matrix, and running each cell of it in a process of its own.

A framework reads its device settings once, when it is imported, and a process holds
one Keras backend for its life; so every cell is a fresh `python -m benchmarks.measure`
whose environment (KERAS_BACKEND, JAX_PLATFORMS, CUDA_VISIBLE_DEVICES) is fixed before
it starts. Nothing here imports a framework.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from backends import framework_environment
from benchmarks.measure import DATA_PARALLEL_PATH, DEVICES, ONNX_RUNTIME, PATHS, PREDICT, PROGRESS, TIME_TO_ACCURACY
from model.config import BACKENDS, TrainConfig
from model.devices import JAX_CPU_DEVICES, prepare_environment

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Cell:
    backend: str
    device: str
    path: str
    batch_size: int
    # Devices the cell trains on, data-parallel through the backend's engine (model/devices.py);
    # only keras-fit cells have more than one.
    device_count: int = 1
    # The train.py recipe (model/config.py RECIPES) a time-to-accuracy cell trains; None
    # for the other kinds, which time steps or inference, not a recipe.
    recipe: str | None = None

    @property
    def label(self) -> str:
        devices = f" on {self.device_count} devices" if self.device_count > 1 else ""
        recipe = f" ({self.recipe} recipe)" if self.recipe else ""
        return f"{self.backend} {self.device} {self.path} b{self.batch_size}{devices}{recipe}"


def build_matrix(backends=BACKENDS, devices=DEVICES, paths=PATHS, batch_sizes=(128,), device_counts=(1,)) -> list[Cell]:
    """Training cells grouped by batch size and device, then backend, then path: every
    path on one device (when 1 is among `device_counts`), and keras-fit (when among
    `paths`) on each larger device count."""
    return [Cell(backend, device, path, batch_size, count)
            for batch_size, device, backend, path in itertools.product(batch_sizes, devices, backends, paths)
            for count in device_counts if count == 1 or path == DATA_PARALLEL_PATH]


def time_to_accuracy_cells(backends=BACKENDS, devices=DEVICES, recipes=(TrainConfig.recipe,)) -> list[Cell]:
    """One cell per device, backend and recipe (a name in model/config.py RECIPES), at the
    recipe's own batch size: the one its process trains with (TrainConfig.with_recipe),
    so that the cell's label and results row say what ran."""
    # An unknown name fails here, before any cell starts.
    batch_sizes = {name: TrainConfig().with_recipe(name).batch_size for name in recipes}
    return [Cell(backend, device, TIME_TO_ACCURACY, batch_sizes[recipe], recipe=recipe)
            for device in devices for backend in backends for recipe in recipes]


def predict_cells(backends=BACKENDS, devices=DEVICES, onnx: bool = True) -> list[Cell]:
    """Per backend and device, plus the ONNX export in onnxruntime on the CPU. Batch sizes
    1 and 1024 are both timed in the cell; its batch_size field says 1."""
    cells = [Cell(backend, device, PREDICT, 1) for device in devices for backend in backends]
    return cells + ([Cell(ONNX_RUNTIME, "cpu", PREDICT, 1)] if onnx and "cpu" in devices else [])


def cell_environment(cell: Cell, base: dict | None = None) -> dict:
    """The environment a cell's process starts with: the backend, the one device kind its
    framework may see, and (JAX) how many CPU devices it simulates."""
    env = framework_environment(cell.backend, os.environ if base is None else base)
    # What train.py --devices N sets before keras is imported; the cell decides, not the caller's shell.
    env.pop(JAX_CPU_DEVICES, None)
    env.update({"PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2"})
    if cell.backend in BACKENDS:
        env["KERAS_BACKEND"] = cell.backend
    if cell.device == "cpu":
        # An empty CUDA_VISIBLE_DEVICES hides every GPU from TensorFlow and torch.
        env.update({"JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": ""})
    else:
        env["JAX_PLATFORMS"] = "cuda"
        if env.get("CUDA_VISIBLE_DEVICES") == "":
            del env["CUDA_VISIBLE_DEVICES"]
    if cell.device_count > 1:
        prepare_environment(TrainConfig(accelerator=cell.device, devices=cell.device_count), cell.backend, env)
    return env


def cell_identity(cell: Cell) -> dict:
    """The fields that name a cell in a results file; `recipe` only where the cell has one."""
    identity = {"backend": cell.backend, "device": cell.device, "path": cell.path, "batch_size": cell.batch_size,
                "device_count": cell.device_count}
    return {**identity, "recipe": cell.recipe} if cell.recipe else identity


def empty_result(cell: Cell, status: str, reason: str | None) -> dict:
    return {**cell_identity(cell), "status": status, "reason": reason}


def load_average() -> float | None:
    """The 1-minute load average: other work on the machine skews every timing, so each
    cell records it before and after it ran."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def children_cpu_s() -> float:
    """CPU seconds of this process's finished children: a cell's own CPU time, which says
    more than its wall time about how long it takes on a machine with nothing else on it."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


def run_cell(cell: Cell, spec: dict, timeout_s: float, show=lambda line: None, python: str = sys.executable) -> dict:
    """Run `cell` in its own process with `spec` (what to measure) and return its result
    for this round. A crash, a timeout or a missing framework becomes a result with status
    failed/skipped and a one-line reason; `show` gets the process's progress lines."""
    spec = {**spec, **cell_identity(cell), "launched_at": time.time()}
    with tempfile.TemporaryDirectory(prefix="benchmark-cell-") as folder:
        spec_path, result_path = Path(folder) / "spec.json", Path(folder) / "result.json"
        spec_path.write_text(json.dumps(spec))
        process = subprocess.Popen(
            [python, "-m", "benchmarks.measure", str(spec_path), str(result_path)],
            cwd=REPO, env=cell_environment(cell), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, errors="replace", start_new_session=True,  # its own group, so a timeout ends all of it
        )
        other_lines = collections.deque(maxlen=40)
        last_progress = []

        def read_output():
            for line in process.stdout:
                line = line.rstrip()
                if line.startswith(PROGRESS):
                    last_progress[:] = [line[len(PROGRESS):]]
                    show(last_progress[0])
                elif line.strip():
                    other_lines.append(line)

        reader = threading.Thread(target=read_output, daemon=True)
        reader.start()
        started, load_before, cpu_before = time.perf_counter(), load_average(), children_cpu_s()
        try:
            returncode = process.wait(timeout=timeout_s)
        except BaseException as error:  # the time limit, or Ctrl-C: end the whole cell
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            if not isinstance(error, subprocess.TimeoutExpired):
                raise
            reader.join(timeout=5)
            where = f" (last progress: {last_progress[0]})" if last_progress else ""
            result = empty_result(cell, "failed", f"timed out after {timeout_s:g} s{where}")
            result.update(process_wall_s=time.perf_counter() - started, load_average=[load_before, load_average()],
                          output_tail=list(other_lines)[-20:])
            return result
        reader.join(timeout=5)
        if result_path.exists():
            measured = json.loads(result_path.read_text())
        else:
            last_line = other_lines[-1].strip() if other_lines else "no output"
            measured = {"status": "failed", "reason": f"{last_line} ({describe_exit(returncode)})"}
    result = {**empty_result(cell, measured.get("status", "failed"), measured.get("reason")), **measured}
    result.update(process_wall_s=time.perf_counter() - started, load_average=[load_before, load_average()],
                  process_cpu_s=children_cpu_s() - cpu_before)
    if result["status"] == "failed":
        result["output_tail"] = list(other_lines)[-20:]  # the traceback, for whoever reads the JSON
    return result


def summarize(result: dict) -> str:
    """One line for the progress log."""
    if result["status"] != "ok":
        return f"{result['status']}: {result['reason']}"
    if "step_ms_mean" in result:
        figure = f"{result['step_ms_mean']:.1f} ms/step"
    elif "latency_ms_median" in result:
        figure = f"{result['latency_ms_median']:.2f} ms at batch 1, {result['throughput_images_per_s']:,.0f} images/s"
    else:
        reached = result.get("seconds_to_target")
        figure = f"{reached:.0f} s to {result['target_accuracy']}" if reached else f"target not reached ({result['test_accuracy']:.4f})"
    return f"{figure} (ok, {result['process_wall_s']:.0f} s)"
