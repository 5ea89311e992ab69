"""Fixtures shared by the whole test suite."""

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from model.data import load_mnist

# The suite runs several framework processes at once on CI's 2 cores. torch's OpenMP
# threads (libgomp) spin while they wait for work, and oversubscribed that spinning is
# most of their CPU time: torch's short_training + fast_pooling checks took 43-53 s of
# user CPU beside other test processes, 12-14 s with passive waiting. Waiting changes no
# result; every subprocess inherits this (a user's own setting wins). compare.py records
# OMP_* variables with its results.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(scope="session")
def mnist_arrays():
    """Real, verified MNIST in Keras' layout: from the user's cache, or fetched once and cached."""
    arrays = load_mnist()
    for pair in arrays:
        for array in pair:
            # Every test shares these arrays: one that edits them in place would corrupt the others.
            array.flags.writeable = False
    return arrays


# ----------------------------------------------------------------------------- backends a test applies to


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "only_backends(*names, reason=...): the test checks something only these backends have; "
                   "its other [backend] cases are skipped with the reason")


def pytest_collection_modifyitems(config, items):
    """The one place a backend-parametrized test is skipped where it does not apply: a
    case that cannot fail is reported as skipped, with why, not as passed."""
    for item in items:
        marker = item.get_closest_marker("only_backends")
        backend = getattr(getattr(item, "callspec", None), "params", {}).get("backend")
        if marker is None or backend is None or backend in marker.args:
            continue
        if "reason" not in marker.kwargs:
            raise pytest.UsageError(f"{item.nodeid}: only_backends needs a reason")
        item.add_marker(pytest.mark.skip(reason=f"not on {backend}: {marker.kwargs['reason']}"))


# Checks that run once per backend in one subprocess (see tests/backend_checks.py).
BACKEND_CHECKS = ["architecture", "short_training", "training_data", "augmentation_thread", "equivalence", "checkpoint_safety", "framework_baseline", "fast_pooling", "moving_average", "learning_rate", "fused_loss_and_metrics", "serving", "steps_per_execution", "compiled_convolution", "pooled_conv", "layer_calls", "xla_choice"]


# The backends the selected tests are parametrized with (set at collection).
SELECTED_BACKENDS = pytest.StashKey[set]()


class PerBackend:
    """One subprocess per backend, those of every backend the selected tests use started
    together at the first request for any (they overlap their single-threaded phases on
    the cores), each awaited only when its own result is asked for."""

    def __init__(self, config, start, collect):
        self.selected = config.stash.get(SELECTED_BACKENDS, set())
        self.start, self.collect = start, collect
        self.started, self.results = {}, {}

    def __call__(self, backend: str):
        from tests.helpers import BACKENDS, installed, require_backend

        require_backend(backend)
        if not self.started:
            wanted = {name for name in self.selected if installed(name)} | {backend}
            self.started = {name: self.start(name) for name in BACKENDS if name in wanted}
        if backend not in self.started:
            self.started[backend] = self.start(backend)
        if backend not in self.results:
            self.results[backend] = self.collect(backend, self.started[backend])
        return self.results[backend]


@pytest.fixture(scope="session")
def backend_results(request, tmp_path_factory):
    """backend -> {check: {"ok", "value" | "error"}}; each backend's checks run once."""
    from tests.helpers import backend_check_results, start_backend_checks

    return PerBackend(
        request.config,
        lambda backend: start_backend_checks(backend, tmp_path_factory.mktemp(f"checks-{backend}"), BACKEND_CHECKS),
        lambda backend, started: backend_check_results(started))


@pytest.fixture(scope="session")
def dry_runs(request, tmp_path_factory):
    """backend -> (finished `train.py --dry-run` process, its output dir); run once per
    backend and shared, as the NaN test starts from the checkpoint it leaves."""
    from tests.helpers import StartedPython

    def start(backend):
        workdir = tmp_path_factory.mktemp(f"dry-run-{backend}")
        return StartedPython(["train.py", "--dry-run", "--output-dir", workdir / "run"], backend, workdir / "logs"), workdir / "run"

    return PerBackend(request.config, start, lambda backend, started: (started[0].wait(300), started[1]))


@pytest.fixture(scope="session")
def cross_loaded(request, backend_results, dry_runs, tmp_path_factory):
    """loader -> {saver: predictions file}: one process per loader backend loads every
    backend's checkpoint, and its own dry run's model.keras, and predicts all 10,000
    test images with each."""
    from tests.helpers import BACKENDS, TRAIN_PY_MODEL, backend_check_results, check_value, start_backend_checks

    def start(loader):
        checkpoints = {saver: check_value(backend_results(saver), "equivalence")["checkpoint"] for saver in BACKENDS}
        dry_run, output = dry_runs(loader)
        if dry_run.returncode == 0:
            checkpoints[TRAIN_PY_MODEL] = str(output / "model.keras")
        return start_backend_checks(loader, tmp_path_factory.mktemp(f"load-{loader}"), ["load_checkpoints"],
                                    env={"CHECKPOINTS": json.dumps(checkpoints)})

    return PerBackend(request.config, start, lambda loader, started: check_value(backend_check_results(started), "load_checkpoints"))


