"""Tables and charts drawn from benchmark results files, never typed by hand.

`load_runs(paths)` reads one or more results JSON files, `merge_cells(runs)` puts their
cells together (a CPU run and a GPU run, say), `add_ratios(cells)` derives the two
ratio columns, `markdown_report(runs, cells)` is the table and `draw_chart(cells, path)`
the PNG. benchmarks/compare.py calls these after a run and again for `--report FILE...`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from benchmarks.measure import DEVICES, PATHS
from model.config import BACKENDS


class ResultsFileError(Exception):
    """A results file could not be read; the message names it and says why."""


# ----------------------------------------------------------------------------- loading


def load_runs(paths) -> list[dict]:
    """The results files at `paths`, each checked to be a benchmark run."""
    runs = []
    for path in map(Path, paths):
        try:
            run = json.loads(path.read_text())
        except FileNotFoundError:
            raise ResultsFileError(f"results file {str(path)!r} does not exist") from None
        except (OSError, UnicodeDecodeError) as error:
            raise ResultsFileError(f"cannot read results file {str(path)!r} ({getattr(error, 'strerror', None) or error})") from None
        except json.JSONDecodeError as error:
            raise ResultsFileError(f"results file {str(path)!r} is not JSON ({error})") from None
        if not isinstance(run, dict) or not isinstance(run.get("cells"), list) or not isinstance(run.get("machine"), dict):
            raise ResultsFileError(f"{str(path)!r} is not a benchmark results file (no 'machine' and 'cells'); "
                                   "pass a JSON written by benchmarks/compare.py")
        for index, cell in enumerate(run["cells"]):
            cell = cell if isinstance(cell, dict) else {}
            missing = [field for field in ("backend", "device", "path", "batch_size", "status") if field not in cell]
            if missing:
                raise ResultsFileError(f"{str(path)!r}: cell {index} lacks {', '.join(missing)}")
        run["source"] = path.name
        runs.append(run)
    return runs


def _order(cell: dict) -> tuple:
    def position(values, value):
        return values.index(value) if value in values else len(values)

    return (cell["batch_size"], position(DEVICES, cell["device"]), position(BACKENDS, cell["backend"]),
            position(PATHS, cell["path"]), cell.get("machine") or "")


def merge_cells(runs: list[dict]) -> list[dict]:
    """The cells of all runs, each tagged with its machine, in matrix order. A skipped cell
    gives way to a cell of the same backend, device, path and batch size that ran in
    another file: a CPU-only run's skipped GPU cells do not hide a GPU run's."""
    cells = [{**cell, "machine": run["machine"].get("slug"), "machine_cores": run["machine"].get("cores")}
             for run in runs for cell in run["cells"]]
    ran = {(c["backend"], c["device"], c["path"], c["batch_size"]) for c in cells if c["status"] != "skipped"}
    kept = [c for c in cells if c["status"] != "skipped" or (c["backend"], c["device"], c["path"], c["batch_size"]) not in ran]
    if len(runs) > 1:
        # One skipped row per cell is enough when several runs skipped it.
        seen, unique = set(), []
        for cell in kept:
            key = (cell["backend"], cell["device"], cell["path"], cell["batch_size"], cell["status"])
            if cell["status"] == "skipped" and key in seen:
                continue
            seen.add(key)
            unique.append(cell)
        kept = unique
    return sorted(kept, key=_order)


def add_ratios(cells: list[dict]) -> list[dict]:
    """Set ratio_to_framework (median step / the framework cell's of the same machine,
    backend, device and batch size) and ratio_to_fastest (/ the fastest ok cell of the
    same machine, device and batch size). None where there is nothing to compare with."""

    def median(cell):
        value = cell.get("step_ms_median")
        return value if cell["status"] == "ok" and isinstance(value, (int, float)) and value > 0 else None

    frameworks, fastest = {}, {}
    for cell in cells:
        if median(cell) is None:
            continue
        group = (cell.get("machine"), cell["device"], cell["batch_size"])
        if cell["path"] == "framework":
            frameworks[(*group, cell["backend"])] = median(cell)
        fastest[group] = min(fastest.get(group, math.inf), median(cell))
    for cell in cells:
        value = median(cell)
        group = (cell.get("machine"), cell["device"], cell["batch_size"])
        framework = frameworks.get((*group, cell["backend"]))
        cell["ratio_to_framework"] = value / framework if value is not None and framework else None
        cell["ratio_to_fastest"] = value / fastest[group] if value is not None and group in fastest else None
    return cells


# ----------------------------------------------------------------------------- table

COLUMNS = ("backend", "device", "path", "batch", "status", "first step s", "step ms median", "p10–p90",
           "samples/s", "epoch s", "test acc", "peak RSS MB", "peak device MB", "× framework", "× fastest",
           "steps timed", "note")


def _number(value, digits: int = 2, thousands: bool = False) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if thousands:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def _milliseconds(value) -> str:
    if value is None:
        return "–"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def optimizer_differences(cells: list[dict]) -> dict[int, str]:
    """Cell index -> a note, for ok cells whose optimizer settings differ from the
    keras-fit cell's of the same machine, backend, device and batch size: their step
    times and accuracies then compare different work."""

    def group(cell):
        return cell.get("machine"), cell["backend"], cell["device"], cell["batch_size"]

    reference = {group(c): c["optimizer"] for c in cells
                 if c["status"] == "ok" and c["path"] == "keras-fit" and c.get("optimizer")}
    notes = {}
    for index, cell in enumerate(cells):
        expected, actual = reference.get(group(cell)), cell.get("optimizer")
        if cell["status"] == "ok" and expected and actual and actual != expected:
            keys = sorted(set(expected) | set(actual))
            notes[index] = "optimizer differs: " + ", ".join(
                f"{key} {actual.get(key)} (keras-fit: {expected.get(key)})" for key in keys if actual.get(key) != expected.get(key))
    return notes


def busy_machine_note(cell: dict) -> str | None:
    """A note when the 1-minute load average around a cell exceeded the machine's cores by
    more than the cell's own share: other work then competed with it, and its times (torch's
    above all, whose threads wait on each other) are not to be trusted."""
    loads = [value for value in (cell.get("load_average") or []) if value is not None]
    cores = cell.get("machine_cores")
    if cell["status"] != "ok" or not loads or not cores or max(loads) <= cores + 0.5:
        return None
    return f"busy machine: load {max(loads):.1f} on {cores} cores"


def table_row(cell: dict, show_machine: bool = False, note: str | None = None) -> list[str]:
    """One Markdown row; a failed or skipped cell shows dashes and its reason."""
    ok = cell["status"] == "ok"
    spread = f"{_milliseconds(cell.get('step_ms_p10'))}–{_milliseconds(cell.get('step_ms_p90'))}" if ok else "–"
    ratio = lambda value: f"{value:.2f}×" if value is not None else "–"  # noqa: E731
    row = [
        cell["backend"], cell["device"], cell["path"], str(cell["batch_size"]), cell["status"],
        _number(cell.get("first_step_s")), _milliseconds(cell.get("step_ms_median")) if ok else "–", spread,
        _number(cell.get("samples_per_s"), thousands=True), _number(cell.get("epoch_s"), 1),
        _number(cell.get("test_accuracy"), 4), _number(cell.get("peak_rss_mb"), thousands=True),
        _number(cell.get("peak_device_mb"), thousands=True), ratio(cell.get("ratio_to_framework")),
        ratio(cell.get("ratio_to_fastest")), str(cell.get("timed_steps") or "–"), _escape(cell.get("reason") or note or ""),
    ]
    return ([cell.get("machine") or "–"] if show_machine else []) + row


def markdown_table(cells: list[dict]) -> str:
    show_machine = len({cell.get("machine") for cell in cells}) > 1
    columns = (["machine"] if show_machine else []) + list(COLUMNS)
    numeric = {"batch", "first step s", "step ms median", "p10–p90", "samples/s", "epoch s", "test acc", "peak RSS MB",
               "peak device MB", "× framework", "× fastest", "steps timed"}
    lines = ["| " + " | ".join(columns) + " |",
             "|" + "|".join("---:" if column in numeric else "---" for column in columns) + "|"]
    notes = optimizer_differences(cells)
    for index, cell in enumerate(cells):
        note = "; ".join(filter(None, (notes.get(index), busy_machine_note(cell))))
        lines.append("| " + " | ".join(table_row(cell, show_machine, note)) + " |")
    return "\n".join(lines)


def run_description(run: dict) -> list[str]:
    machine, commit, settings = run["machine"], run.get("commit") or {}, run.get("settings") or {}
    gpu = f"{machine['gpu']} (driver {machine.get('gpu_driver')})" if machine.get("gpu") else "no GPU"
    dirty = " (dirty)" if commit.get("dirty") else ""
    limit = settings.get("limit_train_batches")
    shape = (f"{settings.get('epochs')} epoch(s) of {'the full training split' if not limit else f'{limit} batches'}, "
             f"test accuracy on {settings.get('test_images') or 'all 10,000'} test images")
    versions = ", ".join(f"{name} {version}" for name, version in (run.get("versions") or {}).items() if version)
    loads = [value for cell in run["cells"] for value in (cell.get("load_average") or []) if value is not None]
    load = f", 1-minute load average {min(loads):.1f}–{max(loads):.1f} while cells ran" if loads else ""
    flags = sorted({(cell["backend"], variable, value) for cell in run["cells"]
                    for variable, value in (cell.get("framework_flags") or {}).items() if value})
    lines = [
        f"- results: `{run.get('source', '?')}`, {settings.get('mode', '?')} mode ({shape}, "
        f"first {settings.get('warmup_steps')} steps warm-up), {run.get('datetime', '?')}",
        f"- machine: `{machine.get('slug')}`: {machine.get('cpu')}, {machine.get('cores')} cores, "
        f"{machine.get('ram_gb')} GB RAM, {gpu}{load}",
        f"- commit: {commit.get('short') or commit.get('id') or '?'}{dirty}; versions: {versions}",
    ]
    if flags:
        lines.append("- framework flags: " + "; ".join(f"{backend} `{variable}={value}`" for backend, variable, value in flags))
    return lines


LEGEND = (
    "Step time: from the end of one training step to the end of the next (data preparation "
    "included), the device synced before every clock read, warm-up steps left out; p10–p90 is "
    "the spread. epoch s: the second epoch's training steps (validation excluded). "
    "× framework: median step over the hand-written framework baseline's on the same backend, "
    "device and batch size; × fastest: over the fastest ok cell of the same device and batch size."
)


def markdown_report(runs: list[dict], cells: list[dict]) -> str:
    lines = ["# MNIST CNN: Keras paths vs hand-written framework baselines", ""]
    for run in runs:
        lines += run_description(run)
    lines += ["", markdown_table(cells), "", LEGEND, ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- chart


def draw_chart(cells: list[dict], path: str | os.PathLike, title: str = "") -> Path:
    """Median step time (p10–p90 whiskers) per backend and path, CPU and GPU side by side,
    one row per batch size, and test accuracy per backend in a last panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from model.checkpoint import atomic_write

    batch_sizes = sorted({cell["batch_size"] for cell in cells}) or [0]
    backends = [b for b in BACKENDS if any(c["backend"] == b for c in cells)] or list(BACKENDS)
    paths = [p for p in PATHS if any(c["path"] == p for c in cells)] or list(PATHS)
    colors = dict(zip(PATHS, ("tab:blue", "tab:orange", "tab:green", "tab:gray")))
    figure, axes = plt.subplots(len(batch_sizes), 3, figsize=(16, 4.2 * len(batch_sizes)), squeeze=False)
    width = 0.8 / len(paths)
    x = np.arange(len(backends))
    for row, batch_size in enumerate(batch_sizes):
        for column, device in enumerate(DEVICES):
            axis = axes[row][column]
            ok = [c for c in cells if c["device"] == device and c["batch_size"] == batch_size and c["status"] == "ok"]
            axis.set_title(f"{device.upper()} step time, batch {batch_size}")
            if not ok:
                reasons = sorted({c["reason"] for c in cells if c["device"] == device and c["batch_size"] == batch_size
                                  and c.get("reason")})
                note = "no cells ran" + (f":\n{reasons[0][:70]}" if reasons else "")
                axis.text(0.5, 0.5, note, ha="center", va="center", transform=axis.transAxes, wrap=True)
                axis.set_xticks([])
                axis.set_yticks([])
                continue
            for index, path_name in enumerate(paths):
                medians, low, high = [], [], []
                for backend in backends:
                    match = [c for c in ok if c["backend"] == backend and c["path"] == path_name]
                    cell = match[0] if match else None
                    medians.append(cell["step_ms_median"] if cell else np.nan)
                    low.append(cell["step_ms_median"] - cell["step_ms_p10"] if cell else 0)
                    high.append(cell["step_ms_p90"] - cell["step_ms_median"] if cell else 0)
                positions = x + (index - (len(paths) - 1) / 2) * width
                axis.bar(positions, medians, width, yerr=[low, high], capsize=2, label=path_name,
                         color=colors.get(path_name))
            axis.set_xticks(x, backends)
            axis.set_ylabel("median step (ms)")
            axis.grid(axis="y", alpha=0.3)
            axis.legend(fontsize=8)
        axis = axes[row][2]
        axis.set_title(f"test accuracy, batch {batch_size}")
        ok = [c for c in cells if c["batch_size"] == batch_size and c["status"] == "ok" and c.get("test_accuracy") is not None]
        series = [(device, path_name) for device in DEVICES for path_name in paths
                  if any(c["device"] == device and c["path"] == path_name for c in ok)]
        bar_width = 0.8 / max(len(series), 1)
        for index, (device, path_name) in enumerate(series):
            values = []
            for backend in backends:
                match = [c for c in ok if c["backend"] == backend and c["device"] == device and c["path"] == path_name]
                values.append(match[0]["test_accuracy"] if match else np.nan)
            positions = x + (index - (len(series) - 1) / 2) * bar_width
            axis.bar(positions, values, bar_width, label=f"{path_name} ({device})", color=colors.get(path_name),
                     hatch="//" if device == "gpu" else None, edgecolor="white")
        if ok:
            lowest = min(c["test_accuracy"] for c in ok)
            axis.set_ylim(max(0.0, lowest - 0.05), 1.0)
            axis.legend(fontsize=7)
        axis.set_xticks(x, backends)
        axis.set_ylabel("test accuracy")
        axis.grid(axis="y", alpha=0.3)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    path = Path(path)
    atomic_write(path, lambda temp: figure.savefig(temp, dpi=90, format="png"))
    plt.close(figure)
    return path


def chart_title(runs: list[dict]) -> str:
    slugs = ", ".join(dict.fromkeys(run["machine"].get("slug", "?") for run in runs))
    commits = ", ".join(dict.fromkeys((run.get("commit") or {}).get("short") or "?" for run in runs))
    return f"MNIST CNN per backend and path: {slugs} @ {commits}"


def make_readable(path: Path) -> Path:
    """Give a file written through a temp file the permissions a plain write would have:
    mkstemp creates it 0600, and results are meant to be shared."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
    return path


def write_report(runs: list[dict], stem_path: str | os.PathLike) -> tuple[str, Path, Path]:
    """Table (returned and written to STEM.md) and chart (STEM.png) for `runs`."""
    from model.checkpoint import atomic_write

    stem_path = Path(stem_path)
    cells = add_ratios(merge_cells(runs))
    table = markdown_report(runs, cells)
    markdown = make_readable(atomic_write(stem_path.with_suffix(".md"), lambda temp: temp.write_text(table)))
    chart = make_readable(draw_chart(cells, stem_path.with_suffix(".png"), chart_title(runs)))
    return table, markdown, chart
