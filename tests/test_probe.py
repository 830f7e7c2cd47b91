"""The probe: container limits read from hand-written cgroup trees, and this machine's facts
checked against what the kernel itself reports (/proc/cpuinfo, /proc/meminfo, nproc)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from cpuft.hardware.cgroup import read_cgroup_limits
from cpuft.hardware.probe import Machine, probe_machine
from cpuft.planning.memory import usable_capacity
from cpuft.planning.plan import PlanRequest, plan_for
from cpuft.planning.report import format_env_table
from tests.conftest import run_cpuft

GIB = 2**30
V1_NO_LIMIT = "9223372036854771712"  # what cgroup v1 prints for an unlimited memory.limit_in_bytes


def cgroup_tree(tmp_path: Path, files: dict[str, str], self_cgroup: str = "0::/\n") -> tuple[Path, Path]:
    """A fake /sys/fs/cgroup with `files` ({relative path: content}) and a /proc/self/cgroup."""
    root = tmp_path / "cgroup"
    for relative, content in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content + "\n")
    root.mkdir(exist_ok=True)
    proc = tmp_path / "self_cgroup"
    proc.write_text(self_cgroup)
    return root, proc


# ----------------------------------------------------------------------------- cgroup v2


def test_v2_without_limits(tmp_path):
    limits = read_cgroup_limits(*cgroup_tree(tmp_path, {"cpu.max": "max 100000", "memory.max": "max"}))
    assert (limits.cpus, limits.whole_cpus, limits.memory_bytes) == (None, None, None)


def test_v2_quota_and_memory_limit(tmp_path):
    limits = read_cgroup_limits(*cgroup_tree(tmp_path, {"cpu.max": "150000 100000", "memory.max": "8589934592"}))
    assert limits.cpus == 1.5 and limits.whole_cpus == 2  # 150 ms per 100 ms: two threads at once
    assert limits.memory_bytes == 8 * GIB
    assert limits.cpu_source.endswith("cpu.max") and limits.memory_source.endswith("memory.max")


def test_v2_an_ancestors_limit_applies_to_the_child(tmp_path):
    root, proc = cgroup_tree(tmp_path, {
        "user.slice/memory.max": "4294967296",
        "user.slice/job/memory.max": "max",
        "user.slice/job/cpu.max": "50000 100000",
    }, self_cgroup="0::/user.slice/job\n")
    limits = read_cgroup_limits(root, proc)
    assert limits.memory_bytes == 4 * GIB and limits.memory_source.endswith("user.slice/memory.max")
    assert limits.cpus == 0.5 and limits.whole_cpus == 1


# ----------------------------------------------------------------------------- cgroup v1


def test_v1_minus_one_and_the_huge_number_mean_no_limit(tmp_path):
    root, proc = cgroup_tree(tmp_path, {
        "cpu,cpuacct/cpu.cfs_quota_us": "-1",
        "cpu,cpuacct/cpu.cfs_period_us": "100000",
        "memory/memory.limit_in_bytes": V1_NO_LIMIT,
    }, self_cgroup="4:memory:/\n3:cpu,cpuacct:/\n")
    limits = read_cgroup_limits(root, proc)
    assert (limits.cpus, limits.memory_bytes) == (None, None)


def test_v1_numbers_seen_from_inside_a_container(tmp_path):
    # /proc/self/cgroup names the host's path; the container sees its own cgroup at the mount.
    root, proc = cgroup_tree(tmp_path, {
        "cpu/cpu.cfs_quota_us": "200000",
        "cpu/cpu.cfs_period_us": "100000",
        "memory/memory.limit_in_bytes": "2147483648",
    }, self_cgroup="4:memory:/docker/0123abcd\n1:cpu:/docker/0123abcd\n")
    limits = read_cgroup_limits(root, proc)
    assert limits.cpus == 2.0 and limits.whole_cpus == 2
    assert limits.memory_bytes == 2 * GIB


def test_no_cgroup_filesystem_means_no_limits(tmp_path):
    limits = read_cgroup_limits(tmp_path / "absent", tmp_path / "absent-self")
    assert (limits.cpus, limits.memory_bytes) == (None, None)


# ----------------------------------------------------------------------------- probe -> plan


def test_probe_caps_threads_and_ram_by_the_cgroup_limits(tmp_path):
    root, proc = cgroup_tree(tmp_path, {"cpu.max": "50000 100000", "memory.max": str(GIB)})
    machine = probe_machine(cgroup_root=root, self_cgroup=proc)
    assert machine.usable_cpus == 1  # half a CPU of time: one thread
    assert machine.cgroup_cpu_limit == 0.5
    assert machine.ram_bytes == GIB and machine.cgroup_memory_limit_bytes == GIB
    plan = plan_for(machine, PlanRequest())
    assert plan.threads == 1
    capacity, label = usable_capacity(machine, "cpu")
    assert capacity == int(0.9 * GIB) and "cgroup memory limit" in label
    table = format_env_table(machine, plan)
    assert "cgroup memory limit 1.0 GiB" in table and "cgroup CPU quota 0.5 CPUs" in table


@pytest.mark.skipif(not Path("/proc/meminfo").is_file(), reason="needs Linux's /proc/meminfo")
def test_a_limit_above_the_physical_ram_changes_nothing(tmp_path):
    root, proc = cgroup_tree(tmp_path, {"memory.max": str(2**50)})  # 1 PiB
    machine = probe_machine(cgroup_root=root, self_cgroup=proc)
    assert machine.cgroup_memory_limit_bytes == 2**50
    assert machine.ram_bytes == pytest.approx(_meminfo_total_bytes(), rel=0.01)


def test_env_plans_threads_for_a_described_container(tmp_path):
    machine = {"machine": {"cpu_name": "Intel Xeon", "cpu_flags": ["avx512_f", "avx2", "fma3"], "physical_cores": 16,
                           "logical_cores": 32, "usable_cpus": 2, "cgroup_cpu_limit": 1.5, "ram_bytes": 8 * GIB,
                           "cgroup_memory_limit_bytes": 8 * GIB}}
    (tmp_path / "container.json").write_text(json.dumps(machine))
    result = run_cpuft("env", "--json", "--machine", tmp_path / "container.json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["plan"]["threads"] == 2
    assert data["machine"]["cgroup_memory_limit_bytes"] == 8 * GIB
    table = run_cpuft("env", "--machine", tmp_path / "container.json")
    assert "cgroup CPU quota 1.5 CPUs" in table.stdout and "cgroup memory limit 8.0 GiB" in table.stdout


# ----------------------------------------------------------------------------- this machine, seen by the kernel


def _cpuinfo() -> tuple[set[str], dict[str, str], int]:
    """(flags, first processor's fields, number of processors) as the kernel lists them."""
    text = Path("/proc/cpuinfo").read_text()
    first = text.split("\n\n")[0]
    fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in first.splitlines())}
    processors = sum(1 for line in text.splitlines() if line.startswith("processor"))
    return set(fields.get("flags", "").split()), fields, processors


