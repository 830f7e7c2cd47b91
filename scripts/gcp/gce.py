#!/usr/bin/env python3
"""Compute Engine client for cpuft's GCP stack: check a VM's teardown guarantees, reap leftovers.

Used by scripts/gcp/provision (``verify``), scripts/gcp/reaper.py (``reap``) and by hand (``list``).
Needs google-cloud-compute (scripts/gcp/requirements.txt) and Application Default Credentials
(``gcloud auth application-default login``).

What counts as cpuft's: instances and disks labelled ``managed-by=cpuft`` (infra/ puts the label on
every VM and boot disk), and zonal managed instance groups whose instance template carries that label
(infra/ with recreate_on_preemption). Nothing else is ever listed or deleted.

A VM that a managed instance group created (its ``created-by`` metadata names the group) is never
deleted on its own: the group would create another one. Its group is deleted instead, which deletes
the VM and its disk with it.

Limits:
- Without ``--zone`` every zone is searched with one aggregated list call; with ``--zone`` only those.
- Age is measured from creation, not from the last start; a group's age from the group's creation.
- Regional instance groups are not handled (infra/ creates zonal ones): a cpuft VM in one is reported
  as a failure, to be deleted by hand.
- Deleting waits for each operation (up to ``--timeout`` seconds); a timeout counts as a failure.

Testing: set ``CPUFT_GCE_ENDPOINT=http://127.0.0.1:PORT`` to talk to a local fake of the Compute API
with anonymous credentials.

Exit codes: 0 done (or nothing to do), 1 a check or a deletion failed, 2 bad input or no credentials.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import os
import re
import sys
from collections.abc import Iterable, Sequence

LABEL_KEY = "managed-by"
LABEL_VALUE = "cpuft"
STACK_LABEL = "cpuft-stack"
ENDPOINT_ENV = "CPUFT_GCE_ENDPOINT"


class UsageError(Exception):
    """Bad input: the message tells the user what to change. Exit code 2."""


# --- What we know about a VM or disk ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Vm:
    name: str
    zone: str
    status: str
    created: dt.datetime
    labels: dict[str, str]
    termination_action: str
    max_run_seconds: int
    service_accounts: tuple[str, ...]
    public_ip: bool
    secure_boot: bool
    os_login: bool
    machine_type: str
    # The managed instance group that created this VM ("" for a plain VM), from its created-by
    # metadata: "projects/NUMBER/zones/ZONE/instanceGroupManagers/NAME" (or regions/REGION/...).
    created_by: str = ""

    def age_hours(self, now: dt.datetime) -> float:
        return (now - self.created).total_seconds() / 3600

    @property
    def group(self) -> tuple[str, str] | None:
        """(zone, name) of the zonal group this VM belongs to; None for a plain VM or a regional group."""
        match = _ZONAL_GROUP.search(self.created_by)
        return (match["zone"], match["name"]) if match else None


_ZONAL_GROUP = re.compile(r"/zones/(?P<zone>[^/]+)/instanceGroupManagers/(?P<name>[^/]+)$")


@dataclasses.dataclass(frozen=True)
class Group:
    """A zonal managed instance group, with the labels its instance template gives its VMs."""

    name: str
    zone: str
    created: dt.datetime
    target_size: int
    template: str
    labels: dict[str, str]

    def age_hours(self, now: dt.datetime) -> float:
        return (now - self.created).total_seconds() / 3600


@dataclasses.dataclass(frozen=True)
class Disk:
    name: str
    zone: str
    created: dt.datetime
    labels: dict[str, str]
    attached: bool

    def age_hours(self, now: dt.datetime) -> float:
        return (now - self.created).total_seconds() / 3600


def _short(url: str) -> str:
    """'https://.../zones/us-central1-a' -> 'us-central1-a'."""
    return url.rstrip("/").rsplit("/", 1)[-1]


def _timestamp(text: str) -> dt.datetime:
    # Compute Engine writes RFC 3339 with a numeric offset, e.g. 2025-01-31T09:00:00.123-08:00.
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def vm_from_api(instance) -> Vm:
    metadata = {item.key: item.value for item in instance.metadata.items}
    return Vm(
        name=instance.name,
        zone=_short(instance.zone),
        status=instance.status,
        created=_timestamp(instance.creation_timestamp),
        labels=dict(instance.labels),
        termination_action=instance.scheduling.instance_termination_action or "",
        max_run_seconds=int(instance.scheduling.max_run_duration.seconds or 0),
        service_accounts=tuple(sa.email for sa in instance.service_accounts),
        public_ip=any(nic.access_configs for nic in instance.network_interfaces),
        secure_boot=bool(instance.shielded_instance_config.enable_secure_boot),
        os_login=metadata.get("enable-oslogin", "").upper() == "TRUE",
        machine_type=_short(instance.machine_type),
        created_by=metadata.get("created-by", ""),
    )


def vm_from_template(template, group) -> Vm:
    """What every VM the group creates from this template will be (for ``verify --group``)."""
    props = template.properties
    metadata = {item.key: item.value for item in props.metadata.items}
    return Vm(
        name=f"{group.base_instance_name}-*",
        zone=_short(group.zone),
        status="TEMPLATE",
        created=_timestamp(group.creation_timestamp),
        labels=dict(props.labels),
        termination_action=props.scheduling.instance_termination_action or "",
        max_run_seconds=int(props.scheduling.max_run_duration.seconds or 0),
        service_accounts=tuple(sa.email for sa in props.service_accounts),
        public_ip=any(nic.access_configs for nic in props.network_interfaces),
        secure_boot=bool(props.shielded_instance_config.enable_secure_boot),
        os_login=metadata.get("enable-oslogin", "").upper() == "TRUE",
        machine_type=_short(props.machine_type),
        created_by=group.self_link,
    )


def _template_of(group) -> str:
    """Name of the template a group creates VMs from (terraform sets it as the group's one version)."""
    url = group.instance_template or (group.versions[0].instance_template if group.versions else "")
    return _short(url)


def disk_from_api(disk) -> Disk:
    return Disk(
        name=disk.name,
        zone=_short(disk.zone),
        created=_timestamp(disk.creation_timestamp),
        labels=dict(disk.labels),
        attached=bool(disk.users),
    )


def is_cpufts(labels: dict[str, str], stack: str | None = None) -> bool:
    if labels.get(LABEL_KEY) != LABEL_VALUE:
        return False
    return stack is None or labels.get(STACK_LABEL) == stack


# --- Policy (pure functions, easy to test) ---------------------------------------------------


def guarantee_problems(vm: Vm, *, allow_public_ip: bool = False) -> list[str]:
    """What keeps this VM from being the self-deleting, locked-down VM infra/ promises."""
    problems = []
    if vm.termination_action != "DELETE":
        problems.append(
            f"instance_termination_action is {vm.termination_action or 'unset'!r}, not 'DELETE': "
            "when its time is up the VM would only stop, and its disk would keep billing"
        )
    if vm.max_run_seconds <= 0:
        problems.append("no max_run_duration: nothing deletes the VM if you forget it")
    if not is_cpufts(vm.labels):
        problems.append(f"label {LABEL_KEY}={LABEL_VALUE} missing: the reaper cannot find this VM")
    if not vm.service_accounts:
        problems.append("no service account attached")
    for email in vm.service_accounts:
        if email.endswith("-compute@developer.gserviceaccount.com") or email == "default":
            problems.append(f"runs as the default compute service account {email}")
    if vm.public_ip and not allow_public_ip:
        problems.append("has a public IP although SSH should go through IAP")
    if not vm.secure_boot and vm.machine_type.split("-")[0] != "g2":
        problems.append("Shielded VM Secure Boot is off")
    if not vm.os_login:
        problems.append("OS Login is not enabled (metadata enable-oslogin=TRUE)")
    return problems


def expired_vms(vms: Iterable[Vm], now: dt.datetime, older_than_hours: float, stack: str | None = None) -> list[Vm]:
    """cpuft VMs past their age limit, whatever their status: a stopped VM still bills for its disk,
    and stopping resets the clock of max_run_duration, so it would never delete itself."""
    return [vm for vm in vms if is_cpufts(vm.labels, stack) and vm.age_hours(now) >= older_than_hours]


def groups_to_reap(
    groups: Iterable[Group], vms: Iterable[Vm], now: dt.datetime, older_than_hours: float, stack: str | None = None
) -> list[tuple[str, str]]:
    """(zone, name) of the groups to delete: cpuft groups past the age limit, and the group of every
    expired cpuft VM a group created (deleting that VM alone would only make the group replace it)."""
    found = [(g.zone, g.name) for g in groups if is_cpufts(g.labels, stack) and g.age_hours(now) >= older_than_hours]
    found += [vm.group for vm in expired_vms(vms, now, older_than_hours, stack) if vm.group]
    return list(dict.fromkeys(found))


def orphan_disks(disks: Iterable[Disk], now: dt.datetime, older_than_hours: float, stack: str | None = None) -> list[Disk]:
    """cpuft disks attached to no VM (left by auto_delete=false or a half-failed delete)."""
    return [
        d for d in disks if is_cpufts(d.labels, stack) and not d.attached and d.age_hours(now) >= older_than_hours
    ]


# --- Talking to Compute Engine ----------------------------------------------------------------


class Compute:
    """Thin wrapper over google-cloud-compute's REST clients for one project."""

    def __init__(self, project: str, endpoint: str | None = None):
        try:
            from google.cloud import compute_v1
        except ImportError as exc:
            raise UsageError(
                "google-cloud-compute is not installed: pip install -r scripts/gcp/requirements.txt"
            ) from exc
        self._api = compute_v1
        self.project = project
        kwargs: dict = {"transport": "rest"}
        endpoint = endpoint or os.environ.get(ENDPOINT_ENV)
        if endpoint:
            from google.auth.credentials import AnonymousCredentials

            kwargs["credentials"] = AnonymousCredentials()
            kwargs["client_options"] = {"api_endpoint": endpoint}
        else:
            import google.auth
            import google.auth.exceptions

            try:
                google.auth.default()
            except google.auth.exceptions.DefaultCredentialsError as exc:
                raise UsageError(
                    "no Google credentials found: run `gcloud auth application-default login` "
                    "(or set GOOGLE_APPLICATION_CREDENTIALS)"
                ) from exc
        self.instances = compute_v1.InstancesClient(**kwargs)
        self.disks = compute_v1.DisksClient(**kwargs)
        self.groups = compute_v1.InstanceGroupManagersClient(**kwargs)
        self.templates = compute_v1.InstanceTemplatesClient(**kwargs)

    def get_vm(self, zone: str, name: str) -> Vm:
        return vm_from_api(self.instances.get(project=self.project, zone=zone, instance=name))

    def get_group(self, zone: str, name: str):
        """The group and its current template, as the API returns them."""
        group = self.groups.get(project=self.project, zone=zone, instance_group_manager=name)
        template = self.templates.get(project=self.project, instance_template=_template_of(group))
        return group, template

    def _group_from_api(self, group) -> Group:
        from google.api_core import exceptions as api_exceptions

        try:
            template = self.templates.get(project=self.project, instance_template=_template_of(group))
            labels = dict(template.properties.labels)
        except api_exceptions.NotFound:  # a template outside this project or already gone
            labels = {}
        return Group(
            name=group.name,
            zone=_short(group.zone),
            created=_timestamp(group.creation_timestamp),
            target_size=int(group.target_size),
            template=_template_of(group),
            labels=labels,
        )

    def list_groups(self, zones: Sequence[str] = ()) -> list[Group]:
        api = self._api
        found = []
        if zones:
            for zone in zones:
                request = api.ListInstanceGroupManagersRequest(project=self.project, zone=zone)
                found += list(self.groups.list(request=request))
        else:
            request = api.AggregatedListInstanceGroupManagersRequest(project=self.project)
            for scope, scoped in self.groups.aggregated_list(request=request):
                if scope.startswith("zones/"):
                    found += list(scoped.instance_group_managers)
        return [g for g in (self._group_from_api(g) for g in found) if is_cpufts(g.labels)]

    def delete_group(self, zone: str, name: str, timeout: float) -> None:
        self.groups.delete(project=self.project, zone=zone, instance_group_manager=name).result(timeout=timeout)

    def list_vms(self, zones: Sequence[str] = ()) -> list[Vm]:
        api = self._api
        found = []
        if zones:
            for zone in zones:
                request = api.ListInstancesRequest(project=self.project, zone=zone)
                found += [vm_from_api(i) for i in self.instances.list(request=request)]
        else:
            request = api.AggregatedListInstancesRequest(project=self.project)
            for _scope, scoped in self.instances.aggregated_list(request=request):
                found += [vm_from_api(i) for i in scoped.instances]
        # Filtered here rather than with the API's filter expression: one rule, ours, decides.
        return [vm for vm in found if is_cpufts(vm.labels)]

    def list_disks(self, zones: Sequence[str] = ()) -> list[Disk]:
        api = self._api
        found = []
        if zones:
            for zone in zones:
                request = api.ListDisksRequest(project=self.project, zone=zone)
                found += [disk_from_api(d) for d in self.disks.list(request=request)]
        else:
            request = api.AggregatedListDisksRequest(project=self.project)
            for _scope, scoped in self.disks.aggregated_list(request=request):
                found += [disk_from_api(d) for d in scoped.disks]
        return [d for d in found if is_cpufts(d.labels)]

    def delete_vm(self, vm: Vm, timeout: float) -> None:
        self.instances.delete(project=self.project, zone=vm.zone, instance=vm.name).result(timeout=timeout)

    def delete_disk(self, disk: Disk, timeout: float) -> None:
        self.disks.delete(project=self.project, zone=disk.zone, disk=disk.name).result(timeout=timeout)


# --- Commands ---------------------------------------------------------------------------------


def reap(
    compute: Compute,
    *,
    older_than_hours: float,
    zones: Sequence[str] = (),
    stack: str | None = None,
    dry_run: bool = False,
    timeout: float = 600,
    now: dt.datetime | None = None,
    out=None,
) -> int:
    """Delete expired cpuft instance groups (with their VMs), expired plain cpuft VMs, then orphaned
    cpuft disks. Returns the number of failures."""
    now = now or dt.datetime.now(dt.timezone.utc)
    out = out or sys.stdout  # looked up now: a default bound at import time outlives a redirected stdout
    verb = "would delete" if dry_run else "deleting"
    failures = 0
    all_vms = compute.list_vms(zones)
    groups = groups_to_reap(compute.list_groups(zones), all_vms, now, older_than_hours, stack)
    for zone, name in groups:
        print(f"{verb} instance group {zone}/{name} and its VMs (deleting a VM alone would only get it recreated)", file=out)
        if not dry_run:
            try:
                compute.delete_group(zone, name, timeout)
            except Exception as exc:  # keep going: one stuck group must not shield the others
                failures += 1
                print(f"  FAILED: {exc}", file=out)
    vms = expired_vms(all_vms, now, older_than_hours, stack)
    for vm in vms:
        if vm.group:
            continue  # went with its group above
        if vm.created_by:
            failures += 1
            print(f"cannot reap VM {vm.zone}/{vm.name}: it belongs to {vm.created_by}, which is not a zonal group; "
                  "delete that group by hand", file=out)
            continue
        print(f"{verb} VM {vm.zone}/{vm.name} ({vm.status}, {vm.age_hours(now):.1f} h old)", file=out)
        if not dry_run:
            try:
                compute.delete_vm(vm, timeout)
            except Exception as exc:  # keep going: one stuck VM must not shield the others
                failures += 1
                print(f"  FAILED: {exc}", file=out)
    disks = orphan_disks(compute.list_disks(zones), now, older_than_hours, stack)
    for disk in disks:
        print(f"{verb} unattached disk {disk.zone}/{disk.name} ({disk.age_hours(now):.1f} h old)", file=out)
        if not dry_run:
            try:
                compute.delete_disk(disk, timeout)
            except Exception as exc:
                failures += 1
                print(f"  FAILED: {exc}", file=out)
    if not vms and not disks and not groups:
        print(f"nothing to reap: no cpuft VM, instance group or unattached disk older than {older_than_hours:g} h", file=out)
    return failures


def group_problems(group, template) -> list[str]:
    """What keeps this group from being the one-VM group infra/ promises (its template is checked
    like a VM by guarantee_problems)."""
    problems = []
    if group.target_size > 1:
        problems.append(f"target size is {group.target_size}, not 1: the queue would run on several VMs")
    metadata = {item.key: item.value for item in template.properties.metadata.items}
    if "instance-groups managed delete" not in metadata.get("startup-script", ""):
        problems.append("the startup script never deletes the group: nothing ends it but the reaper")
    return problems


def _cmd_verify(args, compute: Compute) -> int:
    if bool(args.name) == bool(args.group):
        raise UsageError("verify needs exactly one of --name VM and --group GROUP")
    extra: list[str] = []
    if args.group:
        group, template = compute.get_group(args.zone, args.group)
        vm = vm_from_template(template, group)
        extra = group_problems(group, template)
    else:
        vm = compute.get_vm(args.zone, args.name)
    problems = guarantee_problems(vm, allow_public_ip=args.allow_public_ip) + extra
    if problems:
        print(f"{vm.name}: NOT safe to leave unattended:")
        for problem in problems:
            print(f"  - {problem}")
        return 1
    if args.group:
        print(
            f"group {args.group}: one VM at a time; each deletes itself (boot disk included) after "
            f"{vm.max_run_seconds / 3600:g} h of running and the group recreates it; the VM deletes the group "
            "when its queue drains or its time is up"
        )
        return 0
    deadline = vm.created + dt.timedelta(seconds=vm.max_run_seconds)
    print(
        f"{vm.name}: {vm.status}; deletes itself (boot disk included) after {vm.max_run_seconds / 3600:g} h "
        f"of running, by about {deadline:%Y-%m-%d %H:%M %Z} if never stopped"
    )
    return 0


def _cmd_list(args, compute: Compute) -> int:
    now = dt.datetime.now(dt.timezone.utc)
    vms = [vm for vm in compute.list_vms(args.zone) if is_cpufts(vm.labels, args.stack)]
    for vm in vms:
        group = f"\tin group {vm.group[1]}" if vm.group else ""
        print(f"{vm.zone}/{vm.name}\t{vm.status}\t{vm.machine_type}\t{vm.age_hours(now):.1f} h{group}")
    groups = [g for g in compute.list_groups(args.zone) if is_cpufts(g.labels, args.stack)]
    for group in groups:
        print(f"{group.zone}/{group.name}\tinstance group of {group.target_size}\t{group.template}\t{group.age_hours(now):.1f} h")
    if not vms and not groups:
        print("no cpuft VMs or instance groups")
    return 0


def _cmd_reap(args, compute: Compute) -> int:
    failures = reap(
        compute,
        older_than_hours=args.older_than_hours,
        zones=args.zone,
        stack=args.stack,
        dry_run=args.dry_run,
        timeout=args.timeout,
    )
    return 1 if failures else 0


def _hours(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of hours") from None
    if value < 0:
        raise argparse.ArgumentTypeError("hours cannot be negative")
    return value


def _project_default() -> str | None:
    return os.environ.get("CLOUDSDK_CORE_PROJECT") or os.environ.get("GOOGLE_CLOUD_PROJECT")


def add_reap_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--older-than-hours",
        type=_hours,
        default=12.0,
        metavar="N",
        help="delete cpuft VMs and instance groups created at least N hours ago, running or stopped (default: 12)",
    )
    parser.add_argument("--dry-run", action="store_true", help="only print what would be deleted")
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for each deletion (default: 600)")


def add_common_arguments(parser: argparse.ArgumentParser, zone_help: str) -> None:
    parser.add_argument(
        "--project",
        default=_project_default(),
        help="GCP project ID (default: $CLOUDSDK_CORE_PROJECT or $GOOGLE_CLOUD_PROJECT)",
    )
    parser.add_argument("--zone", action="append", default=[], metavar="ZONE", help=zone_help)
    parser.add_argument("--stack", metavar="NAME", help="only VMs and groups of this stack (label cpuft-stack=NAME)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gce.py",
        description=__doc__.split("\n\n")[0],
        epilog="Run `gce.py COMMAND --help` for each command's options.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    verify = sub.add_parser(
        "verify",
        help="check that a VM (or a group's VMs) will delete itself and is locked down",
        description="Read a VM, or an instance group and its template, back from Compute Engine and "
        "check what infra/ promises: instance_termination_action DELETE, a max_run_duration, the "
        "managed-by=cpuft label, a dedicated service account, no public IP, Secure Boot, OS Login; "
        "for a group also a target size of 1 and a startup script that deletes the group.",
    )
    verify.add_argument("--project", default=_project_default(), help="GCP project ID")
    verify.add_argument("--zone", required=True)
    verify.add_argument("--name", help="instance name")
    verify.add_argument("--group", help="managed instance group name (recreate_on_preemption)")
    verify.add_argument("--allow-public-ip", action="store_true", help="the stack uses ssh_source_ranges")
    verify.set_defaults(run=_cmd_verify)

    listing = sub.add_parser("list", help="list cpuft VMs and instance groups with their age")
    add_common_arguments(listing, "only this zone (repeatable; default: all zones)")
    listing.set_defaults(run=_cmd_list)

    reaper = sub.add_parser(
        "reap", help="delete cpuft instance groups and VMs older than N hours, and unattached cpuft disks"
    )
    add_common_arguments(reaper, "only this zone (repeatable; default: all zones)")
    add_reap_arguments(reaper)
    reaper.set_defaults(run=_cmd_reap)
    return parser


def main(argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    if not args.project:
        parser.error("no project: pass --project PROJECT_ID or set CLOUDSDK_CORE_PROJECT")
    try:
        compute = Compute(args.project)
        return args.run(args, compute)
    except UsageError as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # an API error: say which, without a stack trace
        from google.api_core import exceptions as api_exceptions

        if isinstance(exc, api_exceptions.NotFound):
            print(f"{parser.prog}: not found: {exc.message}", file=sys.stderr)
            return 2
        if isinstance(exc, api_exceptions.GoogleAPICallError):
            print(f"{parser.prog}: Compute Engine refused: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
