"""Probe the machine once: CPU features and vendor, cores, NUMA, RAM, container limits, CUDA devices.

The probe is the only place that looks at hardware. It returns a frozen `Machine`; the planner
and everything after it read that value and never re-probe, so tests can hand the planner any
machine (`Machine.from_dict`) without owning one.

`usable_cpus` and `ram_bytes` are what this process may use: the affinity mask and physical RAM,
each capped by the cgroup limits (`cpuft.hardware.cgroup`), which are kept in the Machine too so
`cpuft env` can say where a cap came from.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

from cpuft.hardware.cgroup import read_cgroup_limits

# The CPU features that change a plan. torch.cpu.get_capabilities() reports many more.
PLAN_RELEVANT_CPU_FLAGS = (
    "amx_bf16",
    "amx_int8",
    "amx_tile",
    "amx_fp16",
    "avx512_bf16",
    "avx512_f",
    "avx512_vnni",
    "avx_vnni",
    "avx2",
    "fma3",
)


@dataclass(frozen=True)
class CudaDevice:
    name: str
    total_memory_bytes: int
    bf16_supported: bool
    compute_capability: str = ""


@dataclass(frozen=True)
class Machine:
    """What the planner needs to know about a machine. Plain data, printable, comparable."""

    cpu_name: str
    cpu_flags: frozenset[str]
    physical_cores: int
    logical_cores: int
    usable_cpus: int  # affinity mask capped by the cgroup CPU quota: what this process may run on
    sockets: int = 1
    numa_nodes: int = 1
    ram_bytes: int = 0  # physical RAM capped by the cgroup memory limit: what this process may use
    cpu_max_mhz: float | None = None
    torch_cpu_isa: str = ""  # the ISA torch dispatches CPU kernels to, e.g. "AVX2", "AVX512"
    cuda_devices: tuple[CudaDevice, ...] = field(default_factory=tuple)
    torch_version: str = ""
    os: str = ""
    cpu_vendor_id: str = ""  # /proc/cpuinfo vendor_id: "GenuineIntel", "AuthenticAMD"
    cpu_family: int | None = None  # /proc/cpuinfo "cpu family" (AMD: 25 = Zen 3/4, 26 = Zen 5)
    cgroup_cpu_limit: float | None = None  # cgroup CPU quota in CPUs; None: no quota
    cgroup_memory_limit_bytes: int | None = None  # cgroup memory limit; None: no limit

    def has(self, flag: str) -> bool:
        return flag in self.cpu_flags

    @property
    def vendor(self) -> str:
        """"amd", "intel" or "": from vendor_id, else from the CPU's name (machine files, cloud types)."""
        vendor_id = self.cpu_vendor_id.lower()
        name = self.cpu_name.lower()
        if "amd" in vendor_id or any(word in name for word in ("amd", "epyc", "ryzen")):
            return "amd"
        if "intel" in vendor_id or any(word in name for word in ("intel", "xeon")):
            return "intel"
        return ""

    @property
    def native_bf16(self) -> bool:
        """True where the CPU computes bf16 in hardware (AMX or AVX-512-BF16), not emulated."""
        return self.has("amx_bf16") or self.has("avx512_bf16")

    @property
    def cpu_summary(self) -> str:
        if self.has("amx_bf16"):
            return "AMX (bf16, int8)" if self.has("amx_int8") else "AMX (bf16)"
        if self.has("avx512_bf16"):
            return "AVX-512 with BF16"
        if self.has("avx512_f"):
            return "AVX-512 (no bf16)"
        if self.has("avx2"):
            return "AVX2 (no AVX-512, no AMX)"
        return "no AVX2"

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["cpu_flags"] = sorted(self.cpu_flags)
        data["cuda_devices"] = [dataclasses.asdict(d) for d in self.cuda_devices]
        data["cpu_summary"] = self.cpu_summary
        data["cpu_vendor"] = self.vendor
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Machine:
        data = {k: v for k, v in data.items() if k in {f.name for f in dataclasses.fields(cls)}}
        data["cpu_flags"] = frozenset(data.get("cpu_flags", ()))
        data["cuda_devices"] = tuple(CudaDevice(**d) for d in data.get("cuda_devices", ()))
        data.setdefault("usable_cpus", data.get("logical_cores", 1))
        return cls(**data)


def probe_machine(cgroup_root: str | Path = "/sys/fs/cgroup", self_cgroup: str | Path = "/proc/self/cgroup") -> Machine:
    """Read this machine's facts. Cheap (no benchmarks); imports torch.

    `cgroup_root` and `self_cgroup` say where the cgroup limits are read (tests pass fake trees).
    """
    import torch

    caps = torch.cpu.get_capabilities()
    flags = frozenset(f for f in PLAN_RELEVANT_CPU_FLAGS if caps.get(f))
    logical = int(caps.get("num_logical_cores") or os.cpu_count() or 1)
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else logical
    limits = read_cgroup_limits(cgroup_root, self_cgroup)
    physical_ram = _total_ram_bytes()
    ram = physical_ram
    if limits.memory_bytes is not None:
        ram = min(physical_ram, limits.memory_bytes) if physical_ram else limits.memory_bytes
    cpuinfo = _cpuinfo_first_processor()
    return Machine(
        cpu_name=str(caps.get("cpu_name") or cpuinfo.get("model name") or platform.processor() or "unknown"),
        cpu_flags=flags,
        physical_cores=int(caps.get("num_physical_cores") or logical),
        logical_cores=logical,
        usable_cpus=min(affinity, limits.whole_cpus) if limits.whole_cpus else affinity,
        sockets=int(caps.get("num_sockets") or 1),
        numa_nodes=_count_numa_nodes(),
        ram_bytes=ram,
        cpu_max_mhz=_cpu_max_mhz(),
        torch_cpu_isa=torch.backends.cpu.get_cpu_capability(),
        cuda_devices=_cuda_devices(torch),
        torch_version=torch.__version__,
        os=f"{platform.system()} {platform.release()}",
        cpu_vendor_id=cpuinfo.get("vendor_id", ""),
        cpu_family=_int_or_none(cpuinfo.get("cpu family")),
        cgroup_cpu_limit=limits.cpus,
        cgroup_memory_limit_bytes=limits.memory_bytes,
    )


def _cuda_devices(torch) -> tuple[CudaDevice, ...]:
    if not torch.cuda.is_available():
        return ()
    devices = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        devices.append(
            CudaDevice(
                name=props.name,
                total_memory_bytes=int(props.total_memory),
                # Ampere (8.x) and later compute bf16 natively.
                bf16_supported=props.major >= 8,
                compute_capability=f"{props.major}.{props.minor}",
            )
        )
    return tuple(devices)


def _count_numa_nodes() -> int:
    nodes = glob.glob("/sys/devices/system/node/node[0-9]*")
    return max(1, len(nodes))


def _total_ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _cpuinfo_first_processor() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (x86 Linux); {} elsewhere."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def _int_or_none(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _cpu_max_mhz() -> float | None:
    """Max clock if the kernel exposes it; VMs often hide cpufreq, so fall back to /proc/cpuinfo."""
    try:
        with open("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq") as f:
            return int(f.read().strip()) / 1000.0
    except (OSError, ValueError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            mhz = [float(line.split(":")[1]) for line in f if line.startswith("cpu MHz")]
        return max(mhz) if mhz else None
    except (OSError, ValueError):
        return None
