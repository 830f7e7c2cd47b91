#!/usr/bin/env python3
"""Compute Engine client for cpuft's GCP stack: check a VM's teardown guarantees, reap leftovers.

Used by scripts/gcp/provision (``verify``), scripts/gcp/reaper.py (``reap``) and by hand (``list``).
Needs google-cloud-compute (scripts/gcp/requirements.txt) and Application Default Credentials
(``gcloud auth application-default login``).

What counts as cpuft's: instances and disks labelled ``managed-by=cpuft`` (infra/ puts the label on
every VM and boot disk). Nothing else is ever listed or deleted.

Limits:
- Without ``--zone`` every zone is searched with one aggregated list call; with ``--zone`` only those.
- Age is measured from creation, not from the last start.
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
    )


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

    def get_vm(self, zone: str, name: str) -> Vm:
        return vm_from_api(self.instances.get(project=self.project, zone=zone, instance=name))

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
    out=sys.stdout,
) -> int:
    """Delete expired cpuft VMs, then orphaned cpuft disks. Returns the number of failures."""
    now = now or dt.datetime.now(dt.timezone.utc)
    verb = "would delete" if dry_run else "deleting"
    failures = 0
    vms = expired_vms(compute.list_vms(zones), now, older_than_hours, stack)
    for vm in vms:
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
    if not vms and not disks:
        print(f"nothing to reap: no cpuft VM or unattached disk older than {older_than_hours:g} h", file=out)
    return failures


def _cmd_verify(args, compute: Compute) -> int:
    vm = compute.get_vm(args.zone, args.name)
    problems = guarantee_problems(vm, allow_public_ip=args.allow_public_ip)
    if problems:
        print(f"{vm.name}: NOT safe to leave unattended:")
        for problem in problems:
            print(f"  - {problem}")
        return 1
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
        print(f"{vm.zone}/{vm.name}\t{vm.status}\t{vm.machine_type}\t{vm.age_hours(now):.1f} h")
    if not vms:
        print("no cpuft VMs")
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
        help="delete cpuft VMs created at least N hours ago, running or stopped (default: 12)",
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
    parser.add_argument("--stack", metavar="NAME", help="only VMs of this stack (label cpuft-stack=NAME)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gce.py",
        description=__doc__.split("\n\n")[0],
        epilog="Run `gce.py COMMAND --help` for each command's options.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    verify = sub.add_parser(
        "verify",
        help="check that a VM will delete itself and is locked down",
        description="Read a VM back from Compute Engine and check what infra/ promises: "
        "instance_termination_action DELETE, a max_run_duration, the managed-by=cpuft label, "
        "a dedicated service account, no public IP, Secure Boot, OS Login.",
    )
    verify.add_argument("--project", default=_project_default(), help="GCP project ID")
    verify.add_argument("--zone", required=True)
    verify.add_argument("--name", required=True, help="instance name")
    verify.add_argument("--allow-public-ip", action="store_true", help="the stack uses ssh_source_ranges")
    verify.set_defaults(run=_cmd_verify)

    listing = sub.add_parser("list", help="list cpuft VMs with their age")
    add_common_arguments(listing, "only this zone (repeatable; default: all zones)")
    listing.set_defaults(run=_cmd_list)

    reaper = sub.add_parser("reap", help="delete cpuft VMs older than N hours and unattached cpuft disks")
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
