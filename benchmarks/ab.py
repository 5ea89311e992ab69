"""New over old from an interleaved A/B: two commits' compare.py results, side by side.

    python benchmarks/ab.py OLD NEW FOLDER [FOLDER ...]

OLD and NEW are commits, as the short ids compare.py writes into each results file (its
name and its "commit" record); every compare.py JSON file under the folders that one of
them wrote is read, in name order. Run the two sides from their own git worktrees, in
turns (old, new, old, new), so that the host's drift falls on both.

Per backend, device and batch size: keras-fit's and the hand-written framework loop's ms/step over all
rounds, Keras' overhead (keras-fit over the framework per round, from the pair that ran side
by side in one run) and the seconds to the target per recipe. New over old is the ratio of
the two sides' medians with a 95% percentile-bootstrap CI, each side's rounds resampled on
their own (unpaired: the sides ran in different processes and minutes;
benchmarks/confidence.py ratio_of_medians_ci). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repository's packages

from benchmarks.confidence import ratio_of_medians_ci  # noqa: E402
from benchmarks.summary import paired_rounds  # noqa: E402

TRAINING_PATHS = ("keras-fit", "framework")
TIME_TO_ACCURACY = "time-to-accuracy"


def runs_of(commit: str, folders: list[Path]) -> list[dict]:
    """Every compare.py results file under `folders` written at `commit`, in name order."""
    runs = []
    for path in sorted(path for folder in folders for path in folder.rglob("*.json")):
        run = json.loads(path.read_text())
        if isinstance(run, dict) and isinstance(run.get("commit"), dict) and isinstance(run.get("cells"), list):
            if commit in (run["commit"].get("short"), run["commit"].get("id")):
                runs.append(run)
    return runs


def ok_rounds(cell: dict) -> list[dict]:
    return [result for result in cell["rounds"] if result.get("status") == "ok"]


def figures(runs: list[dict]) -> dict:
    """{(backend, device, batch, figure): [one value per round]} over `runs`."""
    values = defaultdict(list)
    for run in runs:
        # Cells that ran (a skipped one, a GPU's on a CPU machine, has no figures).
        cells = {(cell["backend"], f"{cell['device']} b{cell['batch_size']}", cell["path"], cell.get("recipe")): cell
                 for cell in run["cells"] if cell.get("device_count", 1) == 1 and ok_rounds(cell)}
        for (backend, device, path, recipe), cell in cells.items():
            if path in TRAINING_PATHS:
                values[backend, device, f"{path} ms/step"] += [r["step_ms_mean"] for r in ok_rounds(cell)]
            elif path == TIME_TO_ACCURACY:
                values[backend, device, f"seconds to {cell['target_accuracy']:.1%}, {recipe} recipe"] += [
                    r["seconds_to_target"] for r in ok_rounds(cell) if r.get("reached_target")]
            if path == "keras-fit" and (backend, device, "framework", recipe) in cells:
                pairs = paired_rounds(cell, cells[backend, device, "framework", recipe], "step_ms_mean")
                values[backend, device, "Keras overhead (keras-fit / framework, per round)"] += [
                    keras / framework for keras, framework in pairs]
    return values


def table(old_commit: str, new_commit: str, folders: list[Path]) -> list[str]:
    old_runs, new_runs = runs_of(old_commit, folders), runs_of(new_commit, folders)
    for commit, runs in ((old_commit, old_runs), (new_commit, new_runs)):
        if not runs:
            raise ValueError(f"no compare.py results file of commit {commit!r} under "
                             f"{', '.join(map(str, folders))}; name the short commit compare.py wrote into the files")
    old, new = figures(old_runs), figures(new_runs)
    lines = ["| backend | device, batch | figure | old: median, rounds | new: median, rounds | new / old [95% CI] |",
             "| --- | --- | --- | ---: | ---: | ---: |"]
    for key in sorted(old.keys() & new.keys()):
        if not old[key] or not new[key]:
            continue
        middle, low, high = ratio_of_medians_ci(old[key], new[key])
        interval = f"[{low:.3f}-{high:.3f}]" if low is not None else "(one round: no CI)"
        lines.append(f"| {' | '.join(key)} | {np.median(old[key]):.3f}, {len(old[key])} | "
                     f"{np.median(new[key]):.3f}, {len(new[key])} | {middle:.3f} {interval} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old", help="the old side's commit (short id, as in the results files' names)")
    parser.add_argument("new", help="the new side's commit")
    parser.add_argument("folders", nargs="+", type=Path, help="folders holding both sides' compare.py JSON files")
    args = parser.parse_args(argv)
    missing = [str(folder) for folder in args.folders if not folder.is_dir()]
    if missing:
        parser.error(f"not a folder: {', '.join(missing)}")
    try:
        print("\n".join(table(args.old, args.new, args.folders)))
    except ValueError as error:
        print(f"ab.py: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
