"""New over old from this A/B's results files, unpaired: the ratio of the two sides' medians
over all their rounds, with a 95% percentile-bootstrap CI (10,000 resamples, seed 0).

    python benchmarks/results/cpu-amd-epyc-2c-avx512/host-lr-feed-ab/ratio_of_medians.py
"""

import json
from pathlib import Path

import numpy as np
from scipy import stats

HERE = Path(__file__).parent
OLD, NEW = "ecc23de", "f486288"


def cells(folder: str, commit: str):
    for path in sorted((HERE / folder).glob(f"*-{commit}.json")):
        yield {cell["path"]: cell for cell in json.loads(path.read_text())["cells"]}


def step_ms(commit: str, path: str) -> np.ndarray:
    return np.array([r["step_ms_mean"] for run in cells("training", commit) for r in run[path]["rounds"]
                     if r["status"] == "ok"])


def overhead(commit: str) -> np.ndarray:
    """keras-fit over framework per round (the pair that ran side by side)."""
    return np.array([keras["step_ms_mean"] / framework["step_ms_mean"] for run in cells("training", commit)
                     for keras, framework in zip(run["keras-fit"]["rounds"], run["framework"]["rounds"])
                     if keras["status"] == framework["status"] == "ok"])


def seconds_to_99(commit: str) -> np.ndarray:
    return np.array([r["seconds_to_target"] for run in cells("time-to-accuracy", commit)
                     for r in run["time-to-accuracy"]["rounds"] if r.get("reached_target")])


def ratio(old: np.ndarray, new: np.ndarray) -> tuple[float, float, float]:
    result = stats.bootstrap((old, new), lambda a, b, axis=-1: np.median(b, axis=axis) / np.median(a, axis=axis),
                             n_resamples=10_000, method="percentile", vectorized=True, paired=False,
                             rng=np.random.default_rng(0))
    return float(np.median(new) / np.median(old)), result.confidence_interval.low, result.confidence_interval.high


if __name__ == "__main__":
    print("| figure | old: median, rounds | new: median, rounds | new / old [95% CI] |")
    print("| --- | ---: | ---: | ---: |")
    for label, values in (("keras-fit ms/step", lambda c: step_ms(c, "keras-fit")),
                          ("framework ms/step", lambda c: step_ms(c, "framework")),
                          ("Keras overhead (keras-fit / framework, per round)", overhead),
                          ("time to 99%, fast recipe, s", seconds_to_99)):
        old, new = values(OLD), values(NEW)
        middle, low, high = ratio(old, new)
        print(f"| {label} | {np.median(old):.3f}, {old.size} | {np.median(new):.3f}, {new.size} | "
              f"{middle:.3f} [{low:.3f}-{high:.3f}] |")
