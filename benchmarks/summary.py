"""A cell's row in a results file, from its rounds (benchmarks/confidence.py).

`summarize_cells(rows)` takes rows holding their identity (machine, backend, device,
path, batch_size, device_count; a time-to-accuracy cell's recipe) and `rounds` (one
result per round, as benchmarks/measure.py wrote it, each tagged with `round` and
`source`) and sets every summary figure from the ok rounds alone, so a report rebuilt
from one file, or from several merged, recomputes them the same way. Per training cell:
the median across rounds of the window's mean step time with its 95% bootstrap CI, and
the Keras-over-framework ratio computed per round from the pair that ran in the same
block of the same round, then its median and CI; for keras-fit on N > 1 devices
(device_count), its images/s over the 1-device keras-fit's, paired the same way; and
the share of the machine's floor (the best sgemm rate of any row of the same machine,
device and batch size) beside the share of the row's own framework's.
"""

from __future__ import annotations

import math

import numpy as np

from benchmarks.floor import achieved_gflops, pct_of_floor
from benchmarks.measure import PATHS, PREDICT, TIME_TO_ACCURACY
from benchmarks.confidence import median_ci, paired_ratio_ci, significance_label

# A cell whose floor before and after its window differ by more than this ran on a drifting host.
FLOOR_DRIFT_LIMIT = 0.05
# recipe: what a time-to-accuracy cell trains (model/config.py RECIPES); the other kinds have none.
IDENTITY = ("machine", "backend", "device", "path", "batch_size", "device_count", "recipe")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _median(values) -> float | None:
    values = [value for value in values if _number(value)]
    return float(np.median(values)) if values else None


def _with_ci(row: dict, name: str, values, ci_name: str | None = None) -> None:
    values = [value for value in values if _number(value)]
    median, low, high = median_ci(values) if values else (None, None, None)
    row[name] = median
    row[ci_name or f"{name}_ci95"] = [low, high] if low is not None else None


def status_of(rounds: list[dict]) -> tuple[str, str | None]:
    """ok when any round is; the reason names failed rounds."""
    statuses = [r["status"] for r in rounds]
    failed = [r for r in rounds if r["status"] == "failed"]
    if "ok" in statuses:
        reason = f"{len(failed)} of {len(rounds)} rounds failed: {failed[0]['reason']}" if failed else None
        return "ok", reason
    if not rounds:
        return "failed", "no rounds ran"
    first = failed[0] if failed else rounds[0]
    return ("failed" if failed else first["status"]), first.get("reason")


def floor_figures(ok: list[dict]) -> dict:
    def floor(result, key):
        values = [result.get(side, {}).get(key) for side in ("floor_before", "floor_after")]
        return float(np.mean(values)) if all(_number(v) for v in values) else None

    drifts = []
    for result in ok:
        before = result.get("floor_before", {}).get("sgemm_gflops_model_shape")
        after = result.get("floor_after", {}).get("sgemm_gflops_model_shape")
        if _number(before) and _number(after) and before > 0:
            drifts.append(abs(after - before) / before)
    drift = max(drifts) if drifts else None
    return {
        "floor_gflops": _median(floor(r, "sgemm_gflops_model_shape") for r in ok),
        "floor_gflops_1024": _median(floor(r, "sgemm_gflops_1024") for r in ok),
        "triad_gb_s": _median(floor(r, "triad_gb_s") for r in ok),
        "floor_drift": drift,
        "floor_drifted": drift is not None and drift > FLOOR_DRIFT_LIMIT,
    }


def training_figures(ok: list[dict]) -> dict:
    row = {}
    _with_ci(row, "step_ms_median", [r["step_ms_mean"] for r in ok], "step_ms_ci95")
    _with_ci(row, "images_per_s", [r["images_per_s"] for r in ok])
    for name in ("compile_s", "data_s_per_epoch", "epoch_s", "step_ms_p50", "step_ms_p90", "step_ms_p99"):
        row[name] = _median(r.get(name) for r in ok)
    row.update(floor_figures(ok))
    flops = _median(r.get("flops_per_image") for r in ok)
    row["flops_per_image"] = flops
    usable = flops and row["images_per_s"] and row["floor_gflops"]
    row["achieved_gflops"] = achieved_gflops(flops, row["images_per_s"]) if usable else None
    row["pct_of_floor"] = pct_of_floor(flops, row["images_per_s"], row["floor_gflops"]) if usable else None
    row["framework_adjacent_rounds"] = sum(1 for r in ok if r.get("framework_adjacent"))
    return row


