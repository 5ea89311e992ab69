"""benchmarks/compare.py: the quick matrix end to end, the reports drawn from its JSON,
and its answers to bad input."""

from __future__ import annotations

import itertools
import json
import math
from datetime import datetime

import numpy as np
import pytest

from backends import FRAMEWORK_FLAGS
from benchmarks.cells import CELL_FIELDS, Cell, build_matrix, cell_environment
from benchmarks.initial_weights import CNN_WEIGHT_SHAPES, seeded_cnn_weights
from benchmarks.measure import DEVICES, PATHS, timed_step_seconds
from benchmarks.report import add_ratios, draw_chart, markdown_table, merge_cells
from tests.helpers import BACKENDS, REPO, installed, require_backend, run_python
from tests.test_cli import assert_one_line_error

COMPARE = REPO / "benchmarks" / "compare.py"
MATRIX = set(itertools.product(BACKENDS, DEVICES, PATHS))


# ----------------------------------------------------------------------------- the quick run (CI)


@pytest.mark.slow
def test_quick_run_has_every_cell_of_the_matrix(quick_run):
    _, _, run = quick_run
    cells = run["cells"]
    assert {(c["backend"], c["device"], c["path"]) for c in cells} == MATRIX
    assert len(cells) == len(MATRIX)
    for cell in cells:
        assert set(CELL_FIELDS) <= set(cell), sorted(set(CELL_FIELDS) - set(cell))
        assert cell["batch_size"] == 128
        assert cell["status"] in ("ok", "skipped", "failed")
        if cell["status"] != "ok":
            assert cell["reason"], cell


@pytest.mark.slow
def test_quick_run_ok_cells_have_ordered_positive_numbers(quick_run):
    _, _, run = quick_run
    ok = [cell for cell in run["cells"] if cell["status"] == "ok"]
    assert ok
    for cell in ok:
        name = f"{cell['backend']} {cell['device']} {cell['path']}"
        for field in ("first_step_s", "step_ms_p10", "step_ms_median", "step_ms_p90", "samples_per_s",
                      "test_accuracy", "peak_rss_mb", "ratio_to_fastest"):
            value = cell[field]
            assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (name, field, value)
        assert cell["step_ms_p10"] <= cell["step_ms_median"] <= cell["step_ms_p90"], name
        assert cell["timed_steps"] >= 20, name
        assert cell["samples_per_s"] == pytest.approx(128 / (cell["step_ms_median"] / 1000)), name
        assert cell["ratio_to_fastest"] >= 1.0, name
        # Better than chance (10%) after 20-odd steps, even through a slow weight average.
        assert 0.15 < cell["test_accuracy"] <= 1.0, name
        assert cell["epoch_s"] is None  # quick mode trains one epoch; epoch_s needs a second
        if cell["device"] == "cpu":
            assert cell["peak_device_mb"] is None, name
        if cell["path"] == "framework":
            assert cell["ratio_to_framework"] == pytest.approx(1.0)
            assert cell["keras_imported_by_path"] is False, (name, cell["keras_modules_added"])
    assert min(cell["ratio_to_fastest"] for cell in ok if cell["device"] == "cpu") == pytest.approx(1.0)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_quick_run_cpu_cells_ok_where_installed(backend, quick_run):
    _, _, run = quick_run
    cells = [c for c in run["cells"] if c["backend"] == backend and c["device"] == "cpu"]
    assert len(cells) == len(PATHS)
    for cell in cells:
        if installed(backend):
            assert cell["status"] == "ok", cell["reason"]
        else:
            assert cell["status"] == "skipped" and "pip install" in cell["reason"]
    if installed(backend):
        # Every path started from the same numbers, drawn by numpy, and trained on the
        # same batches (the same data-module settings).
        assert len({cell["initial_weights"] for cell in cells}) == 1
        assert len({json.dumps(cell["data"], sort_keys=True) for cell in cells}) == 1
        assert {cell["data"]["limit_train_batches"] for cell in cells} == {run["settings"]["limit_train_batches"]}
        framework = next(cell for cell in cells if cell["path"] == "framework")
        for cell in cells:
            assert cell["ratio_to_framework"] == pytest.approx(cell["step_ms_median"] / framework["step_ms_median"])
        # The same Adam: learning rate and cosine schedule; an EMA the baseline lacks is flagged in the table.
        assert len({(cell["optimizer"]["lr"], cell["optimizer"]["decay_steps"]) for cell in cells}) == 1


