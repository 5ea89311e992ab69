"""The report of one or more results files, drawn from the JSON alone, never typed by hand.

`load_runs(paths)` reads and checks results files; `merge_cells(runs)` puts the rounds of
the same cell (machine, backend, device, path, batch size, device count, recipe; for time
to accuracy also the run settings its rounds recorded) from every file together and
summarizes them again (benchmarks/summary.py); `markdown_report` writes a headline
sentence, the headline table, the data-parallel table (when cells ran on more than one
device), the time-to-accuracy table (one row per backend and version of a recipe),
the inference table and the details; `draw_chart` the PNG.
benchmarks/compare.py calls these after a run and again for `--report FILE...`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from benchmarks.measure import DEVICES, KERAS_PATHS, ONNX_RUNTIME, PATHS, PREDICT, TIME_TO_ACCURACY
from benchmarks.summary import IDENTITY, summarize_cells
from model.config import BACKENDS, RECIPES, TrainConfig, recorded_run_settings, settings_label

HEADLINE_PATH = "keras-fit"
STOCK_PATH = "keras-fit-stock"
# What an ok round of each kind must hold, as numbers (or null where a figure may be missing).
ROUND_NUMBERS = {
    "training": ("step_ms_mean", "images_per_s", "compile_s", "data_s_per_epoch", "epoch_s"),
    TIME_TO_ACCURACY: ("target_accuracy", "test_accuracy", "evaluation_s", "seconds_to_target", "epochs_to_target"),
    PREDICT: ("latency_ms_median", "latency_ms_p99", "throughput_images_per_s"),
}
# Those that may be null: an epoch time not measured, a target not reached.
NULLABLE_NUMBERS = {"epoch_s", "seconds_to_target", "epochs_to_target"}


class ResultsFileError(Exception):
    """A results file could not be read; the message names it and says why."""


# ----------------------------------------------------------------------------- loading


def check_round(path: Path, index: int, cell: dict, result: dict) -> None:
    if not isinstance(result, dict) or "status" not in result or "round" not in result:
        raise ResultsFileError(f"{str(path)!r}: cell {index} has a round without 'status' and 'round'")
    if result["status"] != "ok":
        return
    kind = "training" if cell["path"] in PATHS else cell["path"]
    for field in ROUND_NUMBERS.get(kind, ()):
        value = result.get(field)
        if not (value is None and field in NULLABLE_NUMBERS) and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ResultsFileError(f"{str(path)!r}: cell {index} ({cell['backend']} {cell['path']}), round "
                                   f"{result['round']}: {field} is {value!r}, expected a number; fix or regenerate the file")


def load_runs(paths) -> list[dict]:
    """The results files at `paths`, each checked to be a benchmark run of this edition."""
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
            if not isinstance(cell.get("rounds"), list):
                raise ResultsFileError(f"{str(path)!r}: cell {index} has no 'rounds' list; it is a first-edition "
                                       "results file (before rounds), which this report cannot read")
            for result in cell["rounds"]:
                check_round(path, index, cell, result)
        # Rounds are paired by (source, round): two files under one name would pair rounds
        # of different runs.
        if any(other["source"] == path.name for other in runs):
            raise ResultsFileError(f"two results files named {path.name!r} were given; each run's file name is its "
                                   "time and commit, so pass each run once")
        run["source"] = path.name
        runs.append(run)
    return runs


def _order(cell: dict) -> tuple:
    def position(values, value):
        return values.index(value) if value in values else len(values)

    kinds = (*PATHS, TIME_TO_ACCURACY, PREDICT)
    return (position(kinds, cell["path"]) >= len(PATHS), cell["batch_size"] or 0, position(DEVICES, cell["device"]),
            position((*BACKENDS, ONNX_RUNTIME), cell["backend"]), position(kinds, cell["path"]),
            cell.get("device_count", 1), position(list(RECIPES), cell.get("recipe")), cell.get("recipe") or "",
            # Of a recipe's versions, today's first (the headline's), then by their label.
            not (cell.get("settings") and _is_current(cell["settings"])), cell.get("recipe_label") or "",
            cell.get("machine") or "")


def recorded_settings(cell: dict) -> dict | None:
    """The run settings a time-to-accuracy cell trained with (recorded_run_settings): from
    the config its rounds record; a file from before rounds recorded one gives the recipe
    alone (none named: the default), its other settings None (not recorded). The other
    kinds have none."""
    if cell["path"] != TIME_TO_ACCURACY:
        return None
    configs = [result["config"] for result in cell["rounds"] if result.get("config")]
    return recorded_run_settings(configs[0] if configs else {key: cell[key] for key in ("recipe",) if cell.get(key)})


def recipe_of(cell: dict) -> str | None:
    """The recipe a time-to-accuracy cell trained (None for the other kinds)."""
    settings = recorded_settings(cell)
    return settings and settings["recipe"]


def _is_current(settings: dict) -> bool:
    """Whether a cell's recorded settings are its recipe's today (as the quick mode's
    limited epochs left aside)."""
    today = recorded_run_settings(TrainConfig().with_recipe(settings["recipe"]).to_dict()) \
        if settings["recipe"] in RECIPES else {}
    return all(settings[name] == today.get(name) for name in settings if name != "limit_train_batches")


def _label_versions(rows: list[dict]) -> None:
    """Each time-to-accuracy row's recipe_label: its recipe's name, with the settings that
    tell it apart when files hold more than one version of that name (different maths,
    never pooled); "settings not recorded" for cells of files that predate the record."""
    versions: dict[str, list[dict]] = {}
    for row in rows:
        if row.get("settings") and row["settings"] not in versions.setdefault(row["recipe"], []):
            versions[row["recipe"]].append(row["settings"])
    for row in rows:
        if row["path"] != TIME_TO_ACCURACY:
            continue
        known = [version for version in versions[row["recipe"]] if version["epochs"] is not None]
        if row["settings"]["epochs"] is None:
            row["recipe_label"] = row["recipe"] + (" (settings not recorded)" if known else "")
        else:
            row["recipe_label"] = settings_label(row["recipe"], row["settings"], known)


def merge_cells(runs: list[dict]) -> list[dict]:
    """One row per cell of all runs, its rounds from every file (tagged with the file),
    summarized. Time-to-accuracy cells merge only when their recorded run settings agree:
    a recipe whose values changed between files gives a row per version."""
    rows: dict[tuple, dict] = {}
    for run in runs:
        for cell in run["cells"]:
            # Files written before the device-count dimension hold 1-device cells only.
            row = {**cell, "machine": cell.get("machine") or run["machine"].get("slug"),
                   "device_count": cell.get("device_count", 1)}
            settings = recorded_settings(cell)
            if settings:
                row["recipe"] = settings["recipe"]
            key = (*(row.get(field) for field in IDENTITY), json.dumps(settings, sort_keys=True))
            rounds = [{**result, "source": run["source"]} for result in cell["rounds"]]
            if key in rows:
                rows[key]["rounds"] += rounds
            else:
                rows[key] = {**row, "rounds": rounds, "machine_cores": run["machine"].get("cores")}
    for row in rows.values():
        # A cell skipped in one file but run in another keeps only the rounds that ran.
        if any(r["status"] != "skipped" for r in row["rounds"]):
            row["rounds"] = [r for r in row["rounds"] if r["status"] != "skipped"]
    summarized = summarize_cells(list(rows.values()))
    for row in summarized:
        if row["path"] == TIME_TO_ACCURACY:
            row["settings"] = recorded_settings(row)  # what the summary keeps: its identity and rounds
    _label_versions(summarized)
    return sorted(summarized, key=_order)


# ----------------------------------------------------------------------------- text


def _ms(value) -> str:
    if value is None:
        return "–"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _interval(value, ci, number=_ms, suffix="") -> str:
    if value is None:
        return "–"
    text = f"{number(value)}{suffix}"
    return text + (f" [{number(ci[0])}–{number(ci[1])}]" if ci else "")


def _ratio(row: dict) -> str:
    if row.get("ratio_to_framework") is None:
        return "–"
    text = _interval(row["ratio_to_framework"], row.get("ratio_to_framework_ci95"), lambda v: f"{v:.2f}", "×")
    return f"{text} {row['ratio_significance']}".strip()


def _cell(rows, backend, device, path, machine=None, device_count=1, recipe=None) -> dict | None:
    return next((r for r in rows if (r["backend"], r["device"], r["path"]) == (backend, device, path)
                 and r.get("device_count", 1) == device_count and r["status"] == "ok" and r.get("recipe") == recipe
                 and (machine is None or r.get("machine") == machine)), None)


def _path_label(row: dict) -> str:
    count = row.get("device_count", 1)
    return row["path"] + (f" on {count} devices" if count > 1 else "")


def _overlap(a: dict, b: dict) -> bool:
    """Whether two step-time CIs overlap (or one is missing): then the gap is not significant."""
    ca, cb = a.get("step_ms_ci95"), b.get("step_ms_ci95")
    return not ca or not cb or (ca[0] <= cb[1] and cb[0] <= ca[1])


def headline_sentence(rows: list[dict]) -> str:
    parts = []
    machines = list(dict.fromkeys(r.get("machine") for r in rows))
    for machine, device in ((m, d) for m in machines for d in DEVICES):
        fits = sorted((r for r in rows if (r.get("machine"), r["device"], r["path"]) == (machine, device, HEADLINE_PATH)
                       and r.get("device_count", 1) == 1 and r["status"] == "ok"), key=lambda r: r["step_ms_median"])
        if not fits:
            continue
        fastest = fits[0]
        where = f"{device.upper()}" + (f" ({machine})" if len(machines) > 1 else "")
        text = f"on {where}, {fastest['backend']} trains fastest through Keras fit ({_ms(fastest['step_ms_median'])} ms/step)"
        if len(fits) > 1:
            runner = fits[1]
            verdict = "not significant: their CIs overlap" if _overlap(fastest, runner) else "significant: their CIs do not overlap"
            text += f", ahead of {runner['backend']} ({_ms(runner['step_ms_median'])} ms; {verdict})"
        significant = [r["backend"] for r in fits if r.get("ratio_significance") == ""]
        unclear = [r["backend"] for r in fits if r.get("ratio_significance") == "n.s."]
        if significant or unclear:
            text += "; Keras' overhead over the hand-written loop is " + " and ".join(filter(None, (
                f"significant on {', '.join(significant)}" if significant else "",
                f"not significant on {', '.join(unclear)}" if unclear else "")))
        parts.append(text)
    if not parts:
        return "No Keras fit cell ran."
    sentence = "; ".join(parts) + "."
    return sentence[0].upper() + sentence[1:]


def _table(columns: list[str], lines: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" if i < 2 else "---:" for i in range(len(columns))) + "|"]
    return out + ["| " + " | ".join(str(value).replace("|", "\\|") for value in line) + " |" for line in lines]


def _target(rows: list[dict]) -> str:
    targets = {r.get("target_accuracy") for r in rows if r["path"] == TIME_TO_ACCURACY and r.get("target_accuracy")}
    return f"{min(targets) * 100:g}%" if len(targets) == 1 else "target"


def _target_label(rows: list[dict]) -> str:
    return f"time to {_target(rows)}"


def _recipes(rows: list[dict]) -> list[str]:
    """The recipes of the time-to-accuracy cells that ran, in RECIPES' order."""
    ran = {r["recipe"] for r in rows if r["path"] == TIME_TO_ACCURACY and r["status"] == "ok"}
    return sorted(ran, key=lambda name: (list(RECIPES).index(name) if name in RECIPES else len(RECIPES), name))


