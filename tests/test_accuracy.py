"""benchmarks/accuracy.py: merging the runs of several results files (--report), and saving as it goes."""

from __future__ import annotations

import json

import pytest

from benchmarks.accuracy import main
from model.config import RUN_SETTINGS_ADDED, TrainConfig


def write_results(path, when, config: dict, runs):
    """A results file whose runs, (backend, seed, status, accuracy), trained with `config`
    (the file-level TrainConfig dict accuracy.py records)."""
    rows = [{"recipe": config.get("recipe"), "backend": backend, "seed": seed, "status": status,
             "test_accuracy": accuracy, "epochs": config["epochs"]} for backend, seed, status, accuracy in runs]
    path.write_text(json.dumps({"datetime": when, "recipe": config, "runs": rows}))
    return str(path)


# The default of 20 epochs without smoothing, as a file from before recipes records it:
# no recipe, warm-up or label smoothing fields (they ran RUN_SETTINGS_ADDED's values).
BEFORE_RECIPES = {name: value for name, value in TrainConfig(epochs=20, label_smoothing=0.0).to_dict().items()
                  if name not in RUN_SETTINGS_ADDED}
# The fast recipe as it was (batch 128, lr 1e-2) and as it is now.
OLD_FAST = TrainConfig().with_recipe("fast").replace(batch_size=96, lr=8e-3).to_dict()
FAST = TrainConfig().with_recipe("fast").to_dict()


def test_report_merges_files_and_the_latest_run_of_a_recipe_and_seed_wins(tmp_path, capsys):
    older = write_results(tmp_path / "a.json", "2026-11-24T00:58:37+00:00", BEFORE_RECIPES,
                          [("jax", 0, "ok", 0.9900), ("torch", 0, "failed", None)])
    # The same maths, recorded with the fields added since: pooled with the older file's.
    newer = write_results(tmp_path / "b.json", "2026-11-24T03:38:07+00:00", {**BEFORE_RECIPES, **RUN_SETTINGS_ADDED},
                          [("jax", 0, "ok", 0.9920), ("jax", 1, "ok", 0.9930), ("torch", 0, "ok", 0.9910)])
    fast = write_results(tmp_path / "c.json", "2026-11-24T04:00:00+00:00", FAST, [("jax", 0, "ok", 0.9901)])
    assert main(["--report", newer, fast, older]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("| default", "| fast"))]
    assert rows == ["| default | 20 | jax | 0, 1 | 0.9925 | 0.9920 | 0.9930 |",
                    "| default | 20 | torch | 0 | 0.9910 | 0.9910 | 0.9910 |",
                    "| fast | 2 | jax | 0 | 0.9901 | 0.9901 | 0.9901 |"]


def test_report_keeps_versions_of_a_recipe_apart_and_names_what_differs(tmp_path, capsys):
    """The fast recipe before and after its values changed, and the default before and after
    30 epochs with smoothing: same names, different maths, never pooled; the latest run of a
    seed replaces only a run of its own version."""
    files = [write_results(tmp_path / "old-fast.json", "2026-12-01T00:00:00+00:00", OLD_FAST,
                           [("jax", 0, "ok", 0.9901), ("jax", 1, "ok", 0.9903)]),
             write_results(tmp_path / "fast.json", "2026-12-02T00:00:00+00:00", FAST, [("jax", 0, "ok", 0.9910)]),
             write_results(tmp_path / "old-default.json", "2026-11-24T00:00:00+00:00", BEFORE_RECIPES,
                           [("jax", 0, "ok", 0.9920)]),
             write_results(tmp_path / "default.json", "2026-12-02T01:00:00+00:00", TrainConfig().to_dict(),
                           [("jax", 0, "ok", 0.9940)])]
    assert main(["--report", *files]) == 0
    rows = sorted(line for line in capsys.readouterr().out.splitlines() if line.startswith(("| default", "| fast")))
    assert rows == ["| default (epochs=20, label_smoothing=0.0) | 20 | jax | 0 | 0.9920 | 0.9920 | 0.9920 |",
                    "| default (epochs=30, label_smoothing=0.1) | 30 | jax | 0 | 0.9940 | 0.9940 | 0.9940 |",
                    "| fast (batch_size=128, lr=0.01) | 2 | jax | 0 | 0.9910 | 0.9910 | 0.9910 |",
                    "| fast (batch_size=96, lr=0.008) | 2 | jax | 0, 1 | 0.9902 | 0.9901 | 0.9903 |"]


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