@pytest.mark.slow
def test_quick_run_gpu_cells_ran_on_a_gpu_or_say_why_not(quick_run):
    _, _, run = quick_run
    for cell in (c for c in run["cells"] if c["device"] == "gpu"):
        if cell["status"] == "ok":
            assert any(word in cell["device_name"].lower() for word in ("gpu", "cuda", "rocm")), cell["device_name"]
            assert cell["peak_device_mb"] > 0
        else:
            assert cell["status"] == "skipped" and cell["reason"], cell
    if not run["machine"]["gpus"]:
        assert all(c["status"] == "skipped" for c in run["cells"] if c["device"] == "gpu")


@pytest.mark.slow
def test_quick_run_records_machine_commit_versions_settings(quick_run):
    _, path, run = quick_run
    machine = run["machine"]
    assert machine["cores"] >= 1 and machine["ram_gb"] > 0 and machine["cpu"]
    assert machine["slug"].startswith(("cpu-", "gpu-")) and " " not in machine["slug"]
    assert len(run["commit"]["id"]) == 40 and isinstance(run["commit"]["dirty"], bool)
    assert run["commit"]["short"] in path.name
    assert datetime.fromisoformat(run["datetime"].replace("Z", "+00:00")).utcoffset().total_seconds() == 0
    for name in ("python", "keras", "jax", "jaxlib", "tensorflow", "torch", "numpy", "cuda"):
        assert name in run["versions"]
    settings = run["settings"]
    assert settings["mode"] == "quick" and settings["batch_sizes"] == [128] and settings["epochs"] == 1
    assert settings["train_config"]["lr"] > 0 and "seed" in settings["train_config"]
    for backend in BACKENDS:
        if installed(backend):
            assert "tf32_allowed" in settings["tf32"][backend]["cpu"]
    # Every cell, framework baselines included, ran with the backend's framework flags.
    _, _, variable, flags = FRAMEWORK_FLAGS["jax"]
    for cell in run["cells"]:
        if cell["status"] == "ok":
            expected = {variable} if cell["backend"] == "jax" else set()
            assert set(cell["framework_flags"]) == expected, cell
            if expected:
                assert set(flags) <= set(cell["framework_flags"][variable].split())
    if any(c["status"] == "ok" and c["backend"] == "jax" for c in run["cells"]):
        assert f"jax `{variable}=" in path.with_suffix(".md").read_text()


@pytest.mark.slow
def test_quick_run_writes_table_and_chart_beside_the_json(quick_run):
    result, path, _ = quick_run
    markdown, chart = path.with_suffix(".md"), path.with_suffix(".png")
    for written in (path, markdown, chart):
        assert written.stat().st_mode & 0o044, f"{written.name} is readable by its owner only"
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and chart.stat().st_size > 10_000
    table = markdown.read_text()
    assert table.strip() in result.stdout
    assert path.name in table
    assert table.count("| jax |") + table.count("| tensorflow |") + table.count("| torch |") == len(MATRIX)
    assert "[24/24]" in result.stderr and "ms/step (ok" in result.stderr


@pytest.mark.slow
def test_report_rebuilds_the_table_from_the_json_alone(quick_run, tmp_path):
    _, path, _ = quick_run
    copy = tmp_path / path.name
    copy.write_text(path.read_text())
    result = run_python([COMPARE, "--report", copy], timeout=120)
    assert result.returncode == 0, result.stderr
    assert copy.with_suffix(".md").read_text() == path.with_suffix(".md").read_text()
    assert path.with_suffix(".md").read_text().strip() in result.stdout
    assert copy.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------- failures become rows


