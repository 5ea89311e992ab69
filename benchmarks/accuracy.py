"""Test accuracy of a train.py recipe: 3 seeds on every backend.

    python benchmarks/accuracy.py                       # 3 seeds x 3 backends, sequentially
    python benchmarks/accuracy.py --recipe fast         # the 2-epoch recipe (model/config.py RECIPES)
    python benchmarks/accuracy.py --seeds 0 --backends jax --epochs 1   # a quick look
    python benchmarks/accuracy.py --report benchmarks/results/*/accuracy-*.json  # merge runs

Each run is `train.py --backend B --seed S --recipe R` in its own process (one backend per process),
run one after another so they do not compete for cores. Writes
benchmarks/results/<machine>/accuracy-<UTC time>.json with
`recipe` (the whole TrainConfig the runs trained with), `runs: [{recipe, backend, seed,
test_accuracy, epochs, wall_s, ...}]` and the mean per recipe and backend. --report pools
runs by the run settings their files recorded, so a recipe whose values changed between
files shows one row per version.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.machine import commit_info, describe_machine, machine_slug, package_versions  # noqa: E402
from model.arguments import comma_list, positive_int  # noqa: E402
from model.checkpoint import write_json  # noqa: E402
from model.config import BACKENDS, RECIPES, TrainConfig, recorded_run_settings, settings_label  # noqa: E402


def run_one(backend: str, seed: int, epochs: int | None, workdir: Path, recipe: str = "default") -> dict:
    output = workdir / f"{recipe}-{backend}-seed{seed}"
    command = [sys.executable, str(REPO / "train.py"), "--backend", backend, "--seed", str(seed),
               "--recipe", recipe, "--output-dir", str(output)]
    if epochs:
        command += ["--epochs", str(epochs)]
    commit = commit_info()  # per run: a long sweep can span commits
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or ["no output"])[-1]
        if result.returncode < 0:
            reason = f"killed by signal {-result.returncode}; last output: {reason}"
        return {"recipe": recipe, "backend": backend, "seed": seed, "status": "failed", "reason": reason, "wall_s": wall, "commit": commit}
    run = json.loads((output / "run.json").read_text())
    return {
        "recipe": run["config"].get("recipe", "default"),
        "backend": backend,
        "seed": seed,
        "status": "ok",
        "test_accuracy": run["test_accuracy"],
        "test_loss": run["test_loss"],
        "epochs": run["config"]["epochs"],
        "batch_size": run["config"]["batch_size"],
        "steps_per_epoch": run.get("steps_per_epoch"),
        "wall_s": wall,
        "step_ms_median": run["step_ms_median"],
        "device": run["device"],
        "commit": commit,
    }


def summarize(runs: list[dict]) -> dict:
    """backend -> mean, min and max test accuracy over its successful runs, and their seeds."""
    summary = {}
    for backend in BACKENDS:
        ok = [r for r in runs if r["backend"] == backend and r["status"] == "ok"]
        if ok:
            accuracies = [r["test_accuracy"] for r in ok]
            summary[backend] = {"mean_test_accuracy": sum(accuracies) / len(accuracies), "runs": len(ok),
                                "seeds": sorted(r["seed"] for r in ok), "min": min(accuracies), "max": max(accuracies)}
    return summary


def versions_of(runs: list[dict]) -> dict[tuple, list[dict]]:
    """The runs grouped by the run settings they trained with (each run's "settings", those
    its file recorded: recorded_run_settings), in first-seen order."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault(tuple(run["settings"].items()), []).append(run)
    return groups


