"""benchmarks/accuracy.py --report: merging the runs of several results files."""

from __future__ import annotations

import json

import pytest

from benchmarks.accuracy import main


def write_results(path, when, runs):
    path.write_text(json.dumps({"datetime": when, "runs": [
        {"backend": backend, "seed": seed, "status": status, "test_accuracy": accuracy}
        for backend, seed, status, accuracy in runs]}))
    return str(path)


def test_report_merges_files_and_the_latest_run_of_a_seed_wins(tmp_path, capsys):
    older = write_results(tmp_path / "a.json", "2026-11-24T00:58:37+00:00",
                          [("jax", 0, "ok", 0.9900), ("torch", 0, "failed", None)])
    newer = write_results(tmp_path / "b.json", "2026-11-24T03:38:07+00:00",
                          [("jax", 0, "ok", 0.9920), ("jax", 1, "ok", 0.9930), ("torch", 0, "ok", 0.9910)])
    assert main(["--report", newer, older]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| jax") or line.startswith("| torch")]
    assert rows == ["| jax | 0, 1 | 0.9925 | 0.9920 | 0.9930 |", "| torch | 0 | 0.9910 | 0.9910 | 0.9910 |"]


def test_report_on_a_file_that_is_not_results_fails_in_one_line(tmp_path, capsys):
    bad = tmp_path / "notes.json"
    bad.write_text("not json")
    assert main(["--report", str(bad)]) == 1
    assert capsys.readouterr().err.count("\n") == 1
    with pytest.raises(SystemExit) as exit_info:
        main(["--report", str(tmp_path / "missing.json")])
    assert exit_info.value.code == 2