@pytest.mark.slow
def test_crash_timeout_and_missing_framework_become_rows(tmp_path):
    """A framework that kills its process, one that hangs, and one that is absent: each
    cell gets a row with its reason, and the results are still written."""
    fakes = tmp_path / "fakes"
    (fakes / "jax").mkdir(parents=True)
    (fakes / "jax" / "__init__.py").write_text(
        "import os, sys\nprint('simulated crash inside jax', file=sys.stderr, flush=True)\nos._exit(3)\n")
    (fakes / "tensorflow").mkdir()
    (fakes / "tensorflow" / "__init__.py").write_text("import time\ntime.sleep(120)\n")
    # sys.modules[name] = None is how Python spells "this module is absent".
    (fakes / "sitecustomize.py").write_text("import sys\nsys.modules['torch'] = None\n")
    output_dir = tmp_path / "out"
    result = run_python([COMPARE, "--quick", "--devices", "cpu", "--paths", "framework", "--timeout", "8",
                         "--output-dir", output_dir], env={"PYTHONPATH": str(fakes)}, timeout=120)
    assert result.returncode == 0, result.stderr
    (path,) = output_dir.glob("*.json")
    cells = {cell["backend"]: cell for cell in json.loads(path.read_text())["cells"]}
    assert cells["jax"]["status"] == "failed"
    assert cells["jax"]["reason"] == "simulated crash inside jax (exit code 3)"
    assert cells["tensorflow"]["status"] == "failed" and cells["tensorflow"]["reason"].startswith("timed out after 8 s")
    assert cells["torch"]["status"] == "skipped" and "pip install" in cells["torch"]["reason"]
    table = path.with_suffix(".md").read_text()
    assert "simulated crash inside jax" in table and "timed out after 8 s" in table
    assert path.with_suffix(".png").exists()


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("value", ["0", "abc", "128,-4", ""])
def test_bad_batch_sizes_are_argparse_errors(value):
    result = run_python([COMPARE, "--batch-sizes", value], timeout=60)
    assert_one_line_error(result, 2, "--batch-sizes: expected positive integers separated by commas", repr(value))


@pytest.mark.parametrize("flag, value", [("--backends", "mxnet"), ("--devices", "tpu"), ("--paths", "fast"),
                                         ("--timeout", "0")])
def test_bad_filters_are_argparse_errors(flag, value):
    result = run_python([COMPARE, flag, value], timeout=60)
    assert_one_line_error(result, 2, flag, value)


def test_report_on_a_missing_file_names_it(tmp_path):
    missing = tmp_path / "missing.json"
    result = run_python([COMPARE, "--report", missing], timeout=60)
    assert_one_line_error(result, 2, str(missing), "does not exist")


def test_report_on_a_file_that_is_not_results(tmp_path):
    other = tmp_path / "other.json"
    other.write_text('{"epochs": 3}')
    result = run_python([COMPARE, "--report", other], timeout=60)
    assert_one_line_error(result, 2, str(other), "not a benchmark results file")
    broken = tmp_path / "broken.json"
    broken.write_text('{"machine": ')
    result = run_python([COMPARE, "--report", broken], timeout=60)
    assert_one_line_error(result, 2, str(broken), "is not JSON")


# ----------------------------------------------------------------------------- reporting, on synthetic results


def synthetic_cell(backend, device, path, median, status="ok", batch_size=128, reason=None, **extra):
    cell = {field: None for field in CELL_FIELDS}
    cell.update(backend=backend, device=device, path=path, batch_size=batch_size, status=status, reason=reason)
    if status == "ok":
        cell.update(step_ms_median=median, step_ms_p10=median * 0.9, step_ms_p90=median * 1.2, first_step_s=2.0,
                    samples_per_s=batch_size / median * 1000, test_accuracy=0.95, peak_rss_mb=900.0, timed_steps=840)
    cell.update(extra)
    return cell


def synthetic_run(slug, cells):
    return {"machine": {"slug": slug, "cpu": "Test CPU", "cores": 2, "ram_gb": 8.0, "gpu": None, "gpus": []},
            "commit": {"id": "a" * 40, "short": "aaaaaaa", "dirty": False}, "datetime": "2030-01-01T00:00:00Z",
            "versions": {"python": "3.11"}, "settings": {"mode": "full", "epochs": 2, "warmup_steps": 20},
            "cells": cells, "source": f"{slug}.json"}


