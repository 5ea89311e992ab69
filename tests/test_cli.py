"""train.py's answers to bad input: one line, the right exit code, no traceback."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import StartedPython, require_backend, run_python


def assert_one_line_error(result, exit_code: int, *fragments: str) -> str:
    assert result.returncode == exit_code, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("usage:")
             and not line.startswith("       ")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("how", ["flag", "env"])
def test_unknown_backend_names_the_valid_ones(how, tmp_path):
    args, env = (["--backend", "mxnet"], {}) if how == "flag" else ([], {"KERAS_BACKEND": "mxnet"})
    result = run_python(["train.py", *args, "--output-dir", tmp_path], env=env, timeout=60)
    assert_one_line_error(result, 2, "'mxnet'", "jax, tensorflow, torch")
    assert not any(tmp_path.iterdir())


def test_backend_not_installed_names_the_extra(tmp_path):
    # sys.modules[name] = None is how Python spells "this module is absent".
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['jax'] = None\n")
    result = run_python(["train.py", "--backend", "jax", "--output-dir", tmp_path / "out"],
                        env={"PYTHONPATH": str(tmp_path)}, timeout=60)
    assert_one_line_error(result, 2, "'jax' is not installed", "pip install", "'.[jax]'")


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--epochs", "0"], "--epochs: expected a positive integer, got 0"),
        (["--batch-size", "-8"], "--batch-size: expected a positive integer, got -8"),
        (["--batch-size", "many"], "--batch-size: expected a positive integer, got 'many'"),
        (["--lr", "0"], "--lr: expected a positive finite number"),
        (["--limit-train-batches", "0"], "--limit-train-batches: expected a positive integer"),
        (["--epohcs", "3"], "unrecognized arguments: --epohcs 3"),
        (["--step", "fast"], "--step: invalid choice: 'fast'"),
        (["--recipe", "turbo"], "--recipe: invalid choice: 'turbo' (choose from 'default', 'fast')"),
    ],
)
def test_bad_flags_are_argparse_errors(args, fragment):
    result = run_python(["train.py", *args], timeout=60)
    assert_one_line_error(result, 2, fragment)


def test_unwritable_output_dir_fails_before_training(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = run_python(["train.py", "--backend", "torch", "--output-dir", blocker / "run"], timeout=120)
    assert_one_line_error(result, 2, "cannot write to output dir", str(blocker / "run"), "--output-dir")
    assert "data:" not in result.stdout and "step" not in result.stdout
    assert blocker.read_text() == "not a folder"


def test_help_states_defaults():
    from model.config import TrainConfig

    defaults = TrainConfig()
    result = run_python(["train.py", "--help"], timeout=60)
    assert result.returncode == 0
    for flag, default in [("--epochs", defaults.epochs), ("--batch-size", defaults.batch_size),
                          ("--seed", defaults.seed), ("--lr", defaults.lr)]:
        assert flag in result.stdout and f"(default: {default})" in " ".join(result.stdout.split()), flag


# ----------------------------------------------------------------------------- --data


def _write_npz(path, **changes):
    """A Keras-style mnist.npz of the right shapes (zeros but one white pixel, compressed:
    a few KB), with `changes` applied."""
    x_train, x_test = np.zeros((60_000, 28, 28), np.uint8), np.zeros((10_000, 28, 28), np.uint8)
    x_train[0, 0, 0] = x_test[0, 0, 0] = 255
    arrays = {"x_train": x_train, "y_train": np.zeros(60_000, np.uint8), "x_test": x_test,
              "y_test": np.zeros(10_000, np.uint8), **changes}
    np.savez_compressed(path, **arrays)
    return path


def _bad_data(tmp_path):
    """name -> (the --data path, a fragment the error must hold)."""
    (tmp_path / "empty-folder").mkdir()
    (tmp_path / "garbage.gz").write_bytes(b"garbage, not MNIST")
    (tmp_path / "random.npz").write_bytes(np.random.default_rng(0).bytes(4096))
    return {
        "missing": (tmp_path / "no-such-mnist.npz", "does not exist"),
        "no-idx-files": (tmp_path / "empty-folder", "has no train-images-idx3-ubyte"),
        "garbage-file": (tmp_path / "garbage.gz", "is not an .npz file"),
        "random-npz": (tmp_path / "random.npz", "is not an .npz file"),
        "wrong-shape": (_write_npz(tmp_path / "shape.npz", x_test=np.zeros((10, 28, 28), np.uint8)),
                        "x_test has shape (10, 28, 28), expected (10000, 28, 28)"),
        "wrong-dtype": (_write_npz(tmp_path / "dtype.npz", y_train=np.zeros(60_000, np.int64)),
                        "y_train has dtype int64, expected uint8"),
        "wrong-labels": (_write_npz(tmp_path / "labels.npz"), "y_train label counts per class are (60000, 0,"),
    }


@pytest.fixture(scope="module")
def bad_data_runs(tmp_path_factory):
    """name -> (finished train.py process, --data path, fragment, output dir): one run per
    bad input, all started at once (each fails before training; on torch, the quickest
    to import: the data checks do not depend on the backend)."""
    require_backend("torch")
    root = tmp_path_factory.mktemp("bad-data")
    started = {}
    for name, (path, fragment) in _bad_data(root).items():
        output = root / f"run-{name}"
        started[name] = (StartedPython(["train.py", "--backend", "torch", "--data", path, "--output-dir", output],
                                       None, root / f"logs-{name}"), path, fragment, output)
    return {name: (process.wait(300), path, fragment, output)
            for name, (process, path, fragment, output) in started.items()}


@pytest.mark.parametrize("name", ["missing", "no-idx-files", "garbage-file", "random-npz", "wrong-shape",
                                  "wrong-dtype", "wrong-labels"])
def test_bad_data_path_is_refused_without_fallback(name, bad_data_runs):
    """A --data path the user named is used or refused: one line naming it and the
    problem, exit 1, no run.json, and no other source (the cache, a download) tried."""
    result, path, fragment, output = bad_data_runs[name]
    line = assert_one_line_error(result, 1, "train.py: error: cannot use MNIST at", str(path), fragment)
    assert "allow_pickle" not in result.stderr
    assert "[data]" not in result.stderr  # no source after the path was tried
    assert not (output / "run.json").exists() and not (output / "model.keras").exists()
    print(line)