def _headline_recipe(rows: list[dict]) -> tuple[str | None, str]:
    """The recipe whose time to the target the headline table shows (the default where it
    ran), and that column's header, which names the recipe when another one ran too."""
    recipes = _recipes(rows)
    recipe = TrainConfig.recipe if TrainConfig.recipe in recipes or not recipes else recipes[0]
    label = _target_label(rows)
    return recipe, (label if recipes in ([], [TrainConfig.recipe]) else f"{label}, {recipe} recipe")


def headline_table(rows: list[dict]) -> list[str]:
    """One row per backend and device (and machine, when the report merges several)."""
    machines = list(dict.fromkeys(r.get("machine") for r in rows))
    recipe, target_header = _headline_recipe(rows)
    lines = []
    for machine, device, backend in ((m, d, b) for m in machines for d in DEVICES for b in BACKENDS):
        fit, framework = _cell(rows, backend, device, HEADLINE_PATH, machine), _cell(rows, backend, device, "framework", machine)
        tta = _cell(rows, backend, device, TIME_TO_ACCURACY, machine, recipe=recipe)
        if not (fit or framework or tta):
            continue
        seconds = "–"
        if tta:
            seconds = (f"{tta['seconds_to_target']:.0f} s ({tta['epochs_to_target']:g} epochs)"
                       if tta.get("seconds_to_target") is not None else f"not reached ({tta['test_accuracy']:.4f})")
        floors = [f"{fit[name]:.0f}%" if fit and fit.get(name) is not None else "–"
                  for name in ("pct_of_floor", "pct_of_machine_floor")]
        lines.append([*([machine] if len(machines) > 1 else []), backend, device,
                      _interval(fit["step_ms_median"], fit.get("step_ms_ci95")) if fit else "–",
                      _interval(framework["step_ms_median"], framework.get("step_ms_ci95")) if framework else "–",
                      _ratio(fit) if fit else "–", *floors, seconds])
    columns = [*(["machine"] if len(machines) > 1 else []), "backend", "device", "Keras fit ms/step [95% CI]",
               "hand-written ms/step [95% CI]", "Keras overhead [95% CI]", "% of floor", "% of machine floor",
               target_header]
    return _table(columns, lines) if lines else ["No training cell ran."]