def print_summary(runs: list[dict]) -> None:
    """One row per version of a recipe (its run settings) and backend; a recipe whose
    values changed between files shows the settings that differ next to its name."""
    print("\n| recipe | epochs | backend | seeds | mean test accuracy | min | max |\n| --- | --- | --- | --- | --- | --- | --- |")
    groups = versions_of([run for run in runs if run["status"] == "ok"])
    for key in sorted(groups, key=lambda key: (dict(key)["recipe"], str(key))):
        settings = dict(key)
        versions = [dict(other) for other in groups if dict(other)["recipe"] == settings["recipe"]]
        label = settings_label(settings["recipe"], settings, versions)
        for backend, row in summarize(groups[key]).items():
            seeds = ", ".join(map(str, row["seeds"]))
            print(f"| {label} | {settings['epochs']} | {backend} | {seeds} | {row['mean_test_accuracy']:.4f} "
                  f"| {row['min']:.4f} | {row['max']:.4f} |")


def report(paths: list[Path]) -> int:
    """Merge the runs of several results files: the latest run of each version of a recipe
    (the run settings its file recorded), backend and seed wins."""
    files = []
    for path in paths:
        try:
            content = json.loads(Path(path).read_text())
            settings = recorded_run_settings(content["recipe"])
            files.append((content["datetime"], [{**run, "settings": settings} for run in content["runs"]]))
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            print(f"accuracy.py: error: {path} is not an accuracy results file ({error!r})", file=sys.stderr)
            return 1
    latest = {}
    for _, runs in sorted(files, key=lambda item: item[0]):
        for run in runs:
            if run["status"] == "ok":
                latest[(tuple(run["settings"].items()), run["backend"], run["seed"])] = run
    if not latest:
        print("accuracy.py: error: no successful run in " + ", ".join(map(str, paths)), file=sys.stderr)
        return 1
    print_summary(list(latest.values()))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", type=comma_list(choices=BACKENDS), default=list(BACKENDS), help=f"backends to run (default: {','.join(BACKENDS)})")
    parser.add_argument("--seeds", type=comma_list(int), default=[0, 1, 2], help="seeds to run (default: 0,1,2)")
    parser.add_argument("--recipe", choices=tuple(RECIPES), default=TrainConfig.recipe,
                        help=f"train.py --recipe: the named settings to run (model/config.py RECIPES; default: {TrainConfig.recipe})")
    parser.add_argument("--epochs", type=positive_int, default=None,
                        help="override the recipe's epochs (default: the recipe's own)")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="where the JSON goes (default: benchmarks/results/<machine>/)")
    parser.add_argument("--report", type=Path, nargs="+", metavar="FILE",
                        help="run nothing: merge these results files into one table")
    args = parser.parse_args(argv)
    if args.report:
        missing = [str(p) for p in args.report if not p.is_file()]
        if missing:
            parser.error(f"no such results file: {', '.join(missing)}")
        return report(args.report)

    machine = describe_machine()
    output_dir = args.output_dir or REPO / "benchmarks" / "results" / machine_slug(machine)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = output_dir / f"accuracy-{stamp}.json"
    runs = []
    total = len(args.backends) * len(args.seeds)

    # The whole TrainConfig the runs train with: --report pools runs by its run settings.
    config = TrainConfig().with_recipe(args.recipe).replace(**({"epochs": args.epochs} if args.epochs else {}))

    def save() -> None:
        # After every run, atomically: a sweep stopped part-way keeps the runs it finished.
        write_json(path, {
            "machine": machine,
            "commit": commit_info(),
            "datetime": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": package_versions(),
            "recipe": config.to_dict(),
            "runs": runs,
            "summary": summarize(runs),
        })

    with tempfile.TemporaryDirectory(prefix="accuracy-") as workdir:
        for backend in args.backends:
            for seed in args.seeds:
                print(f"[{len(runs) + 1}/{total}] {args.recipe} recipe, {backend} seed {seed} ...", flush=True)
                run = run_one(backend, seed, args.epochs, Path(workdir), args.recipe)
                runs.append(run)
                save()
                shown = f"{run['test_accuracy']:.4f}" if run["status"] == "ok" else f"failed: {run['reason']}"
                print(f"    test accuracy {shown} in {run['wall_s']:.0f} s; saved in {path}", flush=True)
    print_summary([{**run, "settings": recorded_run_settings(config.to_dict())} for run in runs])
    print(f"\nwrote {path}")
    return 0 if all(r["status"] == "ok" for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
