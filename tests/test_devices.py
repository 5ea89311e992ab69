"""More than one device: `train.py --devices 2` on 2 simulated CPU devices per backend
(JAX: JAX_NUM_CPU_DEVICES; TensorFlow: 2 logical CPUs; torch: 2 processes over Gloo).

The 2-device run is `train.py --dry-run --devices 2 --target-accuracy 0.01` (5 steps of
the global batch 128; the target, which any net reaches after its one epoch, only adds
the check and its line); the 1-device reference is the suite's shared `train.py --dry-run` (the dry_runs
fixture): the same seed, initial weights and batches.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import BACKENDS, REPO, StartedPython, backend_env, require_backend, run_python
from tests.test_cli import assert_one_line_error

AUDIT_HOOK = REPO / "tests" / "write_audit"


def keras_file_arrays(path: Path) -> dict:
    """{variable path: array} of every variable a .keras file holds (weights and
    optimizer state), read with h5py, without a Keras backend in this process."""
    import h5py

    arrays = {}
    with zipfile.ZipFile(path) as archive, h5py.File(io.BytesIO(archive.read("model.weights.h5"))) as weights:
        weights.visititems(lambda name, item: arrays.__setitem__(name, item[()]) if isinstance(item, h5py.Dataset) else None)
    return arrays


def largest_difference(first: Path, second: Path) -> float:
    a, b = keras_file_arrays(first), keras_file_arrays(second)
    assert a.keys() == b.keys() and len(a) == 25
    return max(float(np.abs(np.asarray(a[name], np.float64) - np.asarray(b[name], np.float64)).max()) for name in a)


def audited(workdir: Path, output: Path) -> dict:
    """Environment that logs which process writes under `output` (tests/write_audit)."""
    logs = workdir / "write-audit"
    logs.mkdir(parents=True, exist_ok=True)
    return {"PYTHONPATH": os.pathsep.join([str(AUDIT_HOOK), str(REPO)]),
            "WRITE_AUDIT_DIR": str(output.resolve()), "WRITE_AUDIT_LOG": str(logs)}


def audit_by_process(workdir: Path) -> dict:
    """{pid: {"write": [...], "data": [...]}} from the audit logs."""
    result = {}
    for log in (workdir / "write-audit").glob("*.log"):
        entries = {"write": [], "data": []}
        for line in log.read_text().splitlines():
            kind, _, path = line.partition(" ")
            entries[kind].append(path)
        result[int(log.stem)] = entries
    return result


@pytest.fixture(scope="session")
def two_device_runs(request, tmp_path_factory):
    """backend -> {"run": the 2-device dry run, "resumed": {devices: (run, output)}}: the
    dry run with --devices 2, then `--resume` of copies of its output with model.keras
    and run.json removed (a run killed after its last checkpoint), once with 2 devices
    and once with 1: last.keras saved under 2 devices loads and finishes the run on both."""
    from tests.conftest import PerBackend

    def start(backend):
        workdir = tmp_path_factory.mktemp(f"two-devices-{backend}")
        output = workdir / "run"
        # --target-accuracy: its line must come from rank 0 alone (test_only_rank_zero_logs).
        command = ["train.py", "--dry-run", "--devices", "2", "--target-accuracy", "0.01", "--output-dir", output]
        return StartedPython(command, backend, workdir / "logs", env=audited(workdir, output)), workdir

    def collect(backend, started):
        process, workdir = started
        run = process.wait(600)
        result = {"run": run, "output": workdir / "run", "audit": audit_by_process(workdir), "resumed": {}}
        if run.returncode != 0:
            return result
        resumed = {}
        for devices in (2, 1):
            output = workdir / f"resumed-on-{devices}"
            shutil.copytree(workdir / "run", output)
            for name in ("model.keras", "run.json", "curves.png"):
                (output / name).unlink()
            command = ["train.py", "--resume", "--devices", str(devices), "--output-dir", output]
            resumed[devices] = (StartedPython(command, backend, workdir / f"logs-resumed-on-{devices}"), output)
        result["resumed"] = {devices: (process.wait(600), output) for devices, (process, output) in resumed.items()}
        return result

    return PerBackend(request.config, start, collect)


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_devices_equal_one_device_with_the_same_global_batch(backend, two_device_runs, dry_runs):
    two = two_device_runs(backend)
    assert two["run"].returncode == 0, two["run"].stderr[-3000:]
    one, one_output = dry_runs(backend)
    assert one.returncode == 0, one.stderr[-3000:]
    run_one = json.loads((one_output / "run.json").read_text())
    run_two = json.loads((two["output"] / "run.json").read_text())
    assert (run_one["replicas"], run_two["replicas"]) == (1, 2)
    assert run_two["config"]["batch_size"] == run_one["config"]["batch_size"] == 128
    # Loss and accuracy logged are the global batch's: equal to one device's.
    (history_one,), (history_two,) = run_one["history"], run_two["history"]
    for name in ("loss", "accuracy", "val_loss", "val_accuracy"):
        assert history_two[name] == pytest.approx(history_one[name], rel=1e-5), name
    assert run_two["test_loss"] == pytest.approx(run_one["test_loss"], rel=1e-5)
    # 5 Adam steps: weights, moments and the weight average.
    difference = largest_difference(one_output / "checkpoints" / "last.keras", two["output"] / "checkpoints" / "last.keras")
    print(f"{backend}: 1 vs 2 devices after 5 steps: max abs difference {difference:.3g}, "
          f"loss {history_one['loss']:.7g} vs {history_two['loss']:.7g}")
    assert difference <= 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_devices_run_through_the_framework_engine_and_replicas_stay_equal(backend, two_device_runs):
    """The negative for drifting replicas: every device's (or process's) copy of the
    weights is compared at the end (run.json); plain fit under DDP, for one, leaves
    them apart with no error."""
    two = two_device_runs(backend)
    assert two["run"].returncode == 0, two["run"].stderr[-3000:]
    run = json.loads((two["output"] / "run.json").read_text())
    engines = {"jax": "keras.distribution.DataParallel", "tensorflow": "tf.distribute.MirroredStrategy",
               "torch": "torch.nn.parallel.DistributedDataParallel"}
    assert (run["accelerator"], run["devices"], run["num_nodes"], run["engine"]) == ("auto", 2, 1, engines[backend])
    assert len(run["replica_devices"]) == 2
    assert run["weight_copies"] == 2
    assert run["replica_max_weight_difference"] == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_rank_zero_logs(backend, two_device_runs):
    """torch's two worker processes both train and check the target; one line each."""
    two = two_device_runs(backend)
    assert two["run"].returncode == 0, two["run"].stderr[-3000:]
    stdout = two["run"].stdout
    assert stdout.count("data parallel: 2 replicas") == 1
    assert stdout.count("reached the target 0.01 after epoch 1") == 1, stdout
    assert stdout.count("test accuracy") == 2, stdout  # the target's line and the run's last


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_rank_zero_writes_files_and_checkpoints(backend, two_device_runs):
    two = two_device_runs(backend)
    assert two["run"].returncode == 0, two["run"].stderr[-3000:]
    audit = two["audit"]
    trainers = [pid for pid, entries in audit.items() if entries["data"]]
    # The launching process checks and locks the output dir before any worker starts (a
    # probe file made and removed, and .train.lock): neither is one of the run's files.
    launcher_files = (".write-probe-", ".train.lock")
    writes = {pid: [path for path in entries["write"] if not any(name in path for name in launcher_files)]
              for pid, entries in audit.items()}
    writers = {pid: paths for pid, paths in writes.items() if paths}
    # torch: two worker processes read the data; JAX and TensorFlow: one process.
    assert len(trainers) == (2 if backend == "torch" else 1), audit
    assert len(writers) == 1, writers
    (written,) = writers.values()
    names = {Path(path).name for path in written}
    assert {"run.json", "model.keras", "curves.png", "last.keras", "best.keras"} <= names


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_device_checkpoint_resumes_on_two_devices_and_on_one(backend, two_device_runs):
    two = two_device_runs(backend)
    assert two["resumed"], "the 2-device run failed"
    original = json.loads((two["output"] / "run.json").read_text())
    for devices, (run, output) in two["resumed"].items():
        assert run.returncode == 0, (devices, run.stderr[-3000:])
        resumed = json.loads((output / "run.json").read_text())
        assert (resumed["devices"], resumed["resumed_from_epoch"]) == (devices, 1)
        assert resumed["test_loss"] == pytest.approx(original["test_loss"], rel=1e-5), devices
        # model.keras: the weight average put in place from the checkpoint's optimizer state.
        difference = max(float(np.abs(a - b).max()) for a, b in zip(
            keras_file_arrays(output / "model.keras").values(), keras_file_arrays(two["output"] / "model.keras").values()))
        print(f"{backend}: model.keras resumed on {devices} device(s) from a 2-device checkpoint: "
              f"max abs difference {difference:.3g}")
        assert difference <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_size_that_does_not_split_is_one_line_before_any_work(backend, tmp_path):
    require_backend(backend)
    output = tmp_path / "run"
    result = run_python(["train.py", "--backend", backend, "--devices", "3", "--batch-size", "128", "--output-dir", output],
                        timeout=120)
    assert_one_line_error(result, 2, "--batch-size 128", "3 devices", "126 or 129")
    assert not output.exists() and "data:" not in result.stdout