def _images_per_s(row: dict) -> str:
    return _interval(row["images_per_s"], row.get("images_per_s_ci95"), lambda v: f"{v:,.0f}")


def devices_table(rows: list[dict], runs: list[dict]) -> list[str]:
    """keras-fit on N devices beside its 1-device cell: images/s of each and their paired
    ratio; empty when no cell ran on more than one device."""
    cores = {run["machine"].get("slug"): run["machine"].get("cores") for run in runs}
    lines, cpu_cores, uncompiled = [], set(), []
    for row in rows:
        if row.get("device_count", 1) == 1 or row["status"] != "ok":
            continue
        anchor = _cell(rows, row["backend"], row["device"], row["path"], row.get("machine"))
        if row["device"] == "cpu":
            cpu_cores.add(cores.get(row.get("machine")))
        speedup = "–"
        if row.get("speedup_over_one_device") is not None:
            speedup = _interval(row["speedup_over_one_device"], row.get("speedup_over_one_device_ci95"),
                                lambda v: f"{v:.2f}", "×")
            speedup = f"{speedup} {row['speedup_significance']}".strip()
        lines.append([row["backend"], row["device"], row.get("engine") or "–", row["device_count"],
                      _images_per_s(anchor) if anchor else "–", _images_per_s(row), speedup])
        compiled = {r.get("jit_compile") for r in row["rounds"] if r["status"] == "ok"}
        if anchor and compiled != {r.get("jit_compile") for r in anchor["rounds"] if r["status"] == "ok"}:
            uncompiled.append(f"{row['backend']} {row['device']} on {row['device_count']} devices")
    if not lines:
        return []
    columns = ["backend", "device", "engine", "devices", "1 device images/s [95% CI]", "N devices images/s [95% CI]",
               "N vs 1 device [95% CI]"]
    shared = " or ".join(str(count) for count in sorted(cpu_cores - {None}))
    note = ("keras-fit through each backend's data-parallel engine (`train.py --devices N`): the same global batch "
            "split over N devices, beside its 1-device cell in each round it ran; N vs 1 device: images/s over the "
            "1-device cell's, per round, then the median and 95% CI (n.s. where it holds 1.0).")
    if cpu_cores:
        note += (f" On CPU the N devices are simulated and share the machine's {shared + ' ' if shared else ''}cores, "
                 "so the figure is the engine's overhead, not a speed-up.")
    if uncompiled:
        note += (f" Compiled otherwise than its 1-device cell (jit_compile, the engine's choice: DataParallel.jit_compile "
                 f"in backends/): {', '.join(uncompiled)}.")
    note += " A GPU cell asking for more devices than the framework sees GPUs is skipped, with the reason."
    return ["## More than one device", "", *_table(columns, lines), "", note, ""]


