"""benchmarks/compare.py: the quick run end to end (every cell, rounds, statistics), the
pieces it is made of (round order, the clean window, the summary, the report) on synthetic
data, and its answers to bad input."""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
from datetime import datetime

import numpy as np
import pytest

from backends import FRAMEWORK_FLAGS
from benchmarks.cells import Cell, build_matrix, cell_environment, predict_cells, time_to_accuracy_cells
from benchmarks.initial_weights import CNN_WEIGHT_SHAPES, seeded_cnn_weights
from benchmarks.measure import DATA_PARALLEL_PATH, DEVICES, KERAS_PATHS, ONNX_RUNTIME, PATHS, PREDICT, TIME_TO_ACCURACY
from benchmarks.report import draw_chart, markdown_report, merge_cells
from benchmarks.rounds import adjacent_to_anchor, adjacent_to_framework, round_order
from benchmarks.suite import rounds_for
from benchmarks.window import prepared_epoch, window_figures
from model.config import RECIPES, TrainConfig
from model.data import MNISTDataModule
from tests.helpers import BACKENDS, REPO, installed, require_backend, run_python
from tests.test_cli import assert_one_line_error

COMPARE = REPO / "benchmarks" / "compare.py"
# The quick run's cells (tests/conftest.py starts it with --device-counts 1,2): (backend, device, path, devices).
MATRIX = {*itertools.product(BACKENDS, DEVICES, PATHS, [1]), *itertools.product(BACKENDS, DEVICES, [DATA_PARALLEL_PATH], [2]),
          *itertools.product(BACKENDS, DEVICES, [TIME_TO_ACCURACY, PREDICT], [1]), (ONNX_RUNTIME, "cpu", PREDICT, 1)}
ENGINES = {"jax": "keras.distribution.DataParallel", "tensorflow": "tf.distribute.MirroredStrategy",
           "torch": "torch.nn.parallel.DistributedDataParallel"}


def ok_cells(run, paths):
    return [cell for cell in run["cells"] if cell["status"] == "ok" and cell["path"] in paths]


def within(ci, value):
    return ci is not None and ci[0] <= value <= ci[1]


# ----------------------------------------------------------------------------- the quick run (CI)


@pytest.mark.slow
def test_quick_run_has_every_cell_and_records_its_rounds(quick_run):
    _, _, run = quick_run
    settings = run["settings"]
    assert settings["mode"] == "quick" and settings["rounds"] == 1 and isinstance(settings["order_seed"], int)
    assert {(c["backend"], c["device"], c["path"], c["device_count"]) for c in run["cells"]} == MATRIX
    assert len(run["cells"]) == len(MATRIX)
    for cell in run["cells"]:
        assert cell["status"] in ("ok", "skipped", "failed"), cell
        if cell["status"] != "ok":
            assert cell["reason"], cell
        if cell["status"] == "ok":
            # Every cell once (test_rounds_per_cell says what --rounds changes).
            assert [r["round"] for r in cell["rounds"]] == [0] and cell["rounds_ok"] == 1, cell["path"]
    if not run["machine"]["gpus"]:
        # No GPU: decided once in the parent; no GPU cell got a process of its own.
        for cell in (c for c in run["cells"] if c["device"] == "gpu"):
            assert cell["status"] == "skipped" and len(cell["rounds"]) == 1, cell
            assert "no GPU on this machine" in cell["reason"] and "process_wall_s" not in cell["rounds"][0], cell


def test_rounds_per_cell():
    """Full mode: every training and predict cell every round. Quick mode: once, and with
    --rounds R the 1-device keras-fit and its baseline R times, the rest once."""
    from benchmarks.suite import MODES

    full, quick = {**MODES["full"]}, {**MODES["quick"], "rounds": 3}
    cells = (build_matrix(device_counts=[1, 2]) + time_to_accuracy_cells() + predict_cells())
    assert {(cell.path, cell.device_count): rounds_for(cell, full) for cell in cells} == {
        **{(path, 1): 5 for path in (*PATHS, PREDICT)}, (DATA_PARALLEL_PATH, 2): 5, (TIME_TO_ACCURACY, 1): 1}
    assert {(cell.path, cell.device_count): rounds_for(cell, quick) for cell in cells} == {
        **{(path, 1): 1 for path in (*PATHS, PREDICT, TIME_TO_ACCURACY)}, ("keras-fit", 1): 3, ("framework", 1): 3,
        (DATA_PARALLEL_PATH, 2): 1}
    assert MODES["quick"]["rounds"] == 1


def test_time_to_accuracy_cells_train_the_recipe_they_name(monkeypatch):
    """A full run times the default and the fast recipe; --quick the default alone; each
    cell's process builds its config with the recipe applied (TrainConfig.with_recipe)."""
    from benchmarks.cells import cell_identity
    from benchmarks.compare import benchmark_cells, parse_args
    from benchmarks.measure import time_to_accuracy_config
    from benchmarks.suite import MODES, cell_spec

    def recipes(argv):
        return [(cell.backend, cell.recipe) for cell in benchmark_cells(parse_args(["--devices", "cpu", *argv]))
                if cell.path == TIME_TO_ACCURACY]

    assert recipes([]) == [(backend, recipe) for backend in BACKENDS for recipe in ("default", "fast")]
    assert recipes(["--quick"]) == [(backend, "default") for backend in BACKENDS]
    assert recipes(["--quick", "--recipes", "fast", "--backends", "torch"]) == [("torch", "fast")]
    # Whatever --batch-sizes says, each cell names (label, identity, results row) the batch
    # size its recipe trains with.
    assert {(cell.recipe, cell.batch_size) for cell in benchmark_cells(parse_args(["--batch-sizes", "64"]))
            if cell.path == TIME_TO_ACCURACY} == {("default", 128), ("fast", 128)}
    monkeypatch.setitem(RECIPES, "b96", {"batch_size": 96})
    (cell,) = time_to_accuracy_cells(["jax"], ["cpu"], ["b96"])
    assert cell.label == "jax cpu time-to-accuracy b96 (b96 recipe)"
    (cell,) = time_to_accuracy_cells(["jax"], ["cpu"], ["fast"])
    assert cell.label == "jax cpu time-to-accuracy b128 (fast recipe)"
    for mode in ("full", "quick"):
        # The spec run_cell writes: what the cell measures, then which cell it is.
        spec = {**cell_spec(cell, MODES[mode], {}), **cell_identity(cell)}
        config = time_to_accuracy_config(spec)
        fast = TrainConfig().with_recipe("fast")
        assert config.recipe == "fast" and config.target_accuracy == MODES[mode]["target_accuracy"]
        assert config.batch_size == cell.batch_size == spec["batch_size"]
        for field in RECIPES["fast"]:
            assert getattr(config, field) == getattr(fast, field) != getattr(TrainConfig(), field), field
    (default,) = time_to_accuracy_cells(["jax"], ["cpu"])
    default_config = time_to_accuracy_config({**cell_spec(default, MODES["full"], {}), **cell_identity(default)})
    assert default.recipe == "default" and default_config.epochs == TrainConfig().epochs
    assert default_config.batch_size == default.batch_size == TrainConfig().batch_size
    with pytest.raises(ValueError, match="recipe='turbo'"):
        time_to_accuracy_cells(["jax"], ["cpu"], ["turbo"])


