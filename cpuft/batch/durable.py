"""The batch queue's copy in a store (`cpuft batch run --sync-to URL`), so a new VM carries on.

    <url>/queue-state.json   every job's row: state, attempts, failures, last stored checkpoint
                             step, summary figures; rewritten after each change of state
    <url>/jobs/<name>/       each job's run: the child is `cpuft sft --sync-to <url>/jobs/<name>`
                             (checkpoints, metrics, summary, adapter; cpuft.storage.store)
    <url>/leases/<name>/     each job's lease (cpuft.storage.lease)

A runner whose local state is empty or behind (a new VM, or one whose disk kept an old copy)
takes every row of the snapshot that is newer than its own (`StateStore.adopt`): done jobs stay
done, failure counts are kept, a job the snapshot shows running is resumed from its last stored
checkpoint. Before a job runs, its own store decides how: a summary that says completed with a
complete adapter makes it done without running; a stored checkpoint newer than the local one
(or no local one) makes the child restore from the store (`cpuft sft --resume --sync-to`).

Exclusion between VMs is a **lease with expiry** per job, not the store's generation
preconditions on the state file. A scheduler is stopped by preemption or kill -9 without warning
and can release nothing; only an expiry lets another VM decide, without its help, that a claim
is dead, and only a holder that renews while alive keeps a live claim from expiring. The
preconditions are still what makes a lease safe: each lease record is an atomic create-if-absent
(`ifGenerationMatch=0` on GCS), the one precondition gcsfs exposes. A compare-and-swap on
queue-state.json itself would also need "overwrite only generation G", which gcsfs does not
expose, and would make every scheduler contend for one object on every change.

So the snapshot is not the lock. It is merged when written (for each job the row changed last
wins, and a job is changed only by its lease holder), so two schedulers sharing a queue do not
undo each other's rows. Two writing at the same instant can still lose one's newest row for a
while; the next change rewrites it, and what matters most cannot be lost that way: a job's own
store, which is checked before the job runs, says whether it completed.

Liveness: the runner renews its lease every 60 s (TTL 300 s) while the child trains and SIGTERMs
the child when renewal fails for 180 s or another owner took the lease; it releases the lease
after the child exits. A job whose lease another host holds is skipped; at the end of the pass
the runner watches such leases: one renewed meanwhile proves a live holder (the job is left to
it: exit 73), one released or expired is taken over. A lease this host holds is broken at once
when its owner process is gone or the machine has rebooted since (this runner holds the local
queue lock, so no other scheduler here runs this queue).

Limits: wall clocks of the VMs must agree to well within the TTL (GCE syncs them to Google's
NTP); the host name (`CPUFT_HOST`, else the machine's) must be unique among live schedulers of
one queue (a managed instance group keeps a VM's name when it recreates it: the new VM
recognises its predecessor's lease as its own host's and breaks it).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import fields

from cpuft.batch.lock import process_alive
from cpuft.batch.state import STATES, JobRecord
from cpuft.errors import first_line
from cpuft.run_dir import RunDir
from cpuft.storage import JobLease, LeaseRecord, RunStore, StoredCheckpoint
from cpuft.summary import Summary

SNAPSHOT_NAME = "queue-state.json"
SNAPSHOT_FORMAT = 1
JOBS_DIR = "jobs"
LEASE_TTL_SECONDS = 300.0  # LeaseKeeper renews every TTL/5 and gives up after 0.6 TTL
HELD_POLL_SECONDS = 2.0  # how often a runner looks at a lease another host holds
_LOCAL_ROW_ONLY = ("runner_pid", "child_pid")  # PIDs mean nothing on another machine


class QueueStore:
    """One queue's store at `url`, seen from the runner on `host`."""

    def __init__(self, url: str, host: str, warn: Callable[[str], None]):
        self.url = url.rstrip("/")
        self.host = host
        self.warn = warn
        self.store = RunStore(self.url)
        self.owner = f"{host}:{os.getpid()}:{_boot_id()}:{uuid.uuid4().hex[:8]}"

    # ------------------------------------------------------------------ jobs

    def job_url(self, name: str) -> str:
        return f"{self.url}/{JOBS_DIR}/{name}"

    def job_store(self, name: str) -> RunStore:
        return RunStore(self.job_url(name))

    def completed_summary(self, job_store: RunStore) -> Summary | None:
        """The job's summary when its store holds a finished run (summary + complete adapter)."""
        data = job_store.get_bytes(RunDir.SUMMARY)
        summary = Summary.parse(data) if data is not None else None
        if summary is None or summary.status != "completed":
            return None
        return summary if job_store.directory_problem(RunDir.ADAPTER) is None else None

    def newest_checkpoint(self, job_store: RunStore) -> StoredCheckpoint | None:
        return next((c for c in job_store.checkpoints() if c.complete), None)

    # ------------------------------------------------------------------ leases

    def lease(self, name: str) -> JobLease:
        return JobLease(self.store, name, owner=self.owner, ttl_seconds=LEASE_TTL_SECONDS, host=self.host)

    def holder_is_gone(self, record: LeaseRecord) -> bool:
        """A lease this host holds belongs to a scheduler that is gone (see the module docstring)."""
        if record.host != self.host:
            return False
        parts = record.owner.rsplit(":", 3)  # host:pid:boot:nonce, as self.owner
        if len(parts) != 4 or not parts[1].isdigit():
            return True  # not a runner's lease: no scheduler of this queue runs here but us
        _, pid, boot, _ = parts
        return boot != _boot_id() or not process_alive(int(pid))

    # ------------------------------------------------------------------ the snapshot

    def read_snapshot(self) -> tuple[list[JobRecord], dict[str, int]]:
        """(rows, last stored checkpoint step per job) from queue-state.json; nothing if absent.

        A snapshot that cannot be read is ignored with a warning: every job's own store still
        says whether it completed, only failure counts are lost.
        """
        data = self.store.get_bytes(SNAPSHOT_NAME)
        if data is None:
            return [], {}
        try:
            return parse_snapshot(data)
        except ValueError as exc:
            self.warn(f"{self.url}/{SNAPSHOT_NAME} is unreadable ({exc}); starting from the jobs' own stores.")
            return [], {}

    def publish(self, records: list[JobRecord], checkpoint_steps: dict[str, int]) -> bool:
        """Write the snapshot, keeping rows in the store that are newer than ours. False (after a
        warning) when the store cannot be reached: the next change of state writes it again."""
        try:
            stored_rows, stored_steps = self.read_snapshot()
            rows = {r.name: (r, stored_steps.get(r.name)) for r in stored_rows}
            for record in records:
                theirs = rows.get(record.name)
                if theirs is None or (record.updated_at or 0) >= (theirs[0].updated_at or 0):
                    rows[record.name] = (record, checkpoint_steps.get(record.name))
            self.store.put_bytes(format_snapshot(rows, self.host), SNAPSHOT_NAME)
        except Exception as exc:  # the queue goes on; its jobs' own stores are synced by their trainers
            self.warn(f"cannot write {self.url}/{SNAPSHOT_NAME} ({type(exc).__name__}: {first_line(exc)});"
                      " the queue goes on and writes it at the next change.")
            return False
        return True


