"""Checkpoints a user can trust: resume, SIGKILL at random moments, NaN, unsafe files."""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import BACKENDS, REPO, backend_env, check_value, require_backend, run_python


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_after_interruption_matches_uninterrupted_run(backend, backend_results):
    result = check_value(backend_results(backend), "checkpoint_safety")
    print(f"resume on {backend}: max abs weight difference {result['resume_max_weight_difference']:.3g}")
    assert result["resumed_steps"] == 30
    assert result["resumed_history_epochs"] == [1, 2, 3]
    # Resumed with the steps per call the uninterrupted run used (10 a call, epochs of 10, on
    # TensorFlow and JAX), not the 1 saved in the checkpoint's compile config.
    assert result["resumed_steps_per_execution"] == result["uninterrupted_steps_per_execution"] == (
        1 if backend == "torch" else 10)
    assert result["resume_max_weight_difference"] <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_checkpoints_give_one_clear_error(backend, backend_results):
    errors = check_value(backend_results(backend), "checkpoint_safety")["errors"]
    assert "Lambda layer" in errors["lambda.keras"] and "safe mode" in errors["lambda.keras"]
    assert "truncated.keras" in errors["truncated.keras"] and "not a .keras zip" in errors["truncated.keras"]
    assert "not a .keras zip" in errors["text.keras"]
    assert "does not exist" in errors["missing.keras"]
    assert all("\n" not in message for message in errors.values())


# Atomic writing is the same code on every backend, and each kill round costs a process
# start; the cross-backend checkpoint tests cover each backend's save and load.
@pytest.mark.parametrize("backend", ["torch"])
def test_sigkill_at_random_moments_never_leaves_a_broken_checkpoint(backend, tmp_path):
    """Kill a real training run several times, mid-epoch or mid-save; every checkpoint
    left behind must load, and --resume must carry on from it."""
    require_backend(backend)
    output = tmp_path / "run"
    # Two-batch epochs: the process spends much of its time writing checkpoints.
    command = [sys.executable, "train.py", "--epochs", "200", "--limit-train-batches", "2", "--output-dir", str(output)]
    rng = random.Random(f"kill-{backend}")
    checkpoints = output / "checkpoints"
    survivors = []
    for attempt in range(3):
        resume = ["--resume"] if (checkpoints / "last.keras").exists() else []
        process = subprocess.Popen(command + resume, cwd=REPO, env=backend_env(backend),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # Wait until this process has begun writing checkpoints, then kill it at a random
        # moment: with two-batch epochs, that is often in the middle of a save.
        started = time.monotonic()
        last = checkpoints / "last.keras"
        baseline = last.stat().st_mtime_ns if last.exists() else 0
        while time.monotonic() - started < 180 and process.poll() is None:
            if last.exists() and last.stat().st_mtime_ns != baseline:
                break
            time.sleep(0.05)
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        time.sleep(rng.uniform(0.0, 2.0))
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()[-2000:]
        for name in ("last.keras", "best.keras"):
            if (checkpoints / name).exists():
                copy = tmp_path / f"kill{attempt}-{name}"
                copy.write_bytes((checkpoints / name).read_bytes())
                survivors.append(str(copy))
    assert len(survivors) >= 3, survivors
    script = ("import sys, json; from model.checkpoint import load_model\n"
              "for path in json.loads(sys.argv[1]): load_model(path)\nprint('loaded', len(json.loads(sys.argv[1])))")
    loaded = run_python(["-c", script, json.dumps(survivors)], backend, timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert f"loaded {len(survivors)}" in loaded.stdout
    # --resume carries on from whatever the kills left (the killed processes' locks do not
    # block it), after removing the temp files a kill mid-save left; Ctrl-C ends it once
    # it has written a checkpoint of its own.
    last = checkpoints / "last.keras"
    baseline = last.stat().st_mtime_ns
    resumed = subprocess.Popen([sys.executable, "train.py", "--output-dir", str(output), "--resume"], cwd=REPO,
                               env=backend_env(backend), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    started = time.monotonic()
    while time.monotonic() - started < 180 and resumed.poll() is None and last.stat().st_mtime_ns == baseline:
        time.sleep(0.05)
    assert resumed.poll() is None, resumed.stderr.read().decode()[-2000:]
    resumed.send_signal(signal.SIGINT)
    _, stderr = resumed.communicate(timeout=120)
    assert resumed.returncode == 130, stderr.decode()[-2000:]
    assert not [p.name for p in (output / "checkpoints").iterdir() if ".tmp" in p.name]


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_loss_stops_with_epoch_and_step_and_claims_no_checkpoint_it_lacks(backend, tmp_path):
    require_backend(backend)
    output = tmp_path / "run"
    exploded = run_python(["train.py", "--lr", "1e30", "--epochs", "2", "--limit-train-batches", "30",
                           "--output-dir", output], backend, timeout=300)
    assert exploded.returncode == 1, exploded.stderr[-2000:]
    assert "Traceback" not in exploded.stderr
    errors = [line for line in exploded.stderr.splitlines() if line.startswith("train.py: error:")]
    assert len(errors) == 1 and ("nan" in errors[0] or "inf" in errors[0]), exploded.stderr[-2000:]
    # The step, or on TensorFlow and JAX the steps of the call (15 a call: epochs of 30)
    # where the loss went bad: the first call, as lr 1e30 breaks the first update.
    named = re.search(r"at epoch 1, (step \d+|steps \d+-\d+);", errors[0])
    assert named, errors[0]
    assert named.group(1) == ("steps 1-15" if backend != "torch" else named.group(1)), errors[0]
    if backend == "torch":
        assert 1 <= int(named.group(1).split()[1]) <= 15, errors[0]
    # It stopped in epoch 1: no checkpoint exists, and the message must not say one is kept.
    assert "no checkpoint was written yet" in errors[0] and "kept" not in errors[0], errors[0]
    assert not (output / "checkpoints" / "last.keras").exists()


def test_atomic_write_leaves_the_old_file_or_the_new_one(tmp_path):
    """model.checkpoint.atomic_write: while the writer runs, and after it fails half-way,
    the destination holds the old bytes; no temp file is left; a finished write has the
    permissions a plain open() would give."""
    import os

    from model.checkpoint import atomic_write

    path = tmp_path / "last.keras"
    path.write_bytes(b"old checkpoint")
    seen_during_write = []

    def half_write_then_fail(temp):
        temp.write_bytes(b"new but torn")
        seen_during_write.append(path.read_bytes())
        raise KeyboardInterrupt  # a BaseException, like a signal mid-save

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, half_write_then_fail)
    assert seen_during_write == [b"old checkpoint"]
    assert path.read_bytes() == b"old checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.keras"]

    assert atomic_write(path, lambda temp: temp.write_bytes(b"new checkpoint")) == path
    assert path.read_bytes() == b"new checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.keras"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