def inference_table(rows: list[dict]) -> list[str]:
    lines = [[row["backend"], row["device"], row.get("runtime_path") or "–",
              _interval(row["latency_ms_median"], row.get("latency_ms_ci95")),
              _ms(row["latency_ms_p99"]),
              _interval(row["throughput_images_per_s"], row.get("throughput_images_per_s_ci95"), lambda v: f"{v:,.0f}")]
             for row in rows if row["path"] == PREDICT and row["status"] == "ok"]
    columns = ["runtime", "device", "served by", "batch-1 latency ms [95% CI]", "batch-1 p99 ms",
               "batch-1024 images/s [95% CI]"]
    return _table(columns, lines) if lines else ["No predict cell ran."]


def _number(value, digits=1) -> str:
    return "–" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:,.{digits}f}"


def details_table(rows: list[dict]) -> list[str]:
    lines = []
    for row in rows:
        if row["status"] == "skipped" or row["path"] not in PATHS:
            continue
        notes = [row.get("reason") or ""]
        if row.get("floor_drifted"):
            notes.append(f"floor drifted {row['floor_drift'] * 100:.0f}% during a window")
        lines.append([row["backend"], row["device"], _path_label(row), row["batch_size"], f"{row['rounds_ok']}/{row['rounds_run']}",
                      _interval(row.get("step_ms_median"), row.get("step_ms_ci95")), _ms(row.get("step_ms_p90")),
                      _number(row.get("images_per_s"), 0), _number(row.get("compile_s"), 2),
                      _number(row.get("data_s_per_epoch"), 2), _number(row.get("epoch_s")),
                      _number(row.get("floor_gflops"), 0), _number(row.get("achieved_gflops"), 0),
                      _number(row.get("pct_of_floor")), _number(row.get("pct_of_machine_floor")), _ratio(row),
                      "; ".join(filter(None, notes))])
    columns = ["backend", "device", "path", "batch", "rounds ok", "step ms [95% CI]", "p90 ms", "images/s", "compile s",
               "data s/epoch", "epoch s", "floor GFLOP/s", "achieved GFLOP/s", "% of floor", "% of machine floor",
               "× framework [95% CI]", "note"]
    return _table(columns, lines) if lines else []


