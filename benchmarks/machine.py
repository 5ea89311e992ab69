"""Where and from what a benchmark ran: machine, commit and package versions.

Read without importing any framework (package versions come from
importlib.metadata, the GPU from nvidia-smi), so the parent process stays light.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

from model.runtime import cpu_model

REPO = Path(__file__).resolve().parents[1]

# The distributions whose versions a results file records; the first one installed wins.
PACKAGE_DISTRIBUTIONS = {
    "keras": ("keras", "keras-nightly"),
    "jax": ("jax",),
    "jaxlib": ("jaxlib",),
    "tensorflow": ("tensorflow", "tensorflow-cpu", "tensorflow-macos", "tf-nightly"),
    "torch": ("torch",),
    "numpy": ("numpy",),
    "cuda": ("nvidia-cuda-runtime-cu13", "nvidia-cuda-runtime-cu12", "nvidia-cuda-runtime-cu11", "nvidia-cuda-runtime"),
}


def _run(command: list[str], timeout: float = 20) -> str | None:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def ram_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError):
        pass
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def nvidia_gpus() -> list[dict]:
    """Name, driver and memory of each NVIDIA GPU, from nvidia-smi; [] without one."""
    if shutil.which("nvidia-smi") is None:
        return []
    output = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader,nounits"])
    gpus = []
    for line in (output or "").splitlines():
        parts = [part.strip() for part in line.split(",")]
        if len(parts) == 3:
            memory = int(parts[2]) if parts[2].isdigit() else None
            gpus.append({"name": parts[0], "driver": parts[1], "memory_mb": memory})
    return gpus


def slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def cpu_slug(model: str) -> str:
    """'AMD EPYC 7B13 64-Core Processor' -> 'amd-epyc-7b13'; the marketing words go."""
    words = re.sub(r"\((r|tm)\)|@.*$|\bcpu\b|\bprocessor\b|\b\d+-core\b|\bwith .*$", " ", model, flags=re.IGNORECASE)
    return slugify(words)[:32].strip("-") or "unknown-cpu"


def machine_slug(machine: dict) -> str:
    """A short folder name for a machine: 'cpu-amd-epyc-2c' or 'gpu-nvidia-h100-80gb-hbm3'."""
    gpus = machine.get("gpus") or []
    if gpus:
        count = f"-x{len(gpus)}" if len(gpus) > 1 else ""
        return f"gpu-{slugify(gpus[0]['name'])[:40]}{count}"
    return f"cpu-{cpu_slug(machine['cpu'])}-{machine['cores']}c"


def describe_machine() -> dict:
    gpus = nvidia_gpus()
    machine = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "ram_gb": ram_gb(),
        "gpu": gpus[0]["name"] if gpus else None,
        "gpu_driver": gpus[0]["driver"] if gpus else None,
        "gpus": gpus,
        "system": platform.platform(),
    }
    machine["slug"] = machine_slug(machine)
    return machine


def commit_info() -> dict:
    """The commit benchmarked and whether tracked files differed from it."""
    commit = _run(["git", "rev-parse", "HEAD"])
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"])
    branch = _run(["git", "rev-parse", "--abbrev-ref", "HEAD"])
    return {"id": commit, "short": commit[:7] if commit else None, "dirty": bool(status) if status is not None else None,
            "branch": branch}


def package_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name, distributions in PACKAGE_DISTRIBUTIONS.items():
        versions[name] = None
        for distribution in distributions:
            try:
                versions[name] = importlib.metadata.version(distribution)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return versions
