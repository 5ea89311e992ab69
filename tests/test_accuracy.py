"""benchmarks/accuracy.py: merging the runs of several results files (--report), and saving as it goes."""

from __future__ import annotations

import json

import pytest

from benchmarks.accuracy import main


def write_results(path, when, runs):
    """runs: (backend, seed, status, accuracy) of the default recipe, as files before
    recipes were recorded hold them, or (recipe, epochs, backend, seed, status, accuracy)."""
    rows = []
    for run in runs:
        recipe = {} if len(run) == 4 else {"recipe": run[0], "epochs": run[1]}
        backend, seed, status, accuracy = run[-4:]
        rows.append({**recipe, "backend": backend, "seed": seed, "status": status, "test_accuracy": accuracy,
                     **({"epochs": 20} if not recipe and status == "ok" else {})})
    path.write_text(json.dumps({"datetime": when, "runs": rows}))
    return str(path)


def test_report_merges_files_and_the_latest_run_of_a_recipe_and_seed_wins(tmp_path, capsys):
    older = write_results(tmp_path / "a.json", "2026-11-24T00:58:37+00:00",
                          [("jax", 0, "ok", 0.9900), ("torch", 0, "failed", None)])
    newer = write_results(tmp_path / "b.json", "2026-11-24T03:38:07+00:00",
                          [("default", 20, "jax", 0, "ok", 0.9920), ("default", 20, "jax", 1, "ok", 0.9930),
                           ("default", 20, "torch", 0, "ok", 0.9910), ("fast", 2, "jax", 0, "ok", 0.9901)])
    assert main(["--report", newer, older]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("| default", "| fast"))]
    assert rows == ["| default | 20 | jax | 0, 1 | 0.9925 | 0.9920 | 0.9930 |",
                    "| default | 20 | torch | 0 | 0.9910 | 0.9910 | 0.9910 |",
                    "| fast | 2 | jax | 0 | 0.9901 | 0.9901 | 0.9901 |"]


def test_report_on_a_file_that_is_not_results_fails_in_one_line(tmp_path, capsys):
    bad = tmp_path / "notes.json"
    bad.write_text("not json")
    assert main(["--report", str(bad)]) == 1
    assert capsys.readouterr().err.count("\n") == 1
    with pytest.raises(SystemExit) as exit_info:
        main(["--report", str(tmp_path / "missing.json")])
    assert exit_info.value.code == 2


def test_a_sweep_stopped_part_way_keeps_the_runs_it_finished(tmp_path, monkeypatch):
    import benchmarks.accuracy as accuracy

    def run_one(backend, seed, epochs, workdir, recipe):
        if seed == 1:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C during the second run
        return {"backend": backend, "seed": seed, "status": "ok", "test_accuracy": 0.99, "epochs": 1, "wall_s": 1.0}

    monkeypatch.setattr(accuracy, "run_one", run_one)
    with pytest.raises(KeyboardInterrupt):
        main(["--backends", "torch", "--seeds", "0,1", "--output-dir", str(tmp_path)])
    (saved,) = tmp_path.glob("accuracy-*.json")
    results = json.loads(saved.read_text())
    assert [(r["backend"], r["seed"]) for r in results["runs"]] == [("torch", 0)]
    assert results["summary"]["torch"]["seeds"] == [0]