def test_ratios_compare_within_backend_device_and_batch_size():
    cells = add_ratios([
        synthetic_cell("jax", "cpu", "keras-fit", 20.0),
        synthetic_cell("jax", "cpu", "framework", 10.0),
        synthetic_cell("torch", "cpu", "keras-fit", 40.0),
        synthetic_cell("torch", "cpu", "framework", None, status="failed", reason="RuntimeError: boom"),
        synthetic_cell("jax", "gpu", "keras-fit", 4.0),
        synthetic_cell("jax", "gpu", "framework", 2.0),
        synthetic_cell("jax", "cpu", "keras-fit", 60.0, batch_size=512),
        synthetic_cell("jax", "cpu", "framework", 30.0, batch_size=512),
    ])
    ratios = [(cell["ratio_to_framework"], cell["ratio_to_fastest"]) for cell in cells]
    assert ratios == [(2.0, 2.0), (1.0, 1.0), (None, 4.0), (None, None), (2.0, 2.0), (1.0, 1.0), (2.0, 2.0), (1.0, 1.0)]


def test_failed_and_skipped_cells_render_as_rows_with_their_reason():
    cells = add_ratios([
        synthetic_cell("jax", "cpu", "keras-fit", 20.0),
        synthetic_cell("torch", "cpu", "native-step", None, status="failed", reason="ValueError: bad | shape"),
        synthetic_cell("torch", "gpu", "framework", None, status="skipped", reason="torch sees no GPU"),
    ])
    lines = markdown_table(cells).splitlines()
    assert len(lines) == 2 + 3
    assert all(line.count(" | ") == lines[0].count(" | ") for line in lines[2:])
    ok, failed, skipped = lines[2:]
    assert "| 20.0 | 18.0–24.0 | 6,400 |" in ok and "| 1.00× |" in ok
    assert "| failed |" in failed and failed.endswith("| ValueError: bad \\| shape |")
    assert "| skipped |" in skipped and skipped.endswith("| torch sees no GPU |")
    assert "ms" not in failed.split("| failed |")[1].split("ValueError")[0].replace("–", "")


def test_cells_trained_with_another_optimizer_are_flagged():
    adam = {"lr": 0.002, "decay_steps": 860, "ema_momentum": 0.999}
    cells = add_ratios([
        synthetic_cell("jax", "cpu", "keras-fit", 20.0, optimizer=adam),
        synthetic_cell("jax", "cpu", "native-step", 21.0, optimizer=adam),
        synthetic_cell("jax", "cpu", "framework", 10.0, optimizer={**adam, "ema_momentum": None}),
    ])
    keras_row, native_row, framework_row = markdown_table(cells).splitlines()[2:]
    assert keras_row.endswith("|  |") and native_row.endswith("|  |")
    assert framework_row.endswith("| optimizer differs: ema_momentum None (keras-fit: 0.999) |")


def test_cells_timed_on_a_busy_machine_are_flagged():
    quiet = synthetic_cell("jax", "cpu", "keras-fit", 20.0, load_average=[0.4, 1.9], machine_cores=2)
    busy = synthetic_cell("torch", "cpu", "keras-fit", 90.0, load_average=[2.1, 3.4], machine_cores=2)
    quiet_row, busy_row = markdown_table(add_ratios([quiet, busy])).splitlines()[2:]
    assert quiet_row.endswith("|  |")
    assert busy_row.endswith("| busy machine: load 3.4 on 2 cores |")


