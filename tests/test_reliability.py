"""Runs a user can trust (issue 15), each case a real train.py process: --resume that means
what it says, Ctrl-C that stops (a real SIGINT), one run per output dir, write failures on a
real small filesystem, bad small inputs. Processes that need no training share one run."""

from __future__ import annotations

import concurrent.futures
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from tests.helpers import BACKENDS, REPO, backend_env, installed, require_backend, run_python

# A short run: 5 batches per epoch.
SHORT = ["--limit-train-batches", "5"]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("train.py:")]


def one_error(result, exit_code: int, *fragments: str) -> str:
    assert result.returncode == exit_code, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def trainer_state(checkpoint: Path) -> dict:
    with zipfile.ZipFile(checkpoint) as archive:
        return json.loads(archive.read("trainer_state.json"))


def snapshot(folder: Path) -> dict:
    """Every file under `folder` with its bytes' size, mtime and content hash."""
    import hashlib

    return {str(path.relative_to(folder)): (path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
            for path in sorted(folder.rglob("*")) if path.is_file() and path.name != ".train.lock"}


class Training:
    """train.py started in the background, its output in files (no pipe to fill)."""

    def __init__(self, args, backend: str, logs: Path, **popen):
        logs.mkdir(parents=True, exist_ok=True)
        self.stdout_path, self.stderr_path = logs / "stdout.txt", logs / "stderr.txt"
        with open(self.stdout_path, "w") as stdout, open(self.stderr_path, "w") as stderr:
            self.process = subprocess.Popen([sys.executable, "train.py", *map(str, args)], cwd=REPO,
                                            env=backend_env(backend), stdout=stdout, stderr=stderr,
                                            stdin=subprocess.DEVNULL, **popen)

    def wait_for(self, condition, timeout: float = 300) -> None:
        started = time.monotonic()
        while not condition():
            assert self.process.poll() is None, f"train.py ended early:\n{self.stderr_path.read_text()[-3000:]}"
            assert time.monotonic() - started < timeout, "timed out"
            time.sleep(0.02)

    def interrupt(self) -> None:
        self.process.send_signal(signal.SIGINT)

    def result(self, timeout: float = 300) -> subprocess.CompletedProcess:
        try:
            self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
        return subprocess.CompletedProcess(self.process.args, self.process.returncode, self.stdout_path.read_text(),
                                           self.stderr_path.read_text())


def ctrl_c_after_first_checkpoint(backend: str, root: Path) -> dict:
    """Train 4 short epochs; press Ctrl-C as soon as epoch 1's checkpoint exists. On torch,
    a second train.py tries the same output dir while the first one trains."""
    output = root / f"ctrl-c-{backend}"
    epochs = 100 if backend == "torch" else 4  # torch's run must outlive the second process
    training = Training(["--epochs", epochs, *SHORT, "--output-dir", output], backend, root / f"logs-{backend}")
    training.wait_for((output / "checkpoints" / "last.keras").exists)
    second = None
    if backend == "torch":
        second = run_python(["train.py", "--epochs", "1", *SHORT, "--output-dir", output], backend, timeout=300)
    training.interrupt()
    return {"output": output, "result": training.result(), "pid": training.process.pid, "second": second}


def double_ctrl_c(root: Path) -> dict:
    """A second Ctrl-C as soon as the first is acknowledged, in the middle of a slow
    (4096-image) torch step, whose many eager ops let Python's handler run at once."""
    output = root / "double-ctrl-c"
    training = Training(["--epochs", "2", "--batch-size", "4096", "--limit-train-batches", "3", "--output-dir", output],
                        "torch", root / "logs-double")
    training.wait_for(lambda: "Epoch 1/2" in training.stdout_path.read_text())
    time.sleep(0.2)
    training.interrupt()
    training.wait_for(lambda: "stopping after the steps running" in training.stdout_path.read_text())
    training.interrupt()
    return {"output": output, "result": training.result()}


@pytest.fixture(scope="module")
def signalled_runs(tmp_path_factory):
    """The Ctrl-C runs of every installed backend, started together (they overlap on the cores)."""
    root = tmp_path_factory.mktemp("signals")
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = {backend: pool.submit(ctrl_c_after_first_checkpoint, backend, root)
                   for backend in BACKENDS if installed(backend)}
        if installed("torch"):
            futures["double"] = pool.submit(double_ctrl_c, root)
        # A scenario that failed fails its own tests only (scenario() re-raises it).
        return {name: future.exception() or future.result() for name, future in futures.items()}


def scenario(runs: dict, name: str) -> dict:
    if isinstance(runs[name], BaseException):
        raise runs[name]
    return runs[name]


# ----------------------------------------------------------------------------- Ctrl-C


@pytest.mark.parametrize("backend", BACKENDS)
def test_ctrl_c_stops_at_a_step_boundary_with_one_line(backend, signalled_runs):
    require_backend(backend)
    run = scenario(signalled_runs, backend)
    output = run["output"]
    line = one_error(run["result"], 130, "stopped by Ctrl-C at epoch", "the last good checkpoint (epoch",
                     f"continue with: python train.py --backend {backend} --output-dir {output} --resume")
    # The checkpoint the message names is the one on disk, whole, with its state inside.
    kept = int(line.split("the last good checkpoint (epoch ")[1].split(")")[0])
    assert trainer_state(output / "checkpoints" / "last.keras")["epochs_completed"] == kept
    assert kept < (100 if backend == "torch" else 4)
    stopped_epoch = int(line.split("at epoch ")[1].split(",")[0])
    assert stopped_epoch == kept + 1, line
    # Stopped mid-run: no final model was written as if the run had finished.
    assert not (output / "model.keras").exists() and not (output / "run.json").exists()


def test_second_ctrl_c_exits_at_once(signalled_runs):
    require_backend("torch")
    result = scenario(signalled_runs, "double")["result"]
    assert result.returncode == 130, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert error_lines(result.stderr) == ["train.py: second Ctrl-C: stopped at once; the last checkpoint written is kept"]


# ----------------------------------------------------------------------------- one run per directory


def test_a_second_process_on_a_running_dir_is_refused(signalled_runs):
    require_backend("torch")
    run = scenario(signalled_runs, "torch")
    one_error(run["second"], 2, f"another train.py (pid {run['pid']}) is running in output dir", "--output-dir")
    # The first run was not disturbed: it stopped on its Ctrl-C with its checkpoint whole.
    assert run["result"].returncode == 130
    assert trainer_state(run["output"] / "checkpoints" / "last.keras")["epochs_completed"] >= 1


# ----------------------------------------------------------------------------- resume


@pytest.fixture(scope="module")
def resumed_on_torch(signalled_runs, tmp_path_factory):
    """The JAX run stopped by Ctrl-C, resumed on torch with nothing but --resume."""
    require_backend("jax")
    require_backend("torch")
    output = tmp_path_factory.mktemp("resumed") / "run"
    shutil.copytree(scenario(signalled_runs, "jax")["output"], output)
    stopped_at = trainer_state(output / "checkpoints" / "last.keras")["epochs_completed"]
    result = run_python(["train.py", "--output-dir", output, "--resume"], "torch", timeout=300)
    return output, stopped_at, result


def test_resume_continues_with_the_checkpoints_settings_and_this_backends_jit(resumed_on_torch):
    output, stopped_at, result = resumed_on_torch
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming after epoch {stopped_at} of 4" in result.stdout
    run = json.loads((output / "run.json").read_text())
    assert run["backend"] == "torch" and run["resumed_from_epoch"] == stopped_at
    # The checkpoint's settings, not train.py's defaults (TrainConfig's epochs, all batches) ...
    assert run["config"]["epochs"] == 4 and run["config"]["limit_train_batches"] == 5
    # ... the whole history, and torch's own jit_compile (eager), not JAX's XLA.
    assert [entry["epoch"] for entry in run["history"]] == [1, 2, 3, 4]
    assert run["config"]["jit_compile"] is False
    state = trainer_state(output / "checkpoints" / "last.keras")
    assert state["epochs_completed"] == 4 and state["run"]["lr"] == run["config"]["lr"]


# Each case: (argv after --output-dir DIR, exit code, fragments of the one error line).
REFUSED_ON_A_FINISHED_RUN = {
    "epochs-beyond-the-schedule": (["--resume", "--epochs", "6"], 2,
                                   ["--epochs 6 (checkpoint: 4)", "planned for 4 epochs", "is 0 at their end"]),
    "epochs-already-reached": (["--resume", "--epochs", "1"], 2, ["--epochs 1 (checkpoint: 4)"]),
    "batch-size": (["--resume", "--batch-size", "64"], 2, ["--batch-size 64 (checkpoint: 128)"]),
    "maths-flags": (["--resume", "--lr", "0.5", "--pooling", "stock", "--step", "native"], 2,
                    ["--lr 0.5 (checkpoint: 0.002)", "--pooling stock (checkpoint: fast)",
                     "--step native (checkpoint: keras)", "--overwrite"]),
    "new-run-into-a-run": (["--epochs", "1", *SHORT], 2,
                           ["holds a previous run", "--resume", "another --output-dir", "--overwrite"]),
}


def replace_state(source: Path, target: Path, state: bytes | None, model: Path | None = None) -> None:
    """Write `target` as `model` (default: `source`) with its trainer state replaced by
    `state` (None: no state entry)."""
    with zipfile.ZipFile(model or source) as original, zipfile.ZipFile(target, "w") as copy:
        for item in original.infolist():
            if item.filename != "trainer_state.json":
                copy.writestr(item, original.read(item))
        if state is not None:
            copy.writestr("trainer_state.json", state)


def unfinished(state: dict) -> dict:
    """`state` as it was one epoch earlier."""
    return {**state, "epochs_completed": state["epochs_completed"] - 1, "history": state["history"][:-1]}


def run_main_cases(cases: dict, backend: str) -> dict:
    """name -> (rc, stderr, stdout) of train.main(argv) for each case, all in one process
    (the refusals need no training, and a process start costs seconds)."""
    script = (
        "import contextlib, gc, io, json, sys\nimport train\nresults, collector = {}, []\n"
        "for name, argv in json.loads(sys.argv[1]).items():\n"
        "    out, err = io.StringIO(), io.StringIO()\n"
        "    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):\n"
        "        rc = train.main(argv)\n"
        "    results[name] = [rc, err.getvalue(), out.getvalue()]\n"
        "    collector.append(gc.isenabled())\n"
        "results['collector_on_after_main'] = collector\n"
        "print('RESULTS ' + json.dumps(results))\n")
    result = run_python(["-c", script, json.dumps(cases)], backend, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    line = [line for line in result.stdout.splitlines() if line.startswith("RESULTS ")][-1]
    return json.loads(line[len("RESULTS "):])


@pytest.fixture(scope="module")
def refusals(resumed_on_torch, tmp_path_factory):
    """Every refusal case against the finished run (and broken copies of it), one process."""
    output, _, resumed = resumed_on_torch
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    root = tmp_path_factory.mktemp("refusals")
    last = output / "checkpoints" / "last.keras"
    broken = {"corrupt-state": b"{not json", "state-is-a-list": b"[1, 2]", "no-state": None,
              # A copied model.keras, with and without a valid trainer state (of an unfinished
              # run, so that resume must load it) added.
              "model-without-optimizer": json.dumps(unfinished(trainer_state(last))).encode(),
              "model-as-checkpoint": None}
    cases = {name: [*argv, "--output-dir", str(output)] for name, (argv, _, _) in REFUSED_ON_A_FINISHED_RUN.items()}
    cases["complete"] = ["--resume", "--output-dir", str(output)]
    for name, state in broken.items():
        folder = root / name
        shutil.copytree(output, folder)
        target = folder / "checkpoints" / "last.keras"
        replace_state(last, target, state, model=output / "model.keras" if name.startswith("model") else None)
        cases[name] = ["--resume", "--output-dir", str(folder)]
    blocked = root / "checkpoints-is-a-file"
    blocked.mkdir()
    (blocked / "checkpoints").write_text("not a folder")
    cases["checkpoints-is-a-file"] = ["--epochs", "1", *SHORT, "--output-dir", str(blocked)]
    shutil.copytree(output, root / "overwritten")
    cases["overwrite"] = ["--epochs", "1", "--limit-train-batches", "2", "--overwrite", "--output-dir",
                          str(root / "overwritten")]
    before = snapshot(output)
    results = run_main_cases(cases, "torch")
    return results, before, snapshot(output), root


def check_refusal(outcome, exit_code: int, fragments) -> None:
    rc, stderr, stdout = outcome
    result = subprocess.CompletedProcess([], rc, stdout, stderr)
    one_error(result, exit_code, *fragments)
    assert "Epoch 1/" not in stdout


@pytest.mark.parametrize("case", REFUSED_ON_A_FINISHED_RUN)
def test_resume_refuses_what_would_change_the_run(case, refusals):
    results, before, after, _ = refusals
    _, exit_code, fragments = REFUSED_ON_A_FINISHED_RUN[case]
    check_refusal(results[case], exit_code, fragments)
    assert after == before  # no file of the run was touched by any case


def test_main_turns_the_collector_on_again_when_no_training_ran(refusals):
    """train.main pauses Python's garbage collector while the run starts; a refusal or a
    finished run (no Trainer.fit) must not leave it off in the calling process."""
    results, _, _, _ = refusals
    assert results["collector_on_after_main"] and all(results["collector_on_after_main"])


def test_resuming_a_complete_run_changes_nothing(refusals):
    results, before, after, _ = refusals
    rc, stderr, stdout = results["complete"]
    assert rc == 0, stderr[-3000:]
    assert "is complete (4 of 4 epochs); nothing changed" in stdout
    assert "Epoch" not in stdout and "test accuracy" not in stdout
    assert after == before


@pytest.mark.parametrize("case, fragments", [
    ("corrupt-state", ["trainer state", "not valid JSON"]),
    ("state-is-a-list", ["trainer state", "not one this project wrote"]),
    ("no-state", ["holds no trainer state", "start a new run"]),
    ("model-as-checkpoint", ["holds no trainer state"]),
    ("model-without-optimizer", ["without its optimizer state", "start a new run"]),
])
def test_a_broken_resume_checkpoint_is_one_line(case, fragments, refusals):
    results, _, _, _ = refusals
    check_refusal(results[case], 1, fragments)


def test_checkpoints_as_a_file_is_refused_before_training(refusals):
    results, _, _, root = refusals
    check_refusal(results["checkpoints-is-a-file"], 2, ["checkpoints exists and is not a folder", "--output-dir"])
    assert (root / "checkpoints-is-a-file" / "checkpoints").read_text() == "not a folder"


def test_overwrite_replaces_the_previous_run_whole(refusals):
    results, before, _, root = refusals
    rc, stderr, stdout = results["overwrite"]
    assert rc == 0, stderr[-3000:]
    folder = root / "overwritten"
    run = json.loads((folder / "run.json").read_text())
    assert run["config"]["epochs"] == 1 and [entry["epoch"] for entry in run["history"]] == [1]
    # The new run's files, not the 4-epoch run's.
    state = trainer_state(folder / "checkpoints" / "last.keras")
    assert state["epochs_completed"] == 1 and state["run"]["limit_train_batches"] == 2
    after = snapshot(folder)
    assert all(after[name] != before[name] for name in ("model.keras", "checkpoints/best.keras", "run.json"))


# ----------------------------------------------------------------------------- a full disk


def small_filesystem(folder: Path):
    """A 16 MB tmpfs at `folder` when this process may mount one (root), else None: then
    the child gets a 5 MB file-size limit instead (RLIMIT_FSIZE, SIGXFSZ ignored)."""
    folder.mkdir()
    if os.geteuid() == 0 and shutil.which("mount"):
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(folder)], capture_output=True)
        if mounted.returncode == 0:
            return folder
    return None


def limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (5_000_000, 5_000_000))


def test_a_full_disk_is_one_line_and_the_last_good_checkpoint_survives(tmp_path):
    require_backend("jax")
    mount = small_filesystem(tmp_path / "small")
    output = tmp_path / "small" / "run"
    try:
        result = run_python(["train.py", "--epochs", "3", "--limit-train-batches", "3", "--output-dir", output], "jax",
                            timeout=300, preexec_fn=None if mount else limit_file_size)
        line = one_error(result, 1, "could not write", str(output / "checkpoints"))
        assert ("No space left on device" if mount else "File too large") in line, line
        last = output / "checkpoints" / "last.keras"
        if mount:  # 16 MB holds epoch 1's checkpoints (14 MB), not a second last.keras beside them
            assert "kept" in line and zipfile.ZipFile(last).testzip() is None
            assert trainer_state(last)["epochs_completed"] == 1
        else:
            assert "no last.keras was written" in line and not last.exists()
        assert not [path.name for path in output.rglob(".*.tmp*")]
    finally:
        if mount:
            subprocess.run(["umount", str(mount)], check=True)


# ----------------------------------------------------------------------------- small inputs


@pytest.mark.parametrize("seed", ["-1", "1099511627776"])
def test_seed_out_of_range_is_an_argparse_error(seed):
    result = run_python(["train.py", "--seed", seed], timeout=60)
    one_error(result, 2, f"--seed: expected an integer from 0 to 4294967295, got {seed}")