def machine_floor_lines(rows: list[dict]) -> list[str]:
    """Whose floor each "% of machine floor" divides by: one line per machine, device and
    batch size (and, on a GPU, precision)."""
    machines = {row.get("machine") for row in rows}
    floors = dict.fromkeys((row.get("machine"), row["device"], row["batch_size"], row["machine_floor_gflops"],
                            row["machine_floor_backend"], row["machine_floor_path"])
                           for row in rows if row.get("machine_floor_gflops") is not None)
    return [f"- machine floor{f' of {machine}' if len(machines) > 1 else ''}, {device}, batch {batch}: "
            f"{gflops:.0f} GFLOP/s, {backend} {path}'s"
            for machine, device, batch, gflops, backend, path in floors]


def time_to_accuracy_table(rows: list[dict]) -> list[str]:
    """One row per machine, backend, device and recipe; empty when no such cell ran."""
    ran = [row for row in rows if row["path"] == TIME_TO_ACCURACY and row["status"] == "ok"]
    if not ran:
        return []
    machines = list(dict.fromkeys(row.get("machine") for row in ran))
    lines = []
    for row in ran:
        seconds = (_interval(row["seconds_to_target"], row.get("seconds_to_target_ci95"), lambda v: f"{v:.1f}")
                   if row.get("seconds_to_target") is not None else "not reached")
        epochs = f"{row['epochs_to_target']:g}" if row.get("epochs_to_target") is not None else "–"
        lines.append([*([row.get("machine")] if len(machines) > 1 else []), row["backend"], row["device"],
                      row.get("recipe_label", row["recipe"]), seconds, epochs, f"{row['rounds_reached']}/{row['rounds_ok']}",
                      f"{row['test_accuracy']:.4f}", _number(row.get("evaluation_s"))])
    target = _target(rows)
    columns = [*(["machine"] if len(machines) > 1 else []), "backend", "device", "recipe",
               f"seconds from process start to {target} [95% CI]", f"epochs to {target}", "rounds reached",
               "final test accuracy", "per-epoch checks s (left out)"]
    note = ("train.py's recipe (`--recipe NAME`, model/config.py RECIPES, applied by TrainConfig.with_recipe) trained "
            "until the test accuracy checked at an epoch end first reached the target: wall seconds from the cell's "
            "process start (interpreter, imports, data and compilation included), the per-epoch checks left out.")
    return ["## Time to accuracy", "", *_table(columns, lines), "", note, ""]


