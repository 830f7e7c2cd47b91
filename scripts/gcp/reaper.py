#!/usr/bin/env python3
"""Delete cpuft VMs and instance groups older than N hours, and unattached cpuft disks, in one project.

The last line of defence against a forgotten VM. A VM that infra/ created deletes itself after
max_run_hours, but not if someone stopped it (stopping resets that clock, and the stopped VM's disk
keeps billing), changed its scheduling, or created it by hand with the cpuft labels. The reaper
finds everything labelled managed-by=cpuft, in every zone, running or stopped, and deletes what is
older than --older-than-hours. Nothing without that label is touched.

With recreate_on_preemption a VM belongs to a managed instance group that would recreate it if it
alone were deleted, so the reaper deletes the group (found by its instance template's labels, or by
the created-by metadata of an expired cpuft VM), which takes the VM and its disk with it. A group
that waits for Spot capacity with no VM at all is found and deleted too. Set --older-than-hours
above the stack's max_total_hours, or the reaper ends a queue that is still within its allowance.

Run it from cron, a CI schedule or Cloud Scheduler, e.g. hourly:

    0 * * * *  cd /path/to/cpuft && python3 scripts/gcp/reaper.py --project my-proj --older-than-hours 12

Needs: pip install -r scripts/gcp/requirements.txt, and credentials that may list and delete
instances, disks and instance groups and read instance templates (roles/compute.instanceAdmin.v1),
e.g. `gcloud auth application-default login`.

Exit codes: 0 nothing left to reap, 1 a deletion failed (the others were still attempted),
2 bad input or no credentials.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import gce  # noqa: E402  (sits next to this file)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reaper.py",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    gce.add_common_arguments(parser, "only this zone (repeatable; default: all zones)")
    gce.add_reap_arguments(parser)
    parser.set_defaults(run=gce._cmd_reap)
    return parser


if __name__ == "__main__":
    sys.exit(gce.main(parser=build_parser()))