# ----------------------------------------------------------------------------- compare.py --quick

QUICK_COMPARE = pytest.StashKey[tuple]()
QUICK_COMPARE_WANTED = pytest.StashKey[bool]()


def pytest_collection_finish(session):
    """Note which backends the selected tests use, and whether any needs `compare.py
    --quick` (started by the `_start_quick_compare` fixture, not here: collecting, even
    with --collect-only, starts nothing)."""
    from tests.helpers import BACKENDS

    session.config.stash[SELECTED_BACKENDS] = {
        value for item in session.items for value in getattr(getattr(item, "callspec", None), "params", {}).values()
        if isinstance(value, str) and value in BACKENDS}
    session.config.stash[QUICK_COMPARE_WANTED] = any("quick_run" in getattr(item, "fixturenames", ()) for item in session.items)


@pytest.fixture(scope="session", autouse=True)
def _start_quick_compare(request):
    """Start `compare.py --quick` in the background at the first test when a selected test
    needs it: it runs a few dozen processes one after another, and started early it
    overlaps with the backend subprocesses' single-threaded phases instead of adding its
    minutes after them. (Its timings are not asserted on; tests check correctness,
    compare.py measures speed.)"""
    if request.config.stash.get(QUICK_COMPARE_WANTED, False):
        from tests.helpers import REPO, StartedPython

        workdir = Path(tempfile.mkdtemp(prefix="compare-quick-"))
        # With keras-fit on 2 simulated devices per backend too (issue 12's data-parallel cells).
        started = StartedPython([REPO / "benchmarks" / "compare.py", "--quick", "--device-counts", "1,2",
                                 "--output-dir", workdir / "results"], None, workdir / "logs")
        request.config.stash[QUICK_COMPARE] = (started, workdir)


def pytest_sessionfinish(session):
    """No subprocess outlives the session (one whose result no test asked for, after -x
    or a failure): kill what still runs, and remove the quick run's folder."""
    from tests.helpers import StartedPython

    for started in StartedPython.every:
        if started.process.poll() is None:
            started.process.kill()
            started.process.wait()
    _, workdir = session.config.stash.get(QUICK_COMPARE, (None, None))
    if workdir is not None:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def quick_run(request):
    """`compare.py --quick --device-counts 1,2`, started at the first test: (process, results JSON path, its contents)."""
    started, workdir = request.config.stash[QUICK_COMPARE]
    # Under 3 minutes alone on an idle 2-core host is the aim (4.6 before it ran every
    # cell once); 15 on one loaded to 20 by other runs. The limit leaves room for that.
    result = started.wait(timeout=1500)
    assert result.returncode == 0, result.stderr[-4000:]
    files = sorted((workdir / "results").glob("*.json"))
    assert len(files) == 1, (list((workdir / "results").iterdir()), result.stderr[-2000:])
    print(result.stderr)
    return result, files[0], json.loads(files[0].read_text())


# ----------------------------------------------------------------------------- a trained model

# Training steps of tests/small_model.py: enough for ~97% test accuracy (measured: 97.1%
# after 300 steps, 18 s on torch on 2 cores), which the photo-like accuracy test needs.
SMALL_MODEL_STEPS = 300


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory):
    """(model.keras, its probabilities on the 10,000 test images): one short training on
    torch (the quickest to start), shared by the predict, export and inference tests."""
    import numpy as np

    from tests.helpers import require_backend, run_python

    require_backend("torch")
    output = tmp_path_factory.mktemp("small-model") / "run"
    result = run_python(["tests/small_model.py", output, SMALL_MODEL_STEPS], "torch", timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return output / "model.keras", np.load(output / "test_probabilities.npy")


# export.py's formats that the tests export (once each, in parallel, on TensorFlow).
EXPORTED_FORMATS = {"onnx": "model.onnx", "tf_saved_model": "saved_model", "litert": "model.tflite", "openvino": "model.xml"}


@pytest.fixture(scope="session")
def exports(trained_model, tmp_path_factory):
    """format -> (finished export.py process, artifact path), all started at once."""
    from tests.helpers import StartedPython, require_backend

    require_backend("tensorflow")
    model, _ = trained_model
    root = tmp_path_factory.mktemp("exports")
    started = {}
    for format, name in EXPORTED_FORMATS.items():
        output = root / name
        started[format] = (StartedPython(["export.py", "--model", model, "--format", format, "--output", output],
                                         None, root / f"logs-{format}"), output)
    return {format: (process.wait(600), output) for format, (process, output) in started.items()}
