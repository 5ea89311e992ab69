"""A whole benchmark run: the matrix of cells, one results JSON, its table and chart.

`run_suite(cells, mode, ...)` runs every cell in its own process (benchmarks/cells.py),
writes `<output_dir>/<UTC time>-<commit>.json` atomically, then draws the table and
chart from that file alone (benchmarks/report.py), so they always match it.
"""

from __future__ import annotations

import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.cells import REPO, Cell, run_matrix
from benchmarks.machine import commit_info, describe_machine, package_versions
from benchmarks.report import add_ratios, load_runs, make_readable, write_report
from model.config import TrainConfig

# full: two epochs over the 55,000-image training split, every step after the first 20
# timed (about 840 at batch 128), validating after each epoch as train.py does, test
# accuracy on all 10,000 test images. quick: one epoch of 25 batches, 20 of them timed,
# no validation pass, test accuracy on the first 2,000 test images.
MODES = {
    "full": {"epochs": 2, "limit_train_batches": None, "warmup_steps": 20, "validate": True, "test_images": None,
             "progress_every": 100, "timeout_s": 900},
    "quick": {"epochs": 1, "limit_train_batches": 25, "warmup_steps": 5, "validate": False, "test_images": 2000,
              "progress_every": 0, "timeout_s": 180},
}
# TrainConfig fields a run or a cell sets itself rather than taking the default.
PER_CELL_CONFIG = ("epochs", "batch_size", "limit_train_batches", "dry_run", "step", "pooling", "output_dir", "resume")
DEFAULT_RESULTS_DIR = REPO / "benchmarks" / "results"


def run_settings(mode: str, cells: list[Cell], timeout_s: float) -> dict:
    defaults = TrainConfig()
    return {
        "mode": mode,
        **{key: value for key, value in MODES[mode].items() if key != "timeout_s"},
        "timeout_s": timeout_s,
        "batch_sizes": sorted({cell.batch_size for cell in cells}),
        "backends": list(dict.fromkeys(cell.backend for cell in cells)),
        "devices": list(dict.fromkeys(cell.device for cell in cells)),
        "paths": list(dict.fromkeys(cell.path for cell in cells)),
        # TrainConfig's defaults, which every cell uses (lr, seed, augmentation, split...).
        "train_config": {key: value for key, value in defaults.to_dict().items() if key not in PER_CELL_CONFIG},
        "lr_schedule": "cosine decay from lr to 0 over epochs * steps_per_epoch",
        "step_timing": "end of one step to the end of the next, after a device sync; first warmup_steps excluded",
    }


def tf32_by_backend(cells: list[dict]) -> dict:
    """backend -> device -> the TF32 settings its cells ran with (from the first ok cell)."""
    settings = {}
    for cell in cells:
        if cell["status"] == "ok" and cell.get("tf32") is not None:
            settings.setdefault(cell["backend"], {}).setdefault(cell["device"], cell["tf32"])
    return settings


def results_stem(output_dir: Path, when: datetime, commit: dict) -> Path:
    short = commit.get("short") or "nocommit"
    return output_dir / f"{when.strftime('%Y%m%dT%H%M%SZ')}-{short}{'-dirty' if commit.get('dirty') else ''}"


def run_suite(cells: list[Cell], mode: str = "full", timeout_s: float | None = None,
              output_dir: str | Path | None = None, stream=None) -> tuple[Path, str]:
    """Run `cells`; returns the results JSON's path and the Markdown table."""
    from model.checkpoint import write_json

    stream = stream or sys.stderr
    timeout_s = timeout_s or MODES[mode]["timeout_s"]
    machine, commit, versions = describe_machine(), commit_info(), package_versions()
    when = datetime.now(timezone.utc)
    output_dir = Path(output_dir) if output_dir else DEFAULT_RESULTS_DIR / machine["slug"]
    settings = run_settings(mode, cells, timeout_s)
    stream.write(f"{len(cells)} cells, {mode} mode, on {machine['slug']} at commit {commit.get('short')}"
                 f"{' (dirty)' if commit.get('dirty') else ''}; results go to {output_dir}\n")
    started = time.perf_counter()
    results = add_ratios(run_matrix(cells, settings, timeout_s, stream=stream))
    settings["tf32"] = tf32_by_backend(results)
    settings["wall_s"] = round(time.perf_counter() - started, 1)
    if versions.get("cuda") is None:
        versions["cuda"] = next((cell["cuda"] for cell in results if cell.get("cuda")), None)
    run = {
        "benchmark": "mnist-cnn-backends",
        "machine": machine,
        "commit": commit,
        "datetime": when.isoformat(timespec="seconds").replace("+00:00", "Z"),
        "versions": versions,
        "settings": settings,
        "cells": results,
    }
    stem = results_stem(output_dir, when, commit)
    json_path = make_readable(write_json(stem.with_suffix(".json"), run))
    table, markdown, chart = write_report(load_runs([json_path]), stem)
    stream.write(f"{len(cells)} cells in {settings['wall_s']:.0f} s; wrote {json_path}, {markdown.name}, {chart.name}\n")
    return json_path, table