def test_merging_a_cpu_run_and_a_gpu_run_keeps_what_ran(tmp_path):
    cpu_run = synthetic_run("cpu-test-2c", [
        synthetic_cell("jax", "cpu", "keras-fit", 20.0),
        synthetic_cell("jax", "gpu", "keras-fit", None, status="skipped", reason="no GPU on this machine"),
        synthetic_cell("torch", "gpu", "keras-fit", None, status="skipped", reason="no GPU on this machine"),
    ])
    gpu_run = synthetic_run("gpu-test", [
        synthetic_cell("jax", "gpu", "keras-fit", 3.0, peak_device_mb=500.0),
        synthetic_cell("torch", "gpu", "keras-fit", None, status="skipped", reason="torch sees no GPU"),
    ])
    cells = add_ratios(merge_cells([cpu_run, gpu_run]))
    assert [(c["machine"], c["backend"], c["device"], c["status"]) for c in cells] == [
        ("cpu-test-2c", "jax", "cpu", "ok"), ("gpu-test", "jax", "gpu", "ok"), ("cpu-test-2c", "torch", "gpu", "skipped")]
    table = markdown_table(cells)
    assert table.splitlines()[0].startswith("| machine | backend |")
    chart = draw_chart(cells, tmp_path / "merged.png")
    assert chart.read_bytes()[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------- pieces


def test_matrix_order_and_cell_environment():
    cells = build_matrix(batch_sizes=(128, 512))
    assert len(cells) == 2 * len(MATRIX)
    assert cells[0] == Cell("jax", "cpu", "keras-fit", 128) and cells[-1] == Cell("torch", "gpu", "framework", 512)
    cpu = cell_environment(Cell("torch", "cpu", "framework", 128), base={"CUDA_VISIBLE_DEVICES": "0"})
    assert cpu["KERAS_BACKEND"] == "torch" and cpu["CUDA_VISIBLE_DEVICES"] == "" and cpu["JAX_PLATFORMS"] == "cpu"
    gpu = cell_environment(Cell("jax", "gpu", "keras-fit", 128), base={"CUDA_VISIBLE_DEVICES": ""})
    assert gpu["JAX_PLATFORMS"] == "cuda" and "CUDA_VISIBLE_DEVICES" not in gpu
    variable, (flag,) = FRAMEWORK_FLAGS["jax"][2:]
    assert cell_environment(Cell("jax", "cpu", "framework", 128), base={})[variable] == flag
    assert variable not in cpu


def test_warmup_steps_are_left_out_of_the_timed_steps():
    assert timed_step_seconds([[9.0, 1.0, 2.0], [3.0, 4.0]], warmup_steps=2) == [2.0, 3.0, 4.0]
    assert timed_step_seconds([[9.0, 1.0, 2.0]], warmup_steps=0) == [9.0, 1.0, 2.0]


def test_numpy_initial_weights_equal_seeded_weights():
    """benchmarks/initial_weights.py draws, without keras, what model.cnn.seeded_weights
    draws from a built network, for both pooling layers and several seeds."""
    backend = next((b for b in BACKENDS if installed(b)), None)
    if backend is None:
        pytest.skip("no backend installed")
    require_backend(backend)
    code = (
        "import json, numpy as np\n"
        "from model.cnn import build_cnn, seeded_weights\n"
        "from benchmarks.initial_weights import seeded_cnn_weights\n"
        "out = {}\n"
        "for pooling in ('fast', 'stock'):\n"
        "    network = build_cnn(pooling)\n"
        "    for seed in (0, 7):\n"
        "        keras_side, numpy_side = seeded_weights(network, seed), seeded_cnn_weights(seed)\n"
        "        out[f'{pooling}-{seed}'] = [[list(a.shape), list(b.shape), bool(np.array_equal(a, b))]\n"
        "                                    for a, b in zip(keras_side, numpy_side, strict=True)]\n"
        "print(json.dumps(out))\n"
    )
    result = run_python(["-c", code], backend, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    comparisons = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(comparisons) == 4
    for key, pairs in comparisons.items():
        assert [tuple(a) for a, _, _ in pairs] == list(CNN_WEIGHT_SHAPES), key
        assert all(b == a and equal for a, b, equal in pairs), (key, pairs)


def test_numpy_initial_weights_are_glorot_uniform_and_seeded():
    first, again, other = seeded_cnn_weights(0), seeded_cnn_weights(0), seeded_cnn_weights(1)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(first[0], other[0])
    assert sum(w.size for w in first) == 693_962
    kernel = first[2]
    assert kernel.dtype == np.float32 and np.abs(kernel).max() <= np.sqrt(6 / (5408 + 128))
    assert not first[1].any() and not first[3].any() and not first[5].any()
