"""Where and from what a benchmark ran: machine, commit and package versions.

Read without importing any framework (package versions come from
importlib.metadata, the GPU from nvidia-smi, the CPU from /proc and /sys), so the
parent process stays light; framework_threads() is the one exception, for a cell's own
process. The machine record says what changes kernels: the instruction-set flags, the
ISA class that names the results folder, cache sizes, the hypervisor and the environment
variables the frameworks read; steal_counters() before and after a run give its steal time.
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
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                                env={**os.environ, "LC_ALL": "C"})
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


# CPU flags that decide which kernels oneDNN, XLA, Eigen and BLAS pick (x86 and ARM).
KERNEL_FLAGS = {"sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx_vnni_int8", "avx_ifma",
                "asimd", "asimdhp", "asimddp", "sve", "sve2", "sme", "i8mm", "bf16"}
KERNEL_FLAG_PREFIXES = ("avx512", "amx")
# Environment variables that change the kernels or threads a framework uses.
KERNEL_ENV = {"XLA_FLAGS", "TF_ENABLE_ONEDNN_OPTS", "TF_XLA_FLAGS", "TF_INTRA_OP_PARALLELISM_THREADS",
              "TF_INTER_OP_PARALLELISM_THREADS", "OPENBLAS_NUM_THREADS"}
KERNEL_ENV_PREFIXES = ("OMP_", "MKL_", "KMP_", "TF_NUM_", "ONEDNN_", "DNNL_")


def _cpuinfo_fields() -> dict:
    """The first processor's fields in /proc/cpuinfo ('flags', 'cpu family', ...); {} without it."""
    fields = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return fields
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break  # the first processor's block is enough: they are alike
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def kernel_flags(flags) -> list[str]:
    """The flags, of all a CPU reports, that change kernels: sorted, lower case."""
    return sorted({flag.lower() for flag in flags
                   if flag.lower() in KERNEL_FLAGS or flag.lower().startswith(KERNEL_FLAG_PREFIXES)})


def isa_class(flags, architecture: str | None = None) -> str:
    """The widest vector ISA in `flags`: 'avx512' (avx512f), 'avx2', 'avx', 'sse' (sse4_2),
    'arm64' (an aarch64 machine or NEON's asimd flag) or 'other'. `architecture` is
    platform.machine() (this host's when None)."""
    flags = {flag.lower() for flag in flags}
    architecture = (architecture or platform.machine()).lower()
    if architecture in ("aarch64", "arm64") or "asimd" in flags:
        return "arm64"
    for flag, name in (("avx512f", "avx512"), ("avx2", "avx2"), ("avx", "avx"), ("sse4_2", "sse")):
        if flag in flags:
            return name
    return "other"


def cpu_flags() -> list[str]:
    """This CPU's kernel-changing flags (x86 'flags' or ARM 'Features' in /proc/cpuinfo)."""
    fields = _cpuinfo_fields()
    return kernel_flags((fields.get("flags") or fields.get("Features") or "").split())


def cpu_family() -> int | None:
    """x86 'cpu family' (e.g. 25 for AMD Zen 3/4, 26 for Zen 5, 6 for Intel Core) or ARM's 'CPU architecture'."""
    fields = _cpuinfo_fields()
    value = fields.get("cpu family") or fields.get("CPU architecture")
    return int(value) if value and value.isdigit() else None


def _size_kib(text: str) -> int | None:
    match = re.fullmatch(r"(\d+)\s*([KMG]?)i?B?", text.strip())
    if not match:
        return None
    return int(match.group(1)) * {"": 1 / 1024, "K": 1, "M": 1024, "G": 1024**2}[match.group(2)]