@pytest.mark.parametrize("args, fragment", [
    (["--backend", "tensorflow", "--num-nodes", "2", "--coordinator", "h:1"], "keras-team/keras#20585"),
    (["--backend", "torch", "--num-nodes", "2"], "needs --coordinator HOST:PORT"),
    (["--backend", "torch", "--num-nodes", "2", "--coordinator", "nohost"], "'nohost' is not HOST:PORT"),
    (["--backend", "torch", "--num-nodes", "2", "--node-rank", "2", "--coordinator", "h:1"], "--node-rank 2 is not in 0..1"),
    (["--backend", "jax", "--num-nodes", "2", "--coordinator", "h:1"], "JAX on several machines is not supported yet"),
])
def test_placements_that_cannot_run_are_one_line(args, fragment, tmp_path):
    require_backend(args[1])
    result = run_python(["train.py", *args, "--output-dir", tmp_path / "run"], timeout=120)
    assert_one_line_error(result, 2, fragment)
    assert not (tmp_path / "run").exists()


def test_a_torch_worker_that_dies_stops_the_others_with_a_clear_message(tmp_path):
    """SIGKILL one of the two worker processes mid-training: the launcher stops the other
    and train.py exits 1 in bounded time, saying which worker died and how."""
    require_backend("torch")
    output = tmp_path / "run"
    env = {**backend_env("torch"), **audited(tmp_path, output)}
    process = subprocess.Popen([sys.executable, "train.py", "--devices", "2", "--epochs", "100", "--limit-train-batches", "3",
                                "--output-dir", str(output)], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        # Both workers have loaded the data and rank 0 has written a checkpoint: they train together.
        started = time.monotonic()
        while time.monotonic() - started < 300 and process.poll() is None:
            workers = [pid for pid, entries in audit_by_process(tmp_path).items() if entries["data"]]
            if len(workers) == 2 and (output / "checkpoints" / "last.keras").exists():
                break
            time.sleep(0.2)
        assert process.poll() is None and len(workers) == 2, process.stderr.read()[-3000:] if process.poll() else workers
        victim = max(workers)
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    print(f"train.py exited {time.monotonic() - killed:.1f} s after a worker was killed")
    assert process.returncode == 1, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("train.py: error:")]
    assert len(errors) == 1 and "was killed (SIGKILL)" in errors[0] and "stopped" in errors[0], stderr[-3000:]
    for pid in workers:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # no worker outlives the launcher


