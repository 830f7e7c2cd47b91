"""Container limits: the CPU quota and memory limit the kernel's cgroups put on this process.

`os.sched_getaffinity` and the RAM the kernel reports ignore them, so a container given 2 CPUs
and 8 GiB on a 64-core, 256 GiB host would otherwise plan 64 threads and a 256 GiB memory check.

`read_cgroup_limits(root, self_cgroup)` reads, for this process's cgroup and every ancestor up to
the mount (the tightest limit wins):
- cgroup v2: `cpu.max` ("max 100000" or "QUOTA PERIOD") and `memory.max` ("max" or bytes);
- cgroup v1: `cpu.cfs_quota_us` / `cpu.cfs_period_us` (quota -1 is no limit) under the `cpu`
  controller's mount, and `memory.limit_in_bytes` under `memory` (v1 reports "no limit" as a huge
  page-aligned number, 2^63 rounded down to a page).
The paths are parameters so tests can hand it fake cgroup trees.

Limits: `cpu.max` is a time quota, not a set of cores; cpuft rounds it up to whole CPUs for its
thread count. cpuset limits are already in the affinity mask. Memory limits count the page cache
too, so a run near the limit may be slowed by reclaim before it is killed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

# cgroup v1 reports "unlimited" as LONG_MAX rounded down to the page size; anything this large
# is no limit on any machine that exists.
V1_UNLIMITED_THRESHOLD = 2**62
V1_CPU_MOUNTS = ("cpu", "cpu,cpuacct", "cpuacct,cpu")


@dataclass(frozen=True)
class CgroupLimits:
    cpus: float | None = None  # CPU time quota in CPUs (1.5 = 150 ms per 100 ms); None: none
    memory_bytes: int | None = None  # memory limit in bytes; None: none
    cpu_source: str = ""  # the file that set `cpus`
    memory_source: str = ""  # the file that set `memory_bytes`

    @property
    def whole_cpus(self) -> int | None:
        """The quota rounded up to whole CPUs: the threads that can run at once without throttling."""
        return None if self.cpus is None else max(1, math.ceil(self.cpus - 1e-9))


def read_cgroup_limits(root: str | Path = "/sys/fs/cgroup", self_cgroup: str | Path = "/proc/self/cgroup") -> CgroupLimits:
    """The tightest CPU quota and memory limit over this process's cgroup and its ancestors."""
    root = Path(root)
    paths = _cgroup_paths(Path(self_cgroup))
    cpu_candidates: list[tuple[float, str]] = []
    memory_candidates: list[tuple[int, str]] = []

    v2_path = paths.get("", "/")
    for directory in _dirs_up_to(root, v2_path):
        quota = _read_v2_cpu_max(directory / "cpu.max")
        if quota is not None:
            cpu_candidates.append((quota, str(directory / "cpu.max")))
        memory = _read_limit(directory / "memory.max")
        if memory is not None:
            memory_candidates.append((memory, str(directory / "memory.max")))

    for mount in V1_CPU_MOUNTS:
        for directory in _dirs_up_to(root / mount, paths.get("cpu", "/")):
            quota = _read_v1_cpu_quota(directory)
            if quota is not None:
                cpu_candidates.append((quota, str(directory / "cpu.cfs_quota_us")))
    for directory in _dirs_up_to(root / "memory", paths.get("memory", "/")):
        memory = _read_limit(directory / "memory.limit_in_bytes")
        if memory is not None:
            memory_candidates.append((memory, str(directory / "memory.limit_in_bytes")))

    cpus, cpu_source = min(cpu_candidates) if cpu_candidates else (None, "")
    memory_bytes, memory_source = min(memory_candidates) if memory_candidates else (None, "")
    return CgroupLimits(cpus=cpus, memory_bytes=memory_bytes, cpu_source=cpu_source, memory_source=memory_source)


def _cgroup_paths(self_cgroup: Path) -> dict[str, str]:
    """{controller: cgroup path} from /proc/self/cgroup ("" is the v2 unified hierarchy)."""
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        return {}
    paths: dict[str, str] = {}
    for line in lines:
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        for controller in controllers.split(",") if controllers else [""]:
            paths[controller] = path or "/"
    return paths


def _dirs_up_to(mount: Path, cgroup_path: str) -> list[Path]:
    """The process's cgroup directory under `mount` and each ancestor up to `mount`, that exist.

    Inside a container the mount is often the container's own cgroup while /proc/self/cgroup
    still names the host's path; then only the mount itself exists and is read.
    """
    relative = [p for p in cgroup_path.strip("/").split("/") if p]
    dirs = [mount.joinpath(*relative[:depth]) for depth in range(len(relative), -1, -1)]
    return [d for d in dirs if d.is_dir()]


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _read_v2_cpu_max(path: Path) -> float | None:
    text = _read_text(path)
    if not text:
        return None
    fields = text.split()
    if fields[0] == "max":
        return None
    try:
        quota = int(fields[0])
        period = int(fields[1]) if len(fields) > 1 else 100_000
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _read_v1_cpu_quota(directory: Path) -> float | None:
    quota_text, period_text = _read_text(directory / "cpu.cfs_quota_us"), _read_text(directory / "cpu.cfs_period_us")
    try:
        quota, period = int(quota_text or "-1"), int(period_text or "100000")
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _read_limit(path: Path) -> int | None:
    text = _read_text(path)
    if not text or text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return value if 0 < value < V1_UNLIMITED_THRESHOLD else None