@pytest.mark.slow
def test_quick_run_rounds_follow_the_recorded_order_seed(quick_run):
    """Each round ran its cells in the order round_order gives for the recorded seed: so
    keras-fit sat beside its baseline, first in round 0 and second in round 1."""
    _, _, run = quick_run
    seed = run["settings"]["order_seed"]
    cells = {Cell(c["backend"], c["device"], c["path"], c["batch_size"], c["device_count"]): c for c in run["cells"]}
    for round_index in range(run["settings"]["rounds"]):
        # A cell never started (its model could not be prepared) has no position in any round.
        ran = {cell: r for cell, row in cells.items() for r in row["rounds"] if r["round"] == round_index and "position" in r}
        expected = round_order(list(ran), round_index, seed)
        assert sorted(ran, key=lambda cell: ran[cell]["position"]) == expected
        for cell in ran:
            if cell.device_count > 1:
                assert ran[cell]["anchor_adjacent"] is True, cell  # beside its 1-device keras-fit
            elif cell.path == "keras-fit" and ran[cell]["status"] == "ok":
                framework = ran[Cell(cell.backend, cell.device, "framework", cell.batch_size)]
                assert ran[cell]["framework_adjacent"] is True
                assert framework["position"] - ran[cell]["position"] == (1 if round_index % 2 == 0 else -1)