def skipped_lines(rows: list[dict]) -> list[str]:
    """One line per backend, device and reason, however many cells it covers."""
    groups: dict[tuple, list[str]] = {}
    for row in rows:
        if row["status"] != "ok" and not (row["status"] == "failed" and row["path"] in PATHS):
            groups.setdefault((row["backend"], row["device"], row["status"], row.get("reason")), []).append(_path_label(row))
    return [f"- {backend} {device} ({', '.join(paths)}): {status}: {reason}"
            for (backend, device, status, reason), paths in groups.items()]


def run_description(run: dict) -> list[str]:
    machine, commit, settings = run["machine"], run.get("commit") or {}, run.get("settings") or {}
    dirty = " (dirty)" if commit.get("dirty") else ""
    versions = ", ".join(f"{name} {version}" for name, version in (run.get("versions") or {}).items() if version)
    steal = machine.get("steal_pct")
    return [
        f"- results: `{run.get('source', '?')}`, {settings.get('mode', '?')} mode, {settings.get('rounds')} rounds "
        f"(order seed {settings.get('order_seed')}), window {settings.get('warmup_steps')} + {settings.get('window_steps')} "
        f"steps, {run.get('datetime', '?')}, {settings.get('wall_s', '?')} s",
        f"- machine: `{machine.get('slug')}`: {machine.get('cpu')}, {machine.get('cores')} cores, ISA {machine.get('isa')}, "
        f"{machine.get('ram_gb')} GB RAM, hypervisor {machine.get('hypervisor')}, "
        f"steal {'–' if steal is None else f'{steal:.1f}%'} over the run",
        f"- commit: {commit.get('short') or '?'}{dirty}; versions: {versions}",
    ]


LEGEND = (
    "Keras fit ms/step: median across rounds of one clean window's mean step (full batches inside "
    "one prepared epoch, the device synced before every clock read), with its 95% bootstrap CI; where "
    "a path runs several steps per call (steps_per_execution in each round's figures: on TensorFlow and JAX, "
    "Keras fit and the hand-written loop beside it), "
    "the clock sees each call's end, each step gets an even share of the call, the warm-up and window are "
    "whole calls, p90 is of call means and compile s ends with the first call. "
    "Keras overhead: Keras fit's step over the hand-written framework loop's, per round from the pair "
    "that ran side by side, then the median and 95% CI; n.s. where the CI holds 1.0. % of floor: "
    "achieved GFLOP/s (training FLOPs per image x images/s) over the framework's own sgemm GFLOP/s at "
    "the model's largest matmul, measured in the cell's process. % of machine floor: the same over the "
    "highest such floor of any training cell of the same machine, device and batch size (named under "
    "the details; a framework's flags can slow its own sgemm, and so lower its own floor). Time to "
    "target: wall seconds from "
    "the process start until the test accuracy checked at an epoch end first reached it, the checks "
    "left out. Few rounds give coarse CIs (benchmarks/confidence.py)."
)


def markdown_report(runs: list[dict], rows: list[dict]) -> str:
    lines = ["# MNIST CNN: Keras paths vs hand-written loops, time to accuracy, inference", "",
             headline_sentence(rows), "", *headline_table(rows), "", *devices_table(rows, runs),
             *time_to_accuracy_table(rows), "## Inference", "",
             *inference_table(rows), "",
             "## Details", ""]
    for run in runs:
        lines += run_description(run)
    lines += machine_floor_lines(rows)
    lines += ["", *details_table(rows)]
    skipped = skipped_lines(rows)
    if skipped:
        lines += ["", "Not run, or failed:", *skipped]
    return "\n".join([*lines, "", LEGEND, ""])


# ----------------------------------------------------------------------------- chart