def time_to_accuracy_figures(ok: list[dict]) -> dict:
    reached = [r for r in ok if r.get("reached_target")]
    row = {"target_accuracy": _median(r["target_accuracy"] for r in ok), "rounds_reached": len(reached)}
    _with_ci(row, "seconds_to_target", [r["seconds_to_target"] for r in reached])
    row["epochs_to_target"] = _median(r["epochs_to_target"] for r in reached)
    row["test_accuracy"] = _median(r["test_accuracy"] for r in ok)
    row["evaluation_s"] = _median(r["evaluation_s"] for r in ok)
    return row


def predict_figures(ok: list[dict]) -> dict:
    # How the runtime served (inference.py's path: Keras' predict_on_batch, torch's fused
    # forward, onnxruntime); rounds merged from runs that served differently name each.
    paths = sorted({r.get("runtime_path") for r in ok if r.get("runtime_path")})
    row = {"runtime_path": ", ".join(paths) or None}
    _with_ci(row, "latency_ms_median", [r["latency_ms_median"] for r in ok], "latency_ms_ci95")
    row["latency_ms_p99"] = _median(r["latency_ms_p99"] for r in ok)
    _with_ci(row, "throughput_images_per_s", [r["throughput_images_per_s"] for r in ok])
    return row


def summarize_row(row: dict) -> dict:
    """`row` with status, reason and the figures of its kind set from its rounds."""
    rounds = row["rounds"]
    ok = [r for r in rounds if r["status"] == "ok"]
    status, reason = status_of(rounds)
    summary = {key: row[key] for key in IDENTITY if key in row}
    summary.update(status=status, reason=reason, rounds_run=len(rounds), rounds_ok=len(ok))
    if ok and row["path"] in PATHS:
        summary.update(training_figures(ok))
    elif ok and row["path"] == TIME_TO_ACCURACY:
        summary.update(time_to_accuracy_figures(ok))
    elif ok and row["path"] == PREDICT:
        summary.update(predict_figures(ok))
    if ok:
        summary["device_name"] = ok[0].get("device_name")
    if ok and summary.get("device_count", 1) > 1:
        # Read back from inside the cell (the engine's copies of the weights): a cell that
        # trained on fewer devices than asked would show it here.
        summary["devices_used"] = sorted({r.get("devices_used") for r in ok}, key=str)
        summary["engine"] = ok[0].get("engine")
    summary["rounds"] = rounds
    return summary


def paired_rounds(row: dict, anchor: dict, figure: str) -> list[tuple[float, float]]:
    """(row's, anchor's) `figure` for every round of the same source both ran ok (the two
    ran in the same round, side by side)."""
    baseline = {(r.get("source"), r["round"]): r[figure] for r in anchor["rounds"] if r["status"] == "ok"}
    return [(r[figure], baseline[(r.get("source"), r["round"])]) for r in row["rounds"]
            if r["status"] == "ok" and (r.get("source"), r["round"]) in baseline]


def _paired(row: dict, anchor: dict, figure: str) -> tuple | None:
    """(median, CI or None, pairs) of row's `figure` over anchor's, per round (paired_rounds);
    None without a pair."""
    pairs = paired_rounds(row, anchor, figure)
    if not pairs:
        return None
    ratio, low, high = paired_ratio_ci([p[0] for p in pairs], [p[1] for p in pairs])
    return ratio, [low, high] if low is not None else None, len(pairs)


def add_framework_ratios(rows: list[dict]) -> list[dict]:
    """ratio_to_framework per training row: Keras step / its framework baseline's, per
    round of the same source (the pair of one block), then their median and 95% CI;
    ratio_significance is "n.s." when that CI holds 1.0."""

    def key(row):
        return row.get("machine"), row["backend"], row["device"], row["batch_size"]

    frameworks = {key(row): row for row in rows if row["path"] == "framework" and row["status"] == "ok"}
    for row in rows:
        row.update(ratio_to_framework=None, ratio_to_framework_ci95=None, ratio_significance=None)
        framework = frameworks.get(key(row))
        # A data-parallel row is compared with its 1-device keras-fit instead (add_device_ratios).
        if row["path"] not in PATHS or row["status"] != "ok" or framework is None or row.get("device_count", 1) > 1:
            continue
        if row is framework:
            row.update(ratio_to_framework=1.0, ratio_to_framework_ci95=[1.0, 1.0], ratio_significance="")
            continue
        _set_paired_ratio(row, framework, "step_ms_mean", "ratio_to_framework", "ratio_pairs", "ratio_significance")
    return rows


