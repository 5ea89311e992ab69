"""constraints-gpu.txt stays consistent with constraints.txt and the extras in pyproject.toml."""

import re
import tomllib

from tests.helpers import REPO


def pins(name: str) -> dict:
    found = {}
    for line in (REPO / name).read_text().splitlines():
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==(\S+)", line.strip())
        if match:
            found[match.group(1).lower().replace("_", "-")] = match.group(2)
    return found


def test_gpu_pins_match_the_cpu_pins():
    cpu, gpu = pins("constraints.txt"), pins("constraints-gpu.txt")
    assert "-c constraints.txt" in (REPO / "constraints-gpu.txt").read_text().splitlines()
    # The CUDA plugin wheels must be the jax/jaxlib release the project pins.
    assert gpu["jax-cuda12-plugin"] == gpu["jax-cuda12-pjrt"] == cpu["jax"] == cpu["jaxlib"]
    assert gpu["tensorflow"] == cpu["tensorflow-cpu"]
    # One version per package across the two files.
    assert {name: version for name, version in gpu.items() if name in cpu and cpu[name] != version} == {}


def test_gpu_extras_exist():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["jax-gpu"] == ["jax[cuda12]"]
    assert extras["tensorflow-gpu"] == ["tensorflow[and-cuda]"]
    assert extras["gpu"] == ["keras-mnist-backends[jax-gpu,torch-gpu]"]