def cache_sizes(cache_dir: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> dict:
    """Sizes in KiB of the caches CPU 0 sees, one instance each: {'l1d_kib': 48, 'l1i_kib': 32,
    'l2_kib': 1024, 'l3_kib': 32768}; {} where /sys does not say (macOS)."""
    sizes = {}
    for index in sorted(cache_dir.glob("index*")):
        try:
            level = (index / "level").read_text().strip()
            kind = (index / "type").read_text().strip()
            size = _size_kib((index / "size").read_text())
        except OSError:
            continue
        suffix = {"Data": "d", "Instruction": "i"}.get(kind, "")
        if size is not None:
            sizes[f"l{level}{suffix}_kib"] = int(size)
    return sizes


def hypervisor(flags: list[str] | None = None) -> str | None:
    """The hypervisor's vendor ('KVM', 'Microsoft', 'Xen', ...) as lscpu names it; 'unknown'
    when the CPU reports the hypervisor flag but lscpu does not say whose; None on bare metal."""
    for line in (_run(["lscpu"]) or "").splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "Hypervisor vendor" and value.strip():
            return value.strip()
    if flags is None:
        flags = (_cpuinfo_fields().get("flags") or "").split()
    return "unknown" if "hypervisor" in flags else None


def kernel_env(environ=None) -> dict:
    """The set environment variables that change kernels or threads (XLA_FLAGS, OMP_*, ...)."""
    environ = os.environ if environ is None else environ
    return {key: environ[key] for key in sorted(environ)
            if key in KERNEL_ENV or key.startswith(KERNEL_ENV_PREFIXES)}


def steal_counters(stat_text: str | None = None) -> dict:
    """CPU time counters from /proc/stat's 'cpu' line, in clock ticks: {'steal', 'total'}
    (total = user + nice + system + idle + iowait + irq + softirq + steal; guest time is
    already inside user). {} where /proc/stat does not exist."""
    if stat_text is None:
        try:
            stat_text = Path("/proc/stat").read_text()
        except OSError:
            return {}
    for line in stat_text.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            ticks = [int(value) for value in fields[1:9]]
            ticks += [0] * (8 - len(ticks))  # kernels before 2.6.11 have no steal field
            return {"steal": ticks[7], "total": sum(ticks[:8])}
    return {}


def steal_pct(before: dict, after: dict) -> float | None:
    """Percent of all CPU time between two steal_counters() the hypervisor gave to other
    guests; None when either reading is missing or no time passed."""
    if not before or not after:
        return None
    elapsed = after["total"] - before["total"]
    if elapsed <= 0:
        return None
    return 100.0 * (after["steal"] - before["steal"]) / elapsed


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def framework_threads(framework: str) -> dict:
    """Intra-op and inter-op threads `framework` will use in this process (imports it, so
    call it from a cell's own process). {'intra_op', 'inter_op', 'source'}."""
    if framework == "torch":
        import torch

        return {"intra_op": torch.get_num_threads(), "inter_op": torch.get_num_interop_threads(),
                "source": "torch.get_num_threads / get_num_interop_threads"}
    if framework == "tensorflow":
        import tensorflow as tf

        # 0 means TensorFlow's default: one thread per available core for each pool.
        intra = tf.config.threading.get_intra_op_parallelism_threads() or _available_cores()
        inter = tf.config.threading.get_inter_op_parallelism_threads() or _available_cores()
        return {"intra_op": intra, "inter_op": inter, "source": "tf.config.threading (0 read as one per core)"}
    if framework == "jax":
        # XLA's CPU client has no API for its pool size: one Eigen thread per available core,
        # or 1 when XLA_FLAGS turns multi-threaded Eigen off. Ops are dispatched one stream deep.
        single = "--xla_cpu_multi_thread_eigen=false" in os.environ.get("XLA_FLAGS", "")
        return {"intra_op": 1 if single else _available_cores(), "inter_op": 1,
                "source": "XLA CPU: one Eigen thread per available core (no API; from XLA_FLAGS and affinity)"}
    raise ValueError(f"Unsupported framework. Received: framework={framework!r}; valid: jax, tensorflow, torch")


def slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def cpu_slug(model: str) -> str:
    """'AMD EPYC 7B13 64-Core Processor' -> 'amd-epyc-7b13'; the marketing words go."""
    words = re.sub(r"\((r|tm)\)|@.*$|\bcpu\b|\bprocessor\b|\b\d+-core\b|\bwith .*$", " ", model, flags=re.IGNORECASE)
    return slugify(words)[:32].strip("-") or "unknown-cpu"


def machine_slug(machine: dict) -> str:
    """A short folder name for a machine: 'cpu-amd-epyc-2c-avx512' or 'gpu-nvidia-h100-80gb-hbm3'.

    A CPU machine's name ends with its ISA class, because the same CPU name covers hosts
    with and without AVX-512 whose kernels (and rankings) differ. Records written before
    the ISA was recorded have no 'isa' and keep their old name ('cpu-amd-epyc-2c')."""
    gpus = machine.get("gpus") or []
    if gpus:
        count = f"-x{len(gpus)}" if len(gpus) > 1 else ""
        return f"gpu-{slugify(gpus[0]['name'])[:40]}{count}"
    isa = f"-{slugify(machine['isa'])}" if machine.get("isa") else ""
    return f"cpu-{cpu_slug(machine['cpu'])}-{machine['cores']}c{isa}"


def describe_machine() -> dict:
    gpus = nvidia_gpus()
    flags = cpu_flags()
    machine = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "ram_gb": ram_gb(),
        "gpu": gpus[0]["name"] if gpus else None,
        "gpu_driver": gpus[0]["driver"] if gpus else None,
        "gpus": gpus,
        "system": platform.platform(),
        "cpu_family": cpu_family(),
        "cpu_flags": flags,
        "isa": isa_class(flags),
        "cache": cache_sizes(),
        "hypervisor": hypervisor(),
        "kernel_env": kernel_env(),
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