@pytest.mark.slow
def test_quick_run_training_cells_have_finite_ordered_figures(quick_run):
    _, _, run = quick_run
    settings = run["settings"]
    ok = [cell for cell in ok_cells(run, PATHS) if cell["device_count"] == 1]
    assert {(c["backend"], c["path"]) for c in ok} == {(b, p) for b in BACKENDS if installed(b) for p in PATHS}
    for cell in ok:
        name = f"{cell['backend']} {cell['device']} {cell['path']}"
        for field in ("step_ms_median", "images_per_s", "compile_s", "data_s_per_epoch", "epoch_s", "floor_gflops",
                      "achieved_gflops", "pct_of_floor", "ratio_to_framework"):
            assert isinstance(cell[field], float) and math.isfinite(cell[field]) and cell[field] > 0, (name, field)
        # One round gives no interval, and says so rather than inventing one (the report
        # test below merges two copies of the file: there every cell has two rounds and a CI).
        assert cell["step_ms_ci95"] is None, name
        if cell["path"] != "framework":
            assert cell["ratio_to_framework_ci95"] is None and cell["ratio_significance"] == "n.s.", name
        assert cell["ratio_significance"] in ("", "n.s."), name
        assert cell["epoch_s"] > cell["data_s_per_epoch"], name
        for result in cell["rounds"]:
            # One window: every step of one epoch, full batches only, none of them left out;
            # where Keras runs several steps per call, the warm-up and window in whole calls.
            per_call = result.get("steps_per_execution", 1)
            warmup, window = (-(-settings[name] // per_call) * per_call for name in ("warmup_steps", "window_steps"))
            if cell["backend"] == "tensorflow":
                assert per_call > 1, f"TensorFlow's {cell['path']} ran one step per call"
            assert result["epochs_run"] == 1 and result["steps_run"] == warmup + window, (name, result["steps_run"])
            assert result["window_images"] == (warmup + window) * cell["batch_size"], name
            assert len(result["step_ms"]) == result["window_steps"] == window, name
            assert 0 < result["step_ms_p10"] <= result["step_ms_p50"] <= result["step_ms_p90"] <= result["step_ms_p99"], name
            for side in ("floor_before", "floor_after"):
                assert result[side]["sgemm_gflops_model_shape"] > 0 and result[side]["triad_gb_s"] > 0, name
            assert result["flops_per_image"] == run["settings"]["model"]["flops_per_image"] == 4_939_776
        if cell["path"] == "framework":
            assert cell["ratio_to_framework"] == 1.0
            # The hand-written loop runs as many steps per call as Keras fit beside it.
            keras_fit = next(c for c in ok if c["path"] == "keras-fit" and c["backend"] == cell["backend"])
            assert ({r["steps_per_execution"] for r in cell["rounds"]}
                    == {r["steps_per_execution"] for r in keras_fit["rounds"]}), name
            assert all(r["keras_imported_by_path"] is False for r in cell["rounds"]), name


@pytest.mark.slow
def test_quick_run_data_parallel_cells_train_on_two_devices(quick_run):
    """keras-fit on 2 simulated CPU devices per backend, through its engine: the devices
    that trained are read back from inside the cell, and its images/s is paired with the
    1-device cell's in the devices table."""
    _, path, run = quick_run
    cells = {c["backend"]: c for c in run["cells"] if c["device_count"] == 2 and c["device"] == "cpu"}
    assert run["settings"]["device_counts"] == [1, 2]
    for backend in (b for b in BACKENDS if installed(b)):
        cell = cells[backend]
        assert cell["status"] == "ok", (backend, cell["reason"], cell["rounds"][0].get("output_tail"))
        assert cell["devices_used"] == [2] and cell["engine"] == ENGINES[backend]
        for result in cell["rounds"]:
            assert result["devices_used"] == 2 and result["replica_max_weight_difference"] <= 1e-6, backend
            per_call = result["steps_per_execution"]
            assert result["images_per_s"] > 0 and result["steps_run"] == sum(
                -(-run["settings"][name] // per_call) * per_call for name in ("warmup_steps", "window_steps"))
            assert result["anchor_adjacent"] is True and "floor_before" not in result
        assert cell["speedup_over_one_device"] > 0 and cell["speedup_significance"] == "n.s."  # one round: no CI
        assert cell["ratio_to_framework"] is None  # compared with its 1-device cell, not the hand-written loop
    lines = path.with_suffix(".md").read_text().splitlines()
    table = lines.index("## More than one device")
    rows = [line for line in lines[table:table + 8] if line.startswith("| ") and "| 2 |" in line]
    assert len(rows) == len([b for b in BACKENDS if installed(b)]), lines[table:table + 8]
    note = next(line for line in lines[table:] if line.startswith("keras-fit through"))
    assert f"share the machine's {run['machine']['cores']} cores" in note and "engine's overhead, not a speed-up" in note
    # MirroredStrategy's step is never XLA-compiled; the 1-device one is where the CPU's
    # choice (default_jit_compile: AVX2) is XLA. The note names a cell exactly when they differ.
    one_device = {c["backend"]: c for c in run["cells"]
                  if c["device_count"] == 1 and c["device"] == "cpu" and c["path"] == "keras-fit"}
    for backend, cell in cells.items():
        differs = {r.get("jit_compile") for r in cell["rounds"]} != {r.get("jit_compile") for r in one_device[backend]["rounds"]}
        assert (f"{backend} cpu on 2 devices" in note) == differs, (backend, note)


@pytest.mark.slow
def test_quick_run_time_to_accuracy_and_predict_cells(quick_run):
    _, _, run = quick_run
    target = run["settings"]["target_accuracy"]
    assert run["settings"]["time_to_accuracy_recipes"] == ["default"]
    for cell in ok_cells(run, [TIME_TO_ACCURACY]):
        assert cell["target_accuracy"] == target < 0.99  # quick mode trains to a lower target
        assert cell["rounds_reached"] == 1, cell["rounds"]
        assert cell["test_accuracy"] >= target and cell["epochs_to_target"] >= 1
        (result,) = cell["rounds"]
        # --quick times the default recipe alone, and the cell trained it (its config recorded).
        assert cell["recipe"] == result["recipe"] == result["config"]["recipe"] == "default"
        assert result["config"]["epochs"] == TrainConfig().epochs
        # The clock runs from the process's launch, the per-epoch checks left out.
        assert 0 < cell["seconds_to_target"] < result["process_wall_s"] - result["evaluation_s"] + 1
        # It starts as train.py does (select_backend): jax imported on JAX alone.
        assert result["jax_imported"] is (cell["backend"] == "jax"), cell["backend"]
    predict = ok_cells(run, [PREDICT])
    assert {c["backend"] for c in predict} >= {b for b in BACKENDS if installed(b)}
    for cell in predict:
        assert 0 < cell["latency_ms_median"] <= cell["latency_ms_p99"], cell["backend"]
        assert cell["throughput_images_per_s"] > 0 and len(cell["rounds"]) == 1  # one round in quick mode
        (result,) = cell["rounds"]
        assert result["latency_calls"] == 20 and len(result["throughput_s"]) == 2
        # Served as predict.py serves (model.prediction.predictor): torch by its fused forward.
        served = {"torch": "torch-fused-forward", ONNX_RUNTIME: "onnxruntime-cpu"}.get(cell["backend"],
                                                                                   "keras-predict_on_batch")
        assert result["runtime_path"] == served, cell["backend"]


@pytest.mark.slow
def test_quick_run_records_machine_commit_versions(quick_run):
    _, path, run = quick_run
    machine = run["machine"]
    assert machine["cores"] >= 1 and machine["cpu"] and isinstance(machine["cpu_flags"], list)
    assert machine["isa"] in ("avx512", "avx2", "avx", "sse", "other", "arm64") and machine["slug"].endswith(machine["isa"])
    assert "steal_pct" in machine
    assert len(run["commit"]["id"]) == 40 and run["commit"]["short"] in path.name
    assert datetime.fromisoformat(run["datetime"].replace("Z", "+00:00")).utcoffset().total_seconds() == 0
    for name in ("python", "keras", "jax", "tensorflow", "torch", "numpy"):
        assert name in run["versions"]
    _, _, variable, flags = FRAMEWORK_FLAGS["jax"]
    for cell in ok_cells(run, PATHS):
        for result in cell["rounds"]:
            expected = {variable} if cell["backend"] == "jax" else set()
            assert set(result["framework_flags"]) == expected, cell["backend"]


@pytest.mark.slow
def test_quick_run_report_and_its_rebuild_from_json(quick_run, tmp_path):
    _, path, run = quick_run
    markdown = path.with_suffix(".md").read_text()
    lines = markdown.splitlines()
    assert lines[2].startswith("On CPU, ") and "trains fastest" in lines[2]
    header = lines[4]
    assert header.count("|") - 1 <= 8 and "Keras overhead" in header
    assert "## Inference" in markdown and "onnxruntime" in markdown
    if not run["machine"]["gpus"]:
        # Every skipped GPU cell of a backend on one line.
        assert sum("gpu (" in line and "skipped" in line for line in lines) == len(BACKENDS)
    assert path.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    copy = tmp_path / path.name
    shutil.copy(path, copy)
    result = run_python([COMPARE, "--report", copy], timeout=120)
    assert result.returncode == 0, result.stderr
    assert copy.with_suffix(".md").read_text() == markdown.replace(path.name, copy.name)
    # Two files (one file name twice is refused: rounds pair by file and round): their
    # rounds merged, every ok cell with twice the rounds.
    second = tmp_path / f"second-{path.name}"
    shutil.copy(path, second)
    merged = run_python([COMPARE, "--report", second, path, "--output-dir", tmp_path], timeout=120)
    assert merged.returncode == 0, merged.stderr
    assert "rounds ok" in merged.stdout and f"| {2 * run['settings']['rounds']}/{2 * run['settings']['rounds']} |" in merged.stdout
    # With two rounds per cell, the headline's step times and Keras overhead carry intervals.
    merged_lines = merged.stdout.splitlines()
    header = next(i for i, line in enumerate(merged_lines) if line.startswith("| backend | device | Keras fit"))
    fits = merged_lines[header + 2:merged_lines.index("", header)]
    assert fits and all(line.count("[") == 3 for line in fits), fits


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
    # sys.modules[name] = None is how Python spells "this module is absent"; only in the
    # cells' processes, as scipy (which the parent's statistics use) trips over it.
    (fakes / "sitecustomize.py").write_text(
        "import sys\nif 'benchmarks.measure' in sys.orig_argv:\n    sys.modules['torch'] = None\n")
    output_dir = tmp_path / "out"
    result = run_python([COMPARE, "--quick", "--rounds", "1", "--kinds", "training", "--devices", "cpu", "--paths",
                         "framework", "--timeout", "8", "--output-dir", output_dir], env={"PYTHONPATH": str(fakes)},
                        timeout=120)
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
                                         ("--timeout", "0"), ("--recipes", "default,turbo")])
def test_bad_filters_are_argparse_errors(flag, value):
    result = run_python([COMPARE, flag, value], timeout=60)
    assert_one_line_error(result, 2, flag, value)


def test_time_to_accuracy_rounds_reach_the_cells_and_need_such_cells(monkeypatch):
    """--time-to-accuracy-rounds R runs each time-to-accuracy cell R times (the other cells
    keep theirs); without such cells it is a one-line error."""
    from benchmarks import compare
    from benchmarks.suite import run_settings

    asked = {}

    def run_suite(cells, mode, output_dir, **overrides):
        asked.update(cells=cells, mode=mode, overrides=overrides)
        return None, "table"

    monkeypatch.setattr(compare, "run_suite", run_suite)
    assert compare.main(["--kinds", "training,time-to-accuracy", "--devices", "cpu", "--time-to-accuracy-rounds", "3"]) == 0
    cells, settings = asked["cells"], run_settings(asked["mode"], asked["cells"], asked["overrides"])
    assert {rounds_for(cell, settings) for cell in cells if cell.path == TIME_TO_ACCURACY} == {3}
    assert {rounds_for(cell, settings) for cell in cells if cell.path != TIME_TO_ACCURACY} == {5}
    result = run_python([COMPARE, "--kinds", "training", "--time-to-accuracy-rounds", "3"], timeout=60)
    assert_one_line_error(result, 2, "--time-to-accuracy-rounds 3", "--kinds training", "add time-to-accuracy to --kinds")


def test_recipes_without_time_to_accuracy_cells_is_a_one_line_error():
    result = run_python([COMPARE, "--kinds", "training", "--recipes", "fast"], timeout=60)
    assert_one_line_error(result, 2, "--recipes fast", "--kinds training", "add time-to-accuracy to --kinds")


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


@pytest.mark.parametrize("value, message, more", [
    ("0", "expected positive integers", []), ("abc", "expected positive integers", []),
    ("3", "batch size 128 does not split evenly over 3 devices; use a device count that divides it, "
          "or --batch-sizes 126 or 129", []),
    ("2", "leaves no training cell: more than one device runs keras-fit only", ["--paths", "framework"])])
def test_bad_device_counts_are_one_line_errors(value, message, more):
    result = run_python([COMPARE, "--device-counts", value, *more], timeout=60)
    assert_one_line_error(result, 2, "--device-counts", value, message)


@pytest.mark.parametrize("flag, value", [("--rounds", "0"), ("--target-accuracy", "1.5"), ("--kinds", "inference")])
def test_bad_rounds_target_and_kinds_are_argparse_errors(flag, value):
    result = run_python([COMPARE, flag, value], timeout=60)
    assert_one_line_error(result, 2, flag, value)


def test_report_with_a_string_where_a_number_belongs(tmp_path):
    run = synthetic_run("cpu-test-2c-avx2", [training_row("jax", "keras-fit", [20.0, 21.0])])
    run["cells"][0]["rounds"][1]["step_ms_mean"] = "21.0"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(run))
    result = run_python([COMPARE, "--report", bad], timeout=60)
    assert_one_line_error(result, 2, str(bad), "step_ms_mean is '21.0', expected a number")


def test_report_checks_time_to_accuracy_numbers_and_refuses_one_file_twice(tmp_path):
    """Each is a one-line ResultsFileError (compare.py prints it), never a TypeError later."""
    from benchmarks.report import ResultsFileError, load_runs

    tta = {"backend": "jax", "device": "cpu", "path": TIME_TO_ACCURACY, "batch_size": 128, "status": "ok",
           "rounds": [{"status": "ok", "round": 0, "target_accuracy": 0.99, "test_accuracy": 0.991,
                       "evaluation_s": "3.5", "seconds_to_target": 60.0, "epochs_to_target": 4}]}
    bad = tmp_path / "tta.json"
    bad.write_text(json.dumps(synthetic_run("cpu-test-2c-avx2", [tta])))
    with pytest.raises(ResultsFileError, match="evaluation_s is '3.5', expected a number"):
        load_runs([bad])
    tta["rounds"][0].update(evaluation_s=3.5, seconds_to_target=None, epochs_to_target=None)  # target not reached
    bad.write_text(json.dumps(synthetic_run("cpu-test-2c-avx2", [tta])))
    assert len(load_runs([bad])) == 1
    copy = tmp_path / "elsewhere" / "tta.json"
    copy.parent.mkdir()
    shutil.copy(bad, copy)
    with pytest.raises(ResultsFileError, match="two results files named 'tta.json'"):
        load_runs([bad, copy])


@pytest.fixture
def unwritable_folder(tmp_path):
    """A folder nobody can write into: read-only for a user; for root, who writes through
    permissions, a path whose parent is a file."""
    if os.geteuid() == 0:
        blocker = tmp_path / "a-file"
        blocker.write_text("")
        yield blocker / "results"
        return
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    yield locked
    locked.chmod(0o700)


def test_report_or_run_into_an_unwritable_folder(tmp_path, unwritable_folder):
    good = tmp_path / "good.json"
    good.write_text(json.dumps(synthetic_run("cpu-test-2c-avx2", [training_row("jax", "keras-fit", [20.0, 21.0])])))
    result = run_python([COMPARE, "--report", good, "--output-dir", unwritable_folder], timeout=60)
    assert_one_line_error(result, 2, str(unwritable_folder), "--output-dir")
    assert not list(tmp_path.glob("**/good.md"))
    # A run refuses before its rounds, not after minutes of them.
    run = run_python([COMPARE, "--quick", "--output-dir", unwritable_folder / "sub"], timeout=60)
    assert_one_line_error(run, 2, str(unwritable_folder / "sub"), "--output-dir")


# ----------------------------------------------------------------------------- round order


def test_round_order_pairs_keras_fit_with_its_baseline_and_alternates():
    cells = build_matrix(devices=["cpu"]) + time_to_accuracy_cells(devices=["cpu"]) + predict_cells(devices=["cpu"])
    orders = [round_order(cells, r, order_seed=5) for r in range(6)]
    assert round_order(cells, 3, order_seed=5) == orders[3]  # a function of seed and round
    assert round_order(cells, 3, order_seed=6) != orders[3]
    assert len({tuple(order) for order in orders}) == 6  # a new order every round
    neighbours_of_framework = set()
    for r, order in enumerate(orders):
        assert sorted(order, key=cells.index) == cells  # every cell once
        for backend in BACKENDS:
            positions = {c.path: i for i, c in enumerate(order) if c.backend == backend and c.path in PATHS}
            # One block per backend, keras-fit beside the framework, keras-fit first in even rounds.
            assert sorted(positions.values()) == list(range(min(positions.values()), min(positions.values()) + 4))
            assert positions["framework"] - positions["keras-fit"] == (1 if r % 2 == 0 else -1)
            assert adjacent_to_framework(order, positions["keras-fit"])
            others = [p for p in KERAS_PATHS if p != "keras-fit" and adjacent_to_framework(order, positions[p])]
            assert len(others) == 1
            neighbours_of_framework.add((backend, others[0]))
    # Over the rounds both other Keras paths get to sit beside the baseline.
    assert len(neighbours_of_framework) == 2 * len(BACKENDS)


def test_round_order_puts_data_parallel_cells_beside_their_one_device_anchor():
    cells = build_matrix(devices=["cpu"], device_counts=[1, 2]) + predict_cells(devices=["cpu"])
    one_device = [cell for cell in cells if cell.device_count == 1]
    assert len(cells) - len(one_device) == len(BACKENDS)
    for r in range(4):
        order = round_order(cells, r, order_seed=5)
        # The 1-device cells keep the order they have without data-parallel cells.
        assert [cell for cell in order if cell.device_count == 1] == round_order(one_device, r, order_seed=5)
        for position, cell in enumerate(order):
            if cell.device_count == 2:
                assert adjacent_to_anchor(order, position) and not adjacent_to_framework(order, position), (r, cell)


# ----------------------------------------------------------------------------- the window


def test_prepared_epoch_is_full_batches_of_the_whole_epoch(mnist_arrays):
    datamodule = MNISTDataModule(batch_size=128, limit_train_batches=7).setup(mnist_arrays)
    images, labels, data_s, epoch_images = prepared_epoch(datamodule, steps=13)
    assert len(images) == len(labels) == 13 * 128 and data_s > 0
    assert epoch_images == 55_000 and datamodule.limit_train_batches == 7  # the limit restored
    whole, _ = MNISTDataModule(batch_size=128).setup(mnist_arrays).train_epoch(0)
    assert np.array_equal(images, whole[: 13 * 128])
    # Only the window's batches (--quick): the same arrays.
    quick_images, _, quick_s, _ = prepared_epoch(datamodule, steps=13, whole_epoch=False)
    assert np.array_equal(quick_images, images) and quick_s > 0
    with pytest.raises(ValueError, match="430 steps needs 430 full batches; an epoch has 429"):
        prepared_epoch(datamodule, steps=430)  # the 430th batch would be the partial one


def test_ab_compares_two_commits_medians_and_pairs_overhead_by_round(tmp_path, capsys):
    """benchmarks/ab.py: each side's rounds from the files of its commit only; the overhead
    from keras-fit and framework of the same round of the same run; a one-line error for
    a commit with no files."""
    from benchmarks import ab

    def run(commit, keras_ms, framework_ms, seconds):
        def cell(path, values, batch_size=128, **extra):
            rounds = [{"status": "ok", "round": index, "step_ms_mean": value, "seconds_to_target": value,
                       "reached_target": True} for index, value in enumerate(values)]
            return {"backend": "jax", "device": "cpu", "path": path, "batch_size": batch_size, "device_count": 1,
                    "rounds": rounds, **extra}
        # Rounds listed out of order on one side: pairs go by round number, not position.
        framework = cell("framework", framework_ms)
        framework["rounds"].reverse()
        # Another batch size's cell after it: a row of its own, not mixed into batch 128's.
        return {"commit": {"short": commit, "id": commit * 5}, "cells": [
            cell("keras-fit", keras_ms), framework, cell("keras-fit", [99, 99], batch_size=64),
            cell("time-to-accuracy", seconds, recipe="fast", target_accuracy=0.99),
            # A GPU's cell skipped on a CPU machine: no figures, no target, no row.
            {"backend": "jax", "device": "gpu", "path": "time-to-accuracy", "recipe": "fast", "batch_size": 128,
             "device_count": 1, "status": "skipped", "rounds": [{"status": "skipped", "round": 0}]}]}

    for name, commit, values in (("a", "old1234", ([10, 12], [10, 8], [16, 16])),
                                 ("b", "new5678", ([9, 9], [9, 6], [15, 15])),
                                 ("c", "other00", ([1, 1], [1, 1], [1, 1]))):
        (tmp_path / "training").mkdir(exist_ok=True)
        (tmp_path / "training" / f"{name}-{commit}.json").write_text(json.dumps(run(commit, *values)))
    rows = {(line.split(" | ")[1], line.split(" | ")[2]): line.split(" | ")[3:]
            for line in ab.table("old1234", "new5678", [tmp_path])[2:]}
    assert rows["cpu b64", "keras-fit ms/step"][2] == "1.000 [1.000-1.000] |"
    assert not [key for key in rows if key[0].startswith("gpu")]
    rows = {figure: values for (device, figure), values in rows.items() if device == "cpu b128"}
    assert rows["keras-fit ms/step"] == ["11.000, 2", "9.000, 2", "0.818 [0.750-0.900] |"]
    # Old: 10/10 and 12/8 (median 1.25); new: 9/9 and 9/6 (median 1.25): 1.0.
    assert rows["Keras overhead (keras-fit / framework, per round)"][:2] == ["1.250, 2", "1.250, 2"]
    assert rows["seconds to 99.0%, fast recipe"] == ["16.000, 2", "15.000, 2", "0.938 [0.938-0.938] |"]
    assert ab.main(["old1234", "missing", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("ab.py: no compare.py results file of commit 'missing'")


def test_window_figures_leave_out_warmup_and_count_window_images():
    started = 100.0
    ends = [101.0, 101.5, 101.52, 101.54, 101.57, 101.60]  # compile, one warm-up, then 4 steps
    figures = window_figures(started, ends, warmup_steps=2, batch_size=128)
    assert figures["compile_s"] == pytest.approx(1.0)
    assert figures["step_ms"] == pytest.approx([20, 20, 30, 30])
    assert figures["window_steps"] == 4 and figures["step_ms_mean"] == pytest.approx(25)
    assert figures["images_per_s"] == pytest.approx(4 * 128 / 0.1)
    with pytest.raises(RuntimeError, match="no window steps"):
        window_figures(started, ends[:2], warmup_steps=2, batch_size=128)


# ----------------------------------------------------------------------------- summary and report, on synthetic rounds


def training_round(round_index, step_ms, floor=(100.0, 100.0)):
    return {"status": "ok", "reason": None, "round": round_index, "position": 0, "step_ms_mean": step_ms,
            "images_per_s": 128_000 / step_ms, "compile_s": 1.0, "data_s_per_epoch": 1.0, "epoch_s": 12.0,
            "step_ms_p50": step_ms, "step_ms_p90": step_ms * 1.1, "step_ms_p99": step_ms * 1.2,
            "floor_before": {"sgemm_gflops_model_shape": floor[0], "sgemm_gflops_1024": 150.0, "triad_gb_s": 10.0},
            "floor_after": {"sgemm_gflops_model_shape": floor[1], "sgemm_gflops_1024": 150.0, "triad_gb_s": 10.0},
            "flops_per_image": 4_939_776, "framework_adjacent": True}


def training_row(backend, path, steps, device="cpu", floor=(100.0, 100.0), device_count=1):
    rounds = [training_round(r, value, floor) for r, value in enumerate(steps)]
    return {"backend": backend, "device": device, "path": path, "batch_size": 128, "device_count": device_count,
            "status": "ok", "rounds": rounds}


def skipped_row(backend, device, path, reason):
    return {"backend": backend, "device": device, "path": path, "batch_size": 128 if path in PATHS else 1,
            "status": "skipped", "rounds": [{"status": "skipped", "reason": reason, "round": 0}]}


def synthetic_run(slug, cells):
    return {"machine": {"slug": slug, "cpu": "Test CPU", "cores": 2, "gpus": [], "isa": "avx2"},
            "commit": {"id": "a" * 40, "short": "aaaaaaa", "dirty": False}, "datetime": "2030-01-01T00:00:00Z",
            "versions": {"python": "3.11"}, "settings": {"mode": "full", "rounds": len(cells[0]["rounds"])},
            "cells": cells, "source": f"{slug}.json"}


def drifting(base, drift):
    return [base * factor for factor in drift]


DRIFT = [1.0, 1.4, 0.8, 1.2, 0.9]  # the host's speed, shared by the two cells of a round


def synthetic_matrix():
    return [
        training_row("jax", "keras-fit", drifting(22.0, DRIFT)),
        training_row("jax", "framework", drifting(20.0, DRIFT)),  # Keras 1.10x in every round
        training_row("torch", "keras-fit", [25.0, 24.0, 26.0, 25.0, 24.5]),
        training_row("torch", "framework", [24.0, 26.0, 25.0, 25.5, 24.0]),  # no real gap
        training_row("torch", "keras-fit-stock", [40.0, 41.0, 39.0, 40.0, 42.0], floor=(100.0, 80.0)),
        *(skipped_row(backend, "gpu", path, "no GPU on this machine") for backend in ("jax", "torch") for path in PATHS),
    ]


def test_ratios_are_paired_by_round_and_marked_when_not_significant():
    rows = {(r["backend"], r["path"]): r for r in merge_cells([synthetic_run("cpu-test-2c-avx2", synthetic_matrix())])
            if r["device"] == "cpu"}
    jax = rows[("jax", "keras-fit")]
    # Paired per round the shared drift cancels: 1.10 exactly, with a CI of one point.
    assert jax["ratio_to_framework"] == pytest.approx(1.1) and jax["ratio_to_framework_ci95"] == pytest.approx([1.1, 1.1])
    assert jax["ratio_significance"] == ""
    # The medians of the two cells alone would have a CI holding 1.0: the pairing is what decides.
    assert jax["step_ms_ci95"][0] < rows[("jax", "framework")]["step_ms_ci95"][1]
    torch = rows[("torch", "keras-fit")]
    assert torch["ratio_to_framework_ci95"][0] < 1.0 < torch["ratio_to_framework_ci95"][1]
    assert torch["ratio_significance"] == "n.s."
    assert within(torch["step_ms_ci95"], torch["step_ms_median"]) and torch["step_ms_median"] == 25.0
    stock = rows[("torch", "keras-fit-stock")]
    assert stock["floor_drifted"] and not torch["floor_drifted"]
    assert jax["pct_of_floor"] == pytest.approx(4_939_776 * (128_000 / 22.0) / 1e9 / 100 * 100)


def test_the_machine_floor_is_the_best_floor_any_training_cell_measured_on_that_machine_and_device():
    """A framework whose own flags slow its sgemm (80 GFLOP/s here, against torch's 100 on the
    same host) gets a high share of its own floor; against the machine's floor, torch's,
    its share is the honest one. Another machine's faster floor is not this one's."""
    here = synthetic_run("cpu-test-2c-avx2", [
        training_row("jax", "keras-fit", [22.0] * 5, floor=(80.0, 80.0)),
        training_row("jax", "framework", [20.0] * 5, floor=(80.0, 80.0)),
        training_row("torch", "keras-fit", [25.0] * 5, floor=(100.0, 100.0)),
        training_row("torch", "framework", [24.0] * 5, floor=(98.0, 98.0)),
    ])
    elsewhere = synthetic_run("cpu-other-2c-avx512", [training_row("tensorflow", "keras-fit", [10.0] * 5, floor=(300.0, 300.0))])
    rows = {(r.get("machine"), r["backend"], r["path"]): r for r in merge_cells([here, elsewhere])}
    jax = rows[("cpu-test-2c-avx2", "jax", "keras-fit")]
    achieved = 4_939_776 * (128_000 / 22.0) / 1e9
    assert jax["pct_of_floor"] == pytest.approx(achieved / 80 * 100)
    assert jax["machine_floor_gflops"] == 100.0 and jax["machine_floor_backend"] == "torch"
    assert jax["pct_of_machine_floor"] == pytest.approx(achieved / 100 * 100)
    torch = rows[("cpu-test-2c-avx2", "torch", "keras-fit")]
    assert torch["pct_of_machine_floor"] == pytest.approx(torch["pct_of_floor"])
    other = rows[("cpu-other-2c-avx512", "tensorflow", "keras-fit")]
    assert other["machine_floor_gflops"] == 300.0 and other["machine_floor_backend"] == "tensorflow"
    lines = markdown_report([here], merge_cells([here])).splitlines()
    jax_line = next(line for line in lines if line.startswith("| jax | cpu |"))
    assert f"| {achieved / 80 * 100:.0f}% | {achieved:.0f}% |" in jax_line
    assert "- machine floor, cpu, batch 128: 100 GFLOP/s, torch keras-fit's" in lines
    for result in here["cells"][0]["rounds"]:  # a row with no floor of its own gets no share of the machine's
        del result["floor_before"], result["floor_after"]
    unmeasured = next(r for r in merge_cells([here]) if (r["backend"], r["path"]) == ("jax", "keras-fit"))
    assert unmeasured["pct_of_floor"] is None and unmeasured["pct_of_machine_floor"] is None


def test_machine_floors_are_per_batch_size_and_on_a_gpu_per_precision():
    """The floor's matmul has the batch's shape, so a batch-512 floor is not a batch-32 row's;
    on a GPU a TF32 floor is not a float32 row's."""
    def with_batch(row, batch_size):
        return {**row, "batch_size": batch_size}

    def with_tf32(row, allowed):
        return {**row, "rounds": [{**result, "tf32": {"tf32_allowed": allowed}} for result in row["rounds"]]}

    run = synthetic_run("cpu-test-2c-avx2", [
        with_batch(training_row("jax", "keras-fit", [22.0] * 5, floor=(60.0, 60.0)), 32),
        with_batch(training_row("torch", "keras-fit", [25.0] * 5, floor=(150.0, 150.0)), 512),
        with_tf32(training_row("jax", "keras-fit", [1.0] * 5, device="gpu", floor=(400.0, 400.0)), True),
        with_tf32(training_row("torch", "keras-fit", [2.0] * 5, device="gpu", floor=(50.0, 50.0)), False),
    ])
    rows = {(r["backend"], r["device"]): r for r in merge_cells([run]) if r["path"] == "keras-fit"}
    assert rows[("jax", "cpu")]["machine_floor_gflops"] == 60.0  # not batch 512's 150
    assert rows[("torch", "cpu")]["machine_floor_gflops"] == 150.0
    assert rows[("torch", "gpu")]["machine_floor_gflops"] == 50.0  # not the TF32 400
    assert rows[("torch", "gpu")]["pct_of_machine_floor"] == pytest.approx(rows[("torch", "gpu")]["pct_of_floor"])
    assert rows[("jax", "gpu")]["machine_floor_gflops"] == 400.0


def test_data_parallel_cell_is_paired_with_its_one_device_cell_and_tabled():
    """images/s on 2 devices over 1 device, per round: the host's drift cancels (0.80 in
    every round); the 2-device row stays out of the headline, the chart and the Keras-overhead ratios."""
    cells = synthetic_matrix() + [training_row("jax", "keras-fit", drifting(27.5, DRIFT), device_count=2),
                                  training_row("torch", "keras-fit", [30.0] * 5, device_count=2)]
    del cells[2]  # torch's 1-device keras-fit: its 2-device cell has no anchor
    for cell in cells:  # jax's 1-device step XLA-compiled, its 2-device one not: the note names it
        if cell["backend"] == "jax" and cell["path"] == "keras-fit":
            for result in cell["rounds"]:
                result["jit_compile"] = cell.get("device_count", 1) == 1
    run = synthetic_run("cpu-test-2c-avx2", cells)
    rows = merge_cells([run])
    jax = next(r for r in rows if r["backend"] == "jax" and r["device_count"] == 2)
    assert jax["speedup_over_one_device"] == pytest.approx(0.8) and jax["speedup_over_one_device_ci95"] == pytest.approx([0.8, 0.8])
    assert jax["speedup_significance"] == "" and jax["ratio_to_framework"] is None and jax["speedup_pairs"] == 5
    torch = next(r for r in rows if r["backend"] == "torch" and r["device_count"] == 2)
    assert torch["speedup_over_one_device"] is None
    lines = markdown_report([run], rows).splitlines()
    # The 2-device torch cell (30 ms/step) is no runner-up in the 1-device headline.
    assert lines[2].startswith("On CPU, jax trains fastest through Keras fit (22.0 ms/step);"), lines[2]
    table = lines.index("## More than one device")
    assert lines[table + 4].startswith("| jax | cpu |") and lines[table + 4].endswith("| 2 | 5,818 [4,156–7,273] | "
                                                                                         "4,655 [3,325–5,818] | 0.80× [0.80–0.80] |")
    assert lines[table + 5].startswith("| torch | cpu |") and lines[table + 5].endswith("| – | 4,267 [4,267–4,267] | – |")
    assert "share the machine's 2 cores" in lines[table + 7]
    assert "Compiled otherwise than its 1-device cell" in lines[table + 7] and "jax cpu on 2 devices" in lines[table + 7]
    assert "torch cpu on 2 devices" not in lines[table + 7]
    assert sum("keras-fit on 2 devices" in line for line in lines) == 2  # in the details table
    # Without a 2-device cell the report has no such section.
    assert "## More than one device" not in markdown_report([run], merge_cells([synthetic_run("x", synthetic_matrix())]))


def test_merging_files_pairs_rounds_within_each_file():
    first = synthetic_run("cpu-test-2c-avx2", [training_row("jax", "keras-fit", [22.0, 44.0]),
                                               training_row("jax", "framework", [20.0, 40.0])])
    second = json.loads(json.dumps(first))
    second["source"] = "second.json"
    for cell, steps in zip(second["cells"], ([30.0, 60.0], [25.0, 50.0])):
        for result, value in zip(cell["rounds"], steps):
            result["step_ms_mean"] = value
    (keras_fit, framework) = [r for r in merge_cells([first, second]) if r["path"] in ("keras-fit", "framework")]
    assert keras_fit["rounds_ok"] == 4 and framework["rounds_ok"] == 4
    # Ratios 1.1, 1.1 (first file) and 1.2, 1.2 (second): round 0 of one file never pairs
    # with the other's (22 / 25 would give 0.88).
    assert keras_fit["ratio_pairs"] == 4 and keras_fit["ratio_to_framework"] == pytest.approx(1.15)
    assert keras_fit["ratio_to_framework_ci95"] == pytest.approx([1.1, 1.2])


def test_report_headline_tables_and_collapsed_skips(tmp_path):
    runs = [synthetic_run("cpu-test-2c-avx2", synthetic_matrix() + [
        {"backend": "jax", "device": "cpu", "path": TIME_TO_ACCURACY, "batch_size": 128, "status": "ok",
         "rounds": [{"status": "ok", "round": 0, "target_accuracy": 0.99, "test_accuracy": 0.9903, "reached_target": True,
                     "seconds_to_target": 75.0, "epochs_to_target": 4, "evaluation_s": 2.0}]},
        {"backend": ONNX_RUNTIME, "device": "cpu", "path": PREDICT, "batch_size": 1, "status": "ok",
         "rounds": [{"status": "ok", "round": r, "latency_ms_median": 0.1 + r / 100, "latency_ms_p99": 0.3,
                     "throughput_images_per_s": 50_000.0, "runtime_path": "onnxruntime-cpu"} for r in range(3)]}])]
    rows = merge_cells(runs)
    lines = markdown_report(runs, rows).splitlines()
    assert lines[2] == ("On CPU, jax trains fastest through Keras fit (22.0 ms/step), ahead of torch (25.0 ms; not "
                        "significant: their CIs overlap); Keras' overhead over the hand-written loop is significant "
                        "on jax and not significant on torch.")
    assert lines[4] == ("| backend | device | Keras fit ms/step [95% CI] | hand-written ms/step [95% CI] | "
                        "Keras overhead [95% CI] | % of floor | % of machine floor | time to 99% |")
    jax_row = next(line for line in lines if line.startswith("| jax | cpu |"))
    assert "1.10× [1.10–1.10] |" in jax_row and "75 s (4 epochs)" in jax_row
    assert "n.s." in next(line for line in lines if line.startswith("| torch | cpu |"))
    assert any(line.startswith("| onnxruntime | cpu | onnxruntime-cpu | 0.11 [0.10–0.12] | 0.30 | 50,000")
               for line in lines)
    skipped = [line for line in lines if "skipped" in line]
    assert skipped == ["- jax gpu (keras-fit, keras-fit-stock, native-step, framework): skipped: no GPU on this machine",
                       "- torch gpu (keras-fit, keras-fit-stock, native-step, framework): skipped: no GPU on this machine"]
    assert any("floor drifted 20%" in line for line in lines)


def tta_row(backend, seconds, recipe=None, epochs=4, config=None):
    """A time-to-accuracy cell of one round; without `recipe`, as files before recipes wrote
    it (no recipe, no config); with it, its round records the config it trained (`config`,
    else the recipe's today)."""
    row = {"backend": backend, "device": "cpu", "path": TIME_TO_ACCURACY, "batch_size": 128, "status": "ok",
           "rounds": [{"status": "ok", "round": 0, "target_accuracy": 0.99, "test_accuracy": 0.9903,
                       "reached_target": True, "seconds_to_target": seconds, "epochs_to_target": epochs,
                       "evaluation_s": 2.0}]}
    if not recipe:
        return row
    config = config or TrainConfig(target_accuracy=0.99).with_recipe(recipe).to_dict()
    return {**row, "recipe": recipe, "rounds": [{**result, "config": config} for result in row["rounds"]]}


def test_report_has_a_time_to_accuracy_row_per_backend_and_recipe():
    """The recipe named in every row; the headline keeps the default recipe's time and says
    so once another recipe ran; a file without recipes (older) reads as the default's."""
    new = synthetic_run("cpu-test-2c-avx2", synthetic_matrix() + [
        tta_row("torch", 14.2, "fast", epochs=2), tta_row("jax", 75.0, "default"), tta_row("jax", 12.5, "fast", epochs=2)])
    lines = markdown_report([new], merge_cells([new])).splitlines()
    assert lines[4].endswith("| % of floor | % of machine floor | time to 99%, default recipe |")
    assert next(line for line in lines if line.startswith("| jax | cpu |")).endswith("| 75 s (4 epochs) |")
    header = lines.index("## Time to accuracy") + 2
    assert lines[header].startswith("| backend | device | recipe | seconds from process start to 99% [95% CI] |")
    assert lines[header + 2:header + 6] == ["| jax | cpu | default | 75.0 | 4 | 1/1 | 0.9903 | 2.0 |",
                                            "| jax | cpu | fast | 12.5 | 2 | 1/1 | 0.9903 | 2.0 |",
                                            "| torch | cpu | fast | 14.2 | 2 | 1/1 | 0.9903 | 2.0 |", ""]
    # An older file: its cells hold no recipe; they ran the default, but with the settings
    # the default had then (not recorded): a row of their own beside a newer file's.
    old = {**synthetic_run("cpu-test-2c-avx2", [tta_row("jax", 80.0)]), "source": "old.json"}
    (row,) = merge_cells([old])
    assert row["recipe"] == "default"
    lines = markdown_report([old], [row]).splitlines()
    assert lines[4].endswith("| time to 99% |") and "| jax | cpu | default | 80.0 | 4 | 1/1 | 0.9903 | 2.0 |" in lines
    merged = {(r["backend"], r["recipe_label"]): r for r in merge_cells([old, new]) if r["path"] == TIME_TO_ACCURACY}
    assert merged[("jax", "default")]["rounds_ok"] == 1 and merged[("jax", "fast")]["rounds_ok"] == 1
    assert merged[("jax", "default (settings not recorded)")]["seconds_to_target"] == 80.0
    lines = markdown_report([old, new], merge_cells([old, new])).splitlines()
    assert next(line for line in lines if line.startswith("| jax | cpu |")).endswith("| 75 s (4 epochs) |")
    # A run of the fast recipe alone: the headline shows it, named.
    fast = synthetic_run("fast", [*synthetic_matrix()[:2], tta_row("jax", 12.5, "fast", epochs=2)])
    lines = markdown_report([fast], merge_cells([fast])).splitlines()
    assert lines[4].endswith("| time to 99%, fast recipe |") and lines[6].endswith("| 12 s (2 epochs) |")


def test_report_keeps_versions_of_a_recipe_apart():
    """Files from before and after a recipe's values changed: rows of one name that trained
    different maths stay apart, each named by the settings that differ; the headline
    shows today's version; rounds of one version from two files merge."""
    then = TrainConfig(target_accuracy=0.99, epochs=20, label_smoothing=0.0).to_dict()
    older = {**synthetic_run("cpu-test-2c-avx2", [tta_row("jax", 60.0, "default", config=then),
                                                  tta_row("jax", 14.0, "fast", epochs=2)]), "source": "older.json"}
    newer = {**synthetic_run("cpu-test-2c-avx2", [*synthetic_matrix()[:2], tta_row("jax", 75.0, "default"),
                                                  tta_row("jax", 12.0, "fast", epochs=2)]), "source": "newer.json"}
    rows = merge_cells([older, newer])
    timed = {row["recipe_label"]: row for row in rows if row["path"] == TIME_TO_ACCURACY}
    assert sorted(timed) == ["default (epochs=20, label_smoothing=0.0)", "default (epochs=30, label_smoothing=0.1)",
                             "fast"]
    assert timed["default (epochs=20, label_smoothing=0.0)"]["seconds_to_target"] == 60.0
    assert timed["default (epochs=30, label_smoothing=0.1)"]["seconds_to_target"] == 75.0
    assert timed["fast"]["rounds_ok"] == 2
    lines = markdown_report([older, newer], rows).splitlines()
    assert next(line for line in lines if line.startswith("| jax | cpu |")).endswith("| 75 s (4 epochs) |")
    assert "| jax | cpu | default (epochs=20, label_smoothing=0.0) | 60.0 | 4 | 1/1 | 0.9903 | 2.0 |" in lines


def test_report_of_two_machines_keeps_them_apart():
    avx2 = synthetic_run("cpu-test-2c-avx2", synthetic_matrix()[:4])
    avx512 = synthetic_run("cpu-test-2c-avx512", [training_row("jax", "keras-fit", [11.0] * 5),
                                                  training_row("jax", "framework", [10.0] * 5)])
    rows = merge_cells([avx2, avx512])
    lines = markdown_report([avx2, avx512], rows).splitlines()
    assert "On CPU (cpu-test-2c-avx2), jax" in lines[2] and "on CPU (cpu-test-2c-avx512), jax" in lines[2]
    assert lines[4].startswith("| machine | backend | device |") and lines[4].count("|") - 1 == 9
    assert [line.split(" | ")[:2] for line in lines[6:9]] == [["| cpu-test-2c-avx2", "jax"], ["| cpu-test-2c-avx2", "torch"],
                                                             ["| cpu-test-2c-avx512", "jax"]]


def test_chart_draws_only_panels_with_data(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    panels = []
    monkeypatch.setattr(plt.Figure, "savefig", lambda figure, *args, **kwargs: panels.append(
        [axis.get_title() for axis in figure.axes]) or open(args[0], "wb").write(b"\x89PNG"))
    everything = merge_cells([synthetic_run("cpu-test-2c-avx2", synthetic_matrix())])
    draw_chart(everything, tmp_path / "all.png")
    no_stock = [row for row in everything if row["path"] != "keras-fit-stock"]
    draw_chart(no_stock, tmp_path / "no-stock.png")
    frameworks_only = [row for row in everything if row["path"] == "framework"]
    draw_chart(frameworks_only, tmp_path / "frameworks.png")
    assert [len(titles) for titles in panels] == [3, 2, 1]
    assert "overhead" in panels[1][1] and "stock" in panels[0][2]


# ----------------------------------------------------------------------------- pieces


def test_matrix_order_and_cell_environment():
    cells = build_matrix(batch_sizes=(128, 512))
    assert len(cells) == 2 * len(BACKENDS) * len(DEVICES) * len(PATHS)
    assert cells[0] == Cell("jax", "cpu", "keras-fit", 128) and cells[-1] == Cell("torch", "gpu", "framework", 512)
    cpu = cell_environment(Cell("torch", "cpu", "framework", 128), base={"CUDA_VISIBLE_DEVICES": "0"})
    assert cpu["KERAS_BACKEND"] == "torch" and cpu["CUDA_VISIBLE_DEVICES"] == "" and cpu["JAX_PLATFORMS"] == "cpu"
    gpu = cell_environment(Cell("jax", "gpu", "keras-fit", 128), base={"CUDA_VISIBLE_DEVICES": ""})
    assert gpu["JAX_PLATFORMS"] == "cuda" and "CUDA_VISIBLE_DEVICES" not in gpu
    variable, (flag,) = FRAMEWORK_FLAGS["jax"][2:]
    assert cell_environment(Cell("jax", "cpu", "framework", 128), base={})[variable] == flag
    assert variable not in cpu
    onnx = cell_environment(Cell(ONNX_RUNTIME, "cpu", PREDICT, 1), base={"KERAS_BACKEND": "jax"})
    assert onnx["KERAS_BACKEND"] == "jax"  # not set to a runtime Keras does not know


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