def test_a_torch_worker_whose_work_is_done_exits_without_the_interpreters_teardown(tmp_path):
    """The interpreter's teardown can abort a torch worker after its work (a C++ thread left
    joinable, pytorch/pytorch#190489; 1 worker in 14 in the benchmark's 2-device cell): a
    finished worker must leave without it, so the run exits 0. The workers here finish,
    then arm an abort for that teardown."""
    require_backend("torch")
    code = ("import sys; from backends import torch_backend; from model.config import TrainConfig; "
            "from tests.teardown_worker import finish_then_abort_at_teardown; "
            "config = TrainConfig(devices=2, accelerator='cpu', output_dir=None); "
            f"sys.exit(torch_backend.launch(finish_then_abort_at_teardown, ({str(tmp_path)!r},), config))")
    result = run_python(["-c", code], backend="torch", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["rank0.done", "rank1.done"]


def test_torch_on_two_nodes_of_one_device_equals_two_devices(two_device_runs, tmp_path):
    """--num-nodes 2 on localhost: two train.py commands, one per "machine", joined through
    --coordinator; the same 2 replicas as --devices 2, so the same weights."""
    require_backend("torch")
    from backends.torch_backend import free_port

    two = two_device_runs("torch")
    assert two["run"].returncode == 0, two["run"].stderr[-3000:]
    coordinator = f"127.0.0.1:{free_port()}"
    nodes = [StartedPython(["train.py", "--dry-run", "--num-nodes", "2", "--node-rank", str(rank), "--coordinator",
                            coordinator, "--collective-timeout", "120", "--output-dir", tmp_path / f"node{rank}"],
                           "torch", tmp_path / f"logs{rank}") for rank in (0, 1)]
    results = [node.wait(600) for node in nodes]
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
    run = json.loads((tmp_path / "node0" / "run.json").read_text())
    assert (run["devices"], run["num_nodes"], run["replicas"], run["weight_copies"]) == (1, 2, 2, 2)
    assert run["replica_max_weight_difference"] == 0.0
    # Only rank 0 (node 0) writes: node 1's output dir gets nothing.
    assert not (tmp_path / "node1").exists() or not any((tmp_path / "node1").iterdir())
    difference = largest_difference(tmp_path / "node0" / "checkpoints" / "last.keras",
                                    two["output"] / "checkpoints" / "last.keras")
    print(f"torch: 2 nodes x 1 device vs 1 node x 2 devices: max abs difference {difference:.3g}")
    assert difference <= 1e-6


def test_data_parallel_drops_only_the_last_partial_batch_and_keeps_the_order(mnist_arrays):
    from model.data import MNISTDataModule

    settings = dict(batch_size=128, seed=3, validation_size=5000)
    whole = MNISTDataModule(**settings).setup(mnist_arrays)
    dropped = MNISTDataModule(**settings, drop_last=True).setup(mnist_arrays)
    assert len(whole.x_train) % 128 and dropped.steps_per_epoch == whole.steps_per_epoch - 1 == 55000 // 128
    kept, all_batches = list(dropped.train_batches(1)), list(whole.train_batches(1))
    assert [len(labels) for _, labels in kept] == [128] * dropped.steps_per_epoch
    assert len(all_batches[-1][1]) == 55000 % 128
    for (images, labels), (want_images, want_labels) in zip(kept, all_batches):
        assert np.array_equal(labels, want_labels) and np.array_equal(images, want_images)