def check_queue_store(url: str) -> None:
    """UserError (exit 2) unless the store at `url` is writable and can hold leases; leaves nothing there."""
    store = RunStore(url)
    store.check_writable()
    JobLease(store, "check")  # refuses a protocol without an atomic create-if-absent


def format_snapshot(rows: dict[str, tuple[JobRecord, int | None]], host: str) -> bytes:
    jobs = {}
    for name, (record, step) in sorted(rows.items(), key=lambda item: (item[1][0].position, item[0])):
        row = {k: v for k, v in record.to_dict().items() if k != "name" and k not in _LOCAL_ROW_ONLY}
        row["checkpoint_step"] = step
        jobs[name] = row
    document = {"format": SNAPSHOT_FORMAT, "written_at": time.time(), "written_by": host, "jobs": jobs}
    return (json.dumps(document, indent=1, default=str) + "\n").encode()


def parse_snapshot(data: bytes) -> tuple[list[JobRecord], dict[str, int]]:
    """Rows and checkpoint steps of a snapshot; ValueError says what is wrong with it."""
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"not JSON: {first_line(exc)}") from None
    if not isinstance(document, dict) or document.get("format") != SNAPSHOT_FORMAT:
        raise ValueError(f"format {document.get('format') if isinstance(document, dict) else None!r},"
                         f" expected {SNAPSHOT_FORMAT}")
    jobs = document.get("jobs")
    if not isinstance(jobs, dict):
        raise ValueError("no 'jobs' mapping")
    known = {f.name for f in fields(JobRecord)}
    records, steps = [], {}
    for name, row in jobs.items():
        if not isinstance(row, dict):
            raise ValueError(f"job {name!r}: not a mapping")
        values = {k: v for k, v in row.items() if k in known}
        values.update(name=name, runner_pid=None, child_pid=None)
        values.setdefault("summary", {})
        for column in ("config_sha", "host", "exit_code", "last_error", "resumed_from",
                       "started_at", "finished_at", "updated_at"):
            values.setdefault(column, None)
        _check_row(name, values)
        records.append(JobRecord(**values))
        step = row.get("checkpoint_step")
        if isinstance(step, int):
            steps[name] = step
    return records, steps


def _check_row(name: str, values: dict) -> None:
    if values.get("state") not in STATES:
        raise ValueError(f"job {name!r}: state {values.get('state')!r} is not one of {', '.join(STATES)}")
    for column in ("position", "attempts", "failures"):
        if not isinstance(values.get(column), int) or isinstance(values.get(column), bool) or values[column] < 0:
            raise ValueError(f"job {name!r}: {column} {values.get(column)!r} is not a count")
    if not isinstance(values.get("retryable"), bool) or not isinstance(values.get("run_dir"), str):
        raise ValueError(f"job {name!r}: retryable or run_dir missing")
    if not isinstance(values.get("summary"), dict):
        raise ValueError(f"job {name!r}: summary is not a mapping")
    if values.get("updated_at") is not None and not isinstance(values["updated_at"], (int, float)):
        raise ValueError(f"job {name!r}: updated_at {values['updated_at']!r} is not a time")


def _boot_id() -> str:
    """Changes at every boot of the machine (a recreated VM with the same name has a new one)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip().replace("-", "")[:12]
    except OSError:
        return "unknown"
