#!/usr/bin/env python3
"""Summarise a Terraform plan of infra/ for a human: which VMs, what they cost per hour, the worst case.

Reads `terraform show -json PLANFILE` on stdin; standard library only. scripts/gcp/provision prints
this before asking to apply. The prices come from the plan's outputs, i.e. from cpuft/planning/gcp_prices.csv (or
the table given with provision --prices), so they are estimates: check current prices at
https://cloud.google.com/compute/vm-instance-pricing.

Exit codes: 0 printed, 2 the input is not a plan of infra/.
"""

from __future__ import annotations

import json
import sys
from typing import Any


def planned_outputs(plan: dict[str, Any]) -> dict[str, Any]:
    """Output values known at plan time (unknown ones are left out)."""
    values = {}
    for name, change in plan.get("output_changes", {}).items():
        if "after" in change and not change.get("after_unknown"):
            values[name] = change["after"]
    for name, output in plan.get("planned_values", {}).get("outputs", {}).items():
        if "value" in output:
            values[name] = output["value"]
    return values


def resource_counts(plan: dict[str, Any]) -> dict[str, int]:
    counts = {"create": 0, "update": 0, "delete": 0}
    for change in plan.get("resource_changes", []):
        actions = change.get("change", {}).get("actions", [])
        for action in ("create", "update", "delete"):
            if action in actions:
                counts[action] += 1
    return counts


def money(value: float | None) -> str:
    return "unknown (machine type not in the price table)" if value is None else f"${value:,.2f}"


def summary(plan: dict[str, Any]) -> str:
    out = planned_outputs(plan)
    if "vms" not in out or "max_run_hours" not in out:
        raise ValueError("this plan has no 'vms'/'max_run_hours' outputs; is it a plan of infra/?")
    lines = [f"cpuft stack '{out.get('stack_name', '?')}' in project {out.get('project_id', '?')}, zone {out.get('zone', '?')}:"]
    for role, vm in sorted(out["vms"].items()):
        kind = "Spot" if vm.get("spot") else "on-demand"
        other = vm.get("hourly_usd_on_demand") if vm.get("spot") else vm.get("hourly_usd_spot")
        other_kind = "on-demand" if vm.get("spot") else "Spot"
        extra = f" ({other_kind} would be {money(other)}/h)" if other is not None else ""
        lines.append(f"  {vm['name']:<22} {vm['machine_type']:<16} {kind:<9} ~ {money(vm.get('hourly_usd'))}/h{extra}")
    if not out["vms"]:
        lines.append("  (no VM: cpu_vm and gpu_vm are both false)")
    hours = out["max_run_hours"]
    if out.get("recreate_on_preemption"):
        lines.append(
            f"Expected cost: ~ {money(out.get('hourly_usd'))} per hour for the VMs. Each VM deletes itself, boot disk "
            f"included, after {hours:g} h of running and its instance group recreates it (after a preemption too); the "
            f"VM deletes the group when the queue drains or the group is {out['max_total_hours']:g} h old, so one "
            f"provisioning costs at most ~ {money(out.get('max_cost_usd'))} (plus disk, NAT and egress: cents per hour)."
        )
    else:
        lines.append(
            f"Expected cost: ~ {money(out.get('hourly_usd'))} per hour for the VMs. Each VM deletes itself, boot disk "
            f"included, after {hours:g} h of running, so one provisioning costs at most ~ {money(out.get('max_cost_usd'))} "
            "(plus disk, NAT and egress: cents per hour)."
        )
    if len(out.get("nodes") or []) > 1:
        lines.append(
            f"{len(out['nodes'])} nodes train one job together (compact placement, rendezvous at "
            f"{out.get('rdzv_endpoint', '?')}); scripts/gcp/run starts it on each."
        )
    if out.get("results_bucket"):
        lines.append(f"Results bucket: {out['results_bucket']} (standard storage, objects expire by lifecycle rule).")
    counts = resource_counts(plan)
    lines.append(
        f"Terraform will create {counts['create']}, change {counts['update']} and destroy {counts['delete']} resources."
    )
    for warning in out.get("warnings") or []:
        lines.append(f"WARNING: {warning}")
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    try:
        plan = json.load(sys.stdin)
        print(summary(plan))
    except (json.JSONDecodeError, ValueError) as exc:
        print(f"plan_summary.py: cannot read the plan: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
