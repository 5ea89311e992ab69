"""benchmarks/machine.py: the ISA class, flags, caches, steal time and the folder name."""

import os

import pytest

from benchmarks import machine

# Flags as /proc/cpuinfo prints them on three kinds of host (trimmed, order kept).
AVX512_HOST = ("fpu sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c hypervisor avx2 bmi2 avx512f avx512dq "
               "avx512cd avx512bw avx512vl avx_vnni avx512_bf16 avx512_vnni amx_bf16 amx_tile").split()
AVX2_HOST = "fpu sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c hypervisor avx2 bmi2 sha_ni".split()
ARM_HOST = "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics asimdhp asimddp sve i8mm bf16".split()


@pytest.mark.parametrize("flags, architecture, isa", [
    (AVX512_HOST, "x86_64", "avx512"),
    (AVX2_HOST, "x86_64", "avx2"),
    (ARM_HOST, "aarch64", "arm64"),
    (ARM_HOST, "x86_64", "arm64"),  # NEON's flag says ARM whatever the caller passed
    ([], "arm64", "arm64"),  # macOS on Apple silicon: no /proc/cpuinfo
    ("sse sse2 sse4_2 avx".split(), "x86_64", "avx"),
    ("sse sse2 sse4_2".split(), "x86_64", "sse"),
    ([], "x86_64", "other"),
])
def test_isa_class_is_the_widest_vector_isa(flags, architecture, isa):
    assert machine.isa_class(flags, architecture) == isa


def test_kernel_flags_keep_only_those_that_change_kernels():
    assert machine.kernel_flags(AVX512_HOST) == [
        "amx_bf16", "amx_tile", "avx", "avx2", "avx512_bf16", "avx512_vnni", "avx512bw", "avx512cd", "avx512dq",
        "avx512f", "avx512vl", "avx_vnni", "f16c", "fma", "sse4_2"]
    assert machine.kernel_flags(AVX2_HOST) == ["avx", "avx2", "f16c", "fma", "sse4_2"]
    assert machine.kernel_flags(ARM_HOST) == ["asimd", "asimddp", "asimdhp", "bf16", "i8mm", "sve"]


def test_slug_names_the_isa_so_two_hosts_of_one_cpu_name_get_two_folders():
    host = {"cpu": "AMD EPYC 7B13 64-Core Processor", "cores": 2, "gpus": []}
    assert machine.machine_slug({**host, "isa": "avx512"}) == "cpu-amd-epyc-7b13-2c-avx512"
    assert machine.machine_slug({**host, "isa": "avx2"}) == "cpu-amd-epyc-7b13-2c-avx2"
    # Records written before the ISA was recorded keep the folder they were filed under.
    assert machine.machine_slug(host) == "cpu-amd-epyc-7b13-2c"
    gpu = {**host, "isa": "avx512", "gpus": [{"name": "NVIDIA H100 80GB HBM3"}]}
    assert machine.machine_slug(gpu) == "gpu-nvidia-h100-80gb-hbm3"


def test_cache_sizes_read_from_a_sys_tree(tmp_path):
    for index, (level, kind, size) in enumerate([("1", "Data", "48K"), ("1", "Instruction", "32K"),
                                                  ("2", "Unified", "1024K"), ("3", "Unified", "32M")]):
        folder = tmp_path / f"index{index}"
        folder.mkdir()
        (folder / "level").write_text(level + "\n")
        (folder / "type").write_text(kind + "\n")
        (folder / "size").write_text(size + "\n")
    assert machine.cache_sizes(tmp_path) == {"l1d_kib": 48, "l1i_kib": 32, "l2_kib": 1024, "l3_kib": 32768}
    assert machine.cache_sizes(tmp_path / "missing") == {}


def test_kernel_env_keeps_the_variables_that_change_kernels():
    environ = {"XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false", "OMP_NUM_THREADS": "2", "MKL_DEBUG_CPU_TYPE": "5",
               "KMP_AFFINITY": "compact", "TF_ENABLE_ONEDNN_OPTS": "0", "TF_NUM_INTRAOP_THREADS": "1",
               "HOME": "/root", "PATH": "/bin", "TF_CPP_MIN_LOG_LEVEL": "2"}
    assert machine.kernel_env(environ) == {
        "KMP_AFFINITY": "compact", "MKL_DEBUG_CPU_TYPE": "5", "OMP_NUM_THREADS": "2", "TF_ENABLE_ONEDNN_OPTS": "0",
        "TF_NUM_INTRAOP_THREADS": "1", "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false"}


def test_steal_percent_from_two_proc_stat_readings():
    # Fields: user nice system idle iowait irq softirq steal guest guest_nice.
    before = machine.steal_counters("cpu  100 0 50 800 10 0 5 35 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n")
    after = machine.steal_counters("cpu  160 0 70 900 10 0 5 55 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n")
    assert before == {"steal": 35, "total": 1000} and after == {"steal": 55, "total": 1200}
    assert machine.steal_pct(before, after) == pytest.approx(10.0)  # 20 stolen of 200 ticks
    assert machine.steal_pct(before, before) is None
    assert machine.steal_pct({}, after) is None


def test_this_host_is_described_consistently():
    described = machine.describe_machine()
    assert described["cpu_flags"] == sorted(described["cpu_flags"])
    assert described["isa"] == machine.isa_class(described["cpu_flags"])
    assert described["isa"] in {"avx512", "avx2", "avx", "sse", "arm64", "other"}
    if not described["gpus"]:
        assert described["slug"].endswith("-" + described["isa"])
    assert all(isinstance(size, int) and size > 0 for size in described["cache"].values())
    assert set(described["kernel_env"]) <= set(os.environ)
    counters = machine.steal_counters()
    if counters:  # Linux
        assert 0 <= counters["steal"] <= counters["total"]


def test_framework_threads_of_this_process():
    import keras

    threads = machine.framework_threads(keras.backend.backend())
    assert threads["intra_op"] >= 1 and threads["inter_op"] >= 1
    with pytest.raises(ValueError, match="framework='mxnet'"):
        machine.framework_threads("mxnet")