def _points(axis, rows: list[dict], paths: list[str], value: str, ci: str, label: str) -> None:
    """One point per backend (and device) and path, with its CI as error bars."""
    import numpy as np

    keys = list(dict.fromkeys((r["backend"], r["device"]) for r in rows))
    for index, path in enumerate(paths):
        offset = (index - (len(paths) - 1) / 2) * 0.8 / max(len(paths), 1)
        legend = path
        for position, key in enumerate(keys):
            row = next((r for r in rows if (r["backend"], r["device"]) == key and r["path"] == path), None)
            if row is None or row.get(value) is None:
                continue
            low, high = row.get(ci) or [row[value], row[value]]
            axis.errorbar(position + offset, row[value], yerr=[[row[value] - low], [high - row[value]]],
                          fmt="o", capsize=3, color=f"C{index}", label=legend)
            legend = None  # one legend entry per path
    axis.set_xticks(np.arange(len(keys)), [f"{b}\n{d}" for b, d in keys])
    axis.set_ylabel(label)
    axis.grid(axis="y", alpha=0.3)
    axis.legend(fontsize=8)


def draw_chart(rows: list[dict], path: str | os.PathLike, title: str = "") -> Path:
    """Step time per backend and path (points, 95% CI bars); a forest plot of Keras overhead
    with a line at 1.0; stock pooling in a panel of its own. Panels without data are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from model.checkpoint import atomic_write

    # One device only: the data-parallel cells have their own table.
    ok = [r for r in rows if r["status"] == "ok" and r["path"] in PATHS and r.get("device_count", 1) == 1]
    main_paths = [p for p in PATHS if p != STOCK_PATH and any(r["path"] == p for r in ok)]
    ratios = [r for r in ok if r["path"] in KERAS_PATHS and r["path"] != STOCK_PATH and r.get("ratio_to_framework") is not None]
    stock = [r for r in ok if r["path"] in (STOCK_PATH, HEADLINE_PATH)] if any(r["path"] == STOCK_PATH for r in ok) else []
    panels = [kind for kind, present in (("steps", main_paths), ("forest", ratios), ("stock", stock)) if present]
    figure, axes = plt.subplots(1, max(len(panels), 1), figsize=(6 * max(len(panels), 1), 4.5), squeeze=False)
    if not panels:
        axes[0][0].text(0.5, 0.5, "no training cell ran", ha="center", va="center")
        axes[0][0].set_axis_off()
    for axis, kind in zip(axes[0], panels):
        if kind == "steps":
            axis.set_title("step time per backend and path (95% CI)")
            _points(axis, ok, main_paths, "step_ms_median", "step_ms_ci95", "ms per step")
        elif kind == "stock":
            axis.set_title("stock MaxPooling2D vs the project's pooling")
            _points(axis, stock, [HEADLINE_PATH, STOCK_PATH], "step_ms_median", "step_ms_ci95", "ms per step")
        else:
            axis.set_title("Keras overhead over the hand-written loop (95% CI)")
            for position, row in enumerate(ratios):
                low, high = row.get("ratio_to_framework_ci95") or [row["ratio_to_framework"]] * 2
                axis.errorbar(row["ratio_to_framework"], position, xerr=[[row["ratio_to_framework"] - low],
                              [high - row["ratio_to_framework"]]], fmt="o", capsize=3, color="C0")
            axis.axvline(1.0, color="gray", linestyle="--")
            axis.set_yticks(range(len(ratios)), [f"{r['backend']} {r['device']} {r['path']}" for r in ratios])
            axis.invert_yaxis()
            axis.set_xlabel("Keras step / framework step")
            axis.grid(axis="x", alpha=0.3)
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


def write_report(runs: list[dict], stem_path: str | os.PathLike) -> tuple[str, Path, Path]:
    """Markdown (returned and written to STEM.md) and chart (STEM.png) for `runs`."""
    from model.checkpoint import atomic_write

    stem_path = Path(stem_path)
    rows = merge_cells(runs)
    report = markdown_report(runs, rows)
    # atomic_write gives the files a plain write's permissions: results are meant to be shared.
    markdown = atomic_write(stem_path.with_suffix(".md"), lambda temp: temp.write_text(report))
    chart = draw_chart(rows, stem_path.with_suffix(".png"), chart_title(runs))
    return report, markdown, chart
