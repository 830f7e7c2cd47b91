"""Human-readable tables for machine facts and plans (`cpuft env`, the header of `cpuft sft`)."""

from __future__ import annotations

import shutil
import textwrap

from cpuft.hardware.probe import Machine
from cpuft.planning.plan import Plan


def machine_rows(machine: Machine) -> list[tuple[str, str]]:
    gpus = ", ".join(
        f"{d.name} ({d.total_memory_bytes / 2**30:.0f} GiB, bf16 {'yes' if d.bf16_supported else 'no'})"
        for d in machine.cuda_devices
    ) or "none"
    flags = ", ".join(sorted(machine.cpu_flags)) or "none of the planner's"
    mhz = f"{machine.cpu_max_mhz:.0f} MHz" if machine.cpu_max_mhz else "unknown"
    cpu_limit = (
        f" (cgroup CPU quota {machine.cgroup_cpu_limit:g} CPUs)" if machine.cgroup_cpu_limit is not None else ""
    )
    ram = f"{machine.ram_bytes / 2**30:.1f} GiB usable"
    if machine.cgroup_memory_limit_bytes is not None:
        ram += f" (cgroup memory limit {machine.cgroup_memory_limit_bytes / 2**30:.1f} GiB)"
    return [
        ("cpu", f"{machine.cpu_name}: {machine.cpu_summary}"),
        ("cpu flags", flags),
        ("torch cpu isa", machine.torch_cpu_isa or "unknown"),
        ("cores", f"{machine.physical_cores} physical, {machine.logical_cores} logical,"
                  f" {machine.usable_cpus} usable{cpu_limit}, {machine.sockets} socket(s)"),
        ("numa nodes", str(machine.numa_nodes)),
        ("clock", mhz),
        ("ram", ram),
        ("cuda", gpus),
        ("torch", machine.torch_version or "unknown"),
    ]


def format_env_table(machine: Machine, plan: Plan | None) -> str:
    width = min(shutil.get_terminal_size((110, 20)).columns, 140)
    lines = ["Machine"]
    for name, value in machine_rows(machine):
        lines.append(f"  {name:<14} {value}")
    if plan is not None:
        lines.append("")
        lines.append("Plan")
        rows = plan.rows()
        # As wide as the longest value (DDP's world and batch run long), within reason: a longer
        # one pushes its own row's reason right.
        value_width = min(32, max(24, *(len(value) for _, value, _ in rows)))
        for name, value, why in rows:
            head = f"  {name:<22} {value:<{value_width}} "
            wrapped = textwrap.wrap(why, max(30, width - len(head))) or [""]
            lines.append(head + wrapped[0])
            lines.extend(" " * len(head) + more for more in wrapped[1:])
        for warning in plan.warnings:
            lines.append(f"  warning: {warning}")
    return "\n".join(lines)