def _set_paired_ratio(row: dict, anchor: dict, figure: str, name: str, pairs_name: str, significance_name: str):
    """row[name] (and name + "_ci95", pairs_name, significance_name): the paired per-round
    ratio of `figure` between row and anchor (_paired); left as they are when none pair."""
    paired = _paired(row, anchor, figure)
    if paired:
        ratio, ci, pairs = paired
        row.update({name: ratio, f"{name}_ci95": ci, pairs_name: pairs,
                    significance_name: significance_label(*(ci or (None, None)))})


def add_device_ratios(rows: list[dict]) -> list[dict]:
    """speedup_over_one_device per row on N > 1 devices: its images/s over the same
    path's on one device, per round (they ran side by side), then the median and 95% CI;
    speedup_significance is "n.s." when that CI holds 1.0."""

    def key(row):
        return row.get("machine"), row["backend"], row["device"], row["batch_size"], row["path"]

    anchors = {key(row): row for row in rows if row.get("device_count", 1) == 1 and row["status"] == "ok"}
    for row in rows:
        if row.get("device_count", 1) == 1:
            continue
        row.update(speedup_over_one_device=None, speedup_over_one_device_ci95=None, speedup_significance=None)
        anchor = anchors.get(key(row))
        if anchor is not None and row["status"] == "ok":
            _set_paired_ratio(row, anchor, "images_per_s", "speedup_over_one_device", "speedup_pairs",
                              "speedup_significance")
    return rows


def add_machine_floors(rows: list[dict]) -> list[dict]:
    """machine_floor_gflops per training row: the highest floor_gflops of any training row
    of the same machine, device and batch size (the floor's matmul has the batch's shape)
    among `rows` (one run, or several merged), each row's the median of its rounds measured
    in its own framework's process; machine_floor_backend and machine_floor_path whose it
    was, and pct_of_machine_floor against it. A framework's flags can slow its own sgemm
    (JAX's REDUCE flag, backends/FRAMEWORK_FLAGS), which lowers its own floor and so raises
    its pct_of_floor; the machine's floor is the best rate seen on that hardware, whoever
    measured it. On a GPU, floors run in TF32 and in full float32 (each round's
    tf32_allowed) are not compared with each other."""

    def key(row):
        precision = None
        if row["device"] != "cpu":
            precision = next((r.get("tf32", {}).get("tf32_allowed") for r in row["rounds"] if r["status"] == "ok"), None)
        return row.get("machine"), row["device"], row.get("batch_size"), precision

    best: dict = {}
    for row in rows:
        if row["path"] in PATHS and row["status"] == "ok" and _number(row.get("floor_gflops")):
            if key(row) not in best or row["floor_gflops"] > best[key(row)]["floor_gflops"]:
                best[key(row)] = row
    for row in rows:
        if row["path"] not in PATHS:
            continue
        row.update(machine_floor_gflops=None, machine_floor_backend=None, machine_floor_path=None,
                   pct_of_machine_floor=None)
        anchor = best.get(key(row))
        if anchor is None or row["status"] != "ok":
            continue
        row.update(machine_floor_gflops=anchor["floor_gflops"], machine_floor_backend=anchor["backend"],
                   machine_floor_path=anchor["path"])
        # Only beside a share of the row's own floor: rows that measured none (data parallel
        # on simulated devices) get neither.
        if row.get("pct_of_floor") is not None:
            row["pct_of_machine_floor"] = pct_of_floor(row["flops_per_image"], row["images_per_s"], anchor["floor_gflops"])
    return rows


def summarize_cells(rows: list[dict]) -> list[dict]:
    return add_machine_floors(add_device_ratios(add_framework_ratios([summarize_row(row) for row in rows])))