def _meminfo_total_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no MemTotal in /proc/meminfo")


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="needs Linux's /proc/cpuinfo")
def test_env_json_agrees_with_the_kernel():
    result = run_cpuft("env", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    machine, plan = data["machine"], data["plan"]
    flags, fields, processors = _cpuinfo()
    # The kernel's flag names differ from torch's for AVX-512 Foundation only.
    for ours, kernel in [("amx_bf16", "amx_bf16"), ("avx512_bf16", "avx512_bf16"), ("avx512_f", "avx512f"), ("avx2", "avx2")]:
        assert (ours in machine["cpu_flags"]) == (kernel in flags), ours
    assert machine["cpu_vendor_id"] == fields.get("vendor_id", "")
    assert machine["cpu_family"] == (int(fields["cpu family"]) if "cpu family" in fields else None)
    assert machine["logical_cores"] == processors
    nproc = int(subprocess.run([shutil.which("nproc") or "nproc"], capture_output=True, text=True).stdout)
    assert machine["usable_cpus"] <= nproc  # nproc honours the affinity mask, not the cgroup quota
    if machine["cgroup_cpu_limit"] is None:
        assert machine["usable_cpus"] == nproc == len(os.sched_getaffinity(0))
    physical = _meminfo_total_bytes()
    assert machine["ram_bytes"] <= physical + 4096
    if machine["cgroup_memory_limit_bytes"] is None:
        assert machine["ram_bytes"] == pytest.approx(physical, rel=0.01)
    if not machine["cuda_devices"]:
        native_bf16 = "amx_bf16" in flags or "avx512_bf16" in flags
        assert (plan["device"], plan["dtype"]) == ("cpu", "bf16" if native_bf16 else "fp32")


def test_machine_with_limits_round_trips_through_json():
    machine = Machine(cpu_name="AMD EPYC 9B14", cpu_flags=frozenset({"avx512_f", "avx2"}), physical_cores=4,
                      logical_cores=8, usable_cpus=2, ram_bytes=8 * GIB, cpu_vendor_id="AuthenticAMD", cpu_family=25,
                      cgroup_cpu_limit=1.5, cgroup_memory_limit_bytes=8 * GIB)
    assert Machine.from_dict(json.loads(json.dumps(machine.to_dict()))) == machine
    assert machine.to_dict()["cpu_vendor"] == "amd"
