"""train.py's answers to bad input: one line, the right exit code, no traceback."""

from __future__ import annotations

import pytest

from tests.helpers import run_python


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
    assert defaults.batch_size == 128
    for flag, default in [("--epochs", defaults.epochs), ("--batch-size", defaults.batch_size),
                          ("--seed", defaults.seed), ("--lr", defaults.lr)]:
        assert flag in result.stdout and f"(default: {default})" in " ".join(result.stdout.split()), flag
