"""The batch state store: one SQLite row per job, changed only by checked, atomic transitions.

States:
    queued     never started (or requeued because its config changed after it failed)
    running    a scheduler started it; the row names that scheduler's PID/host and the child's PID
    done       finished; summary figures copied from the run's summary.json
    failed     the run failed; `retryable` says whether another attempt may help (exit 2, bad
               input, is not retried) and `failures` counts failed runs against max_failures
    preempted  stopped by a signal after a checkpoint, or left 'running' by a scheduler that died
               (here, or on another machine as the queue's stored snapshot shows); the next start
               resumes it from its last checkpoint

Every transition is one `BEGIN IMMEDIATE` transaction that first checks the current state, so two
processes can never both move a job to 'running': the second gets `StateConflict`. SQLite's
rollback journal makes each commit durable and all-or-nothing across a power cut; `attempts` counts
starts, preemptions do not count as failures (a spot VM may be preempted many times).

Opening a store checks the file first (`PRAGMA quick_check`, then the `jobs` table's columns): a
file that is not SQLite, is cut short or damaged, or is another program's database is refused
with a `UserError` naming it, and is never repaired, emptied or overwritten, since it may be the
only record of the queue's history. A file that is empty or has no tables becomes a new store.
Damage that appears after the store was opened is not caught here.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from cpuft.errors import UserError

STATES = ("queued", "running", "done", "failed", "preempted")

# new state -> states it may be entered from
ALLOWED_FROM = {
    "running": ("queued", "preempted", "failed"),
    "done": ("running", "queued", "preempted", "failed"),  # the last three: found finished on disk or in the store
    "failed": ("running",),
    "preempted": ("running",),
    "queued": ("failed",),
}

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    name        TEXT PRIMARY KEY,
    position    INTEGER NOT NULL,
    state       TEXT NOT NULL CHECK (state IN ('queued', 'running', 'done', 'failed', 'preempted')),
    attempts    INTEGER NOT NULL DEFAULT 0,
    failures    INTEGER NOT NULL DEFAULT 0,
    retryable   INTEGER NOT NULL DEFAULT 1,
    run_dir     TEXT NOT NULL,
    config_sha  TEXT,
    runner_pid  INTEGER,
    child_pid   INTEGER,
    host        TEXT,
    exit_code   INTEGER,
    last_error  TEXT,
    summary     TEXT,
    resumed_from TEXT,
    started_at  REAL,
    finished_at REAL,
    updated_at  REAL NOT NULL
);
"""


class StateConflict(RuntimeError):
    """A transition found the job in a state it may not leave that way (someone else moved it)."""


@dataclass(frozen=True)
class JobRecord:
    name: str
    position: int
    state: str
    attempts: int
    failures: int
    retryable: bool
    run_dir: str
    config_sha: str | None
    runner_pid: int | None
    child_pid: int | None
    host: str | None
    exit_code: int | None
    last_error: str | None
    summary: dict[str, Any] = field(default_factory=dict)
    resumed_from: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    updated_at: float | None = None

    def runnable(self, max_failures: int) -> bool:
        if self.state in ("queued", "preempted"):
            return True
        return self.state == "failed" and self.retryable and self.failures < max_failures

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class StateStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # autocommit mode: transactions are the explicit BEGIN IMMEDIATE blocks below
        try:
            self.db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        except sqlite3.OperationalError as exc:  # e.g. a directory where the file should be
            raise _unusable(self.path, f"it cannot be opened ({exc})") from None
        try:
            self.db.row_factory = sqlite3.Row
            self._check_or_create_schema()  # first: even the PRAGMA below reads the file
            self.db.execute("PRAGMA synchronous = FULL")
        except BaseException:
            self.db.close()
            raise

    def close(self) -> None:
        self.db.close()

    def _check_or_create_schema(self) -> None:
        """Refuse a file that is not a sound cpuft state store before anything writes to it."""
        try:
            # quick_check reads every page: a file cut short fails here rather than mid-run.
            # The stores are small (one row per job), so this costs milliseconds.
            problems = [row[0] for row in self.db.execute("PRAGMA quick_check")]
            tables = {row[0] for row in self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            columns = {row[1] for row in self.db.execute("PRAGMA table_info(jobs)")}
        except sqlite3.OperationalError:
            raise  # locked, busy, I/O: not the file's content
        except sqlite3.DatabaseError as exc:  # SQLITE_NOTADB (not SQLite at all), SQLITE_CORRUPT (cut short, damaged)
            raise _unusable(self.path, f"it is not an SQLite database, or is cut short or damaged (SQLite: {exc})") from None
        if problems != ["ok"]:
            raise _unusable(self.path, f"SQLite finds it damaged ({'; '.join(problems[:3])})")
        if tables and "jobs" not in tables:
            raise _unusable(self.path, f"it is an SQLite database without cpuft's 'jobs' table (its tables: {', '.join(sorted(tables)[:5])})")
        expected = [f.name for f in fields(JobRecord)]  # _record() makes a JobRecord of every column
        if "jobs" in tables and set(columns) != set(expected):
            missing = [c for c in expected if c not in columns]
            unknown = sorted(set(columns) - set(expected))
            differences = [f"lacks {', '.join(missing)}" if missing else "", f"has {', '.join(unknown)}" if unknown else ""]
            raise _unusable(self.path, f"its 'jobs' table {' and '.join(d for d in differences if d)}"
                            " (another program's table, or another version's)")
        if not tables:  # a new (or empty) file: make it a store
            with self.transaction():
                self.db.execute(SCHEMA)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """Take the write lock up front, so a read-check-write sequence cannot interleave."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # ------------------------------------------------------------------ reads

    def get(self, name: str) -> JobRecord | None:
        row = self.db.execute("SELECT * FROM jobs WHERE name = ?", (name,)).fetchone()
        return _record(row) if row else None

    def all(self) -> list[JobRecord]:
        return [_record(r) for r in self.db.execute("SELECT * FROM jobs ORDER BY position, name")]

    # ------------------------------------------------------------------ transitions

    def sync(self, jobs: list[tuple[str, str, str]]) -> list[str]:
        """Add new jobs as 'queued' (name, run_dir, config_sha in queue order); keep positions current.

        A failed job whose config changed since its last attempt is requeued with a fresh
        failure count: fixing the queue file is how a user retries it. Returns those names.
        """
        requeued = []
        now = time.time()
        with self.transaction() as db:
            for position, (name, run_dir, sha) in enumerate(jobs):
                row = db.execute("SELECT state, config_sha FROM jobs WHERE name = ?", (name,)).fetchone()
                if row is None:
                    db.execute(
                        "INSERT INTO jobs (name, position, state, run_dir, config_sha, updated_at)"
                        " VALUES (?, ?, 'queued', ?, ?, ?)",
                        (name, position, run_dir, sha, now),
                    )
                    continue
                db.execute("UPDATE jobs SET position = ? WHERE name = ?", (position, name))
                if row["state"] == "failed" and row["config_sha"] != sha:
                    db.execute(
                        "UPDATE jobs SET state = 'queued', failures = 0, retryable = 1, config_sha = ?,"
                        " run_dir = ?, updated_at = ? WHERE name = ?",
                        (sha, run_dir, now, name),
                    )
                    requeued.append(name)
                elif row["state"] in ("queued",):
                    db.execute("UPDATE jobs SET run_dir = ?, config_sha = ? WHERE name = ?", (run_dir, sha, name))
        return requeued

    def start(self, name: str, runner_pid: int, host: str, config_sha: str, resumed_from: str | None) -> JobRecord:
        """queued/preempted/failed -> running; attempts + 1. The caller then starts the child."""
        return self._move(
            name, "running", ("queued", "preempted", "failed"),
            attempts="attempts + 1", runner_pid=runner_pid, host=host, child_pid=None, config_sha=config_sha,
            resumed_from=resumed_from, started_at=time.time(), finished_at=None, exit_code=None,
        )

    def set_child(self, name: str, child_pid: int) -> None:
        with self.transaction() as db:
            self._require(db, name, ("running",))
            db.execute("UPDATE jobs SET child_pid = ?, updated_at = ? WHERE name = ?", (child_pid, time.time(), name))

    def finish(self, name: str, state: str, exit_code: int | None, error: str | None = None,
               summary: dict | None = None, retryable: bool = True) -> JobRecord:
        """running -> done | failed | preempted, with the child's exit status and summary figures."""
        if state not in ("done", "failed", "preempted"):
            raise ValueError(f"finish() cannot move a job to {state!r}")
        extra: dict[str, Any] = dict(exit_code=exit_code, last_error=error, finished_at=time.time(), child_pid=None)
        if summary is not None:
            extra["summary"] = json.dumps(summary, default=str)
        if state == "failed":
            extra["failures"] = "failures + 1"
            extra["retryable"] = int(retryable)
        return self._move(name, state, ("running",), **extra)

    def mark_done_on_disk(self, name: str, summary: dict) -> JobRecord:
        """A run that completed but whose scheduler died before recording it (or that another
        machine finished, as its store shows): done, not rerun."""
        return self._move(name, "done", ("queued", "preempted", "failed"), summary=json.dumps(summary, default=str),
                          finished_at=time.time(), last_error=None, child_pid=None)

    def adopt(self, records: list[JobRecord], run_dirs: dict[str, str]) -> list[str]:
        """Take each row that is newer (`updated_at`) than ours, e.g. from the queue's snapshot in
        its store (cpuft.batch.durable); returns the names taken.

        Our own 'running' rows are never replaced (recovering them is the runner's job). A row
        another scheduler left 'running' comes in as 'preempted': it resumes from its last stored
        checkpoint, and the job's lease keeps it from running twice. Position and run directory
        stay ours (`run_dirs`: this machine's run directory per job name).
        """
        adopted = []
        with self.transaction() as db:
            for record in records:
                ours = db.execute("SELECT state, position, run_dir, updated_at FROM jobs WHERE name = ?",
                                  (record.name,)).fetchone()
                if ours is not None and (ours["state"] == "running" or ours["updated_at"] >= (record.updated_at or 0)):
                    continue
                state, note = record.state, record.last_error
                if state == "running":
                    state = "preempted"
                    note = (f"running on {record.host} when the queue state was stored; resumes from"
                            " its last stored checkpoint")
                db.execute(
                    "INSERT OR REPLACE INTO jobs (name, position, state, attempts, failures, retryable, run_dir,"
                    " config_sha, runner_pid, child_pid, host, exit_code, last_error, summary, resumed_from,"
                    " started_at, finished_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (record.name, ours["position"] if ours else record.position, state, record.attempts,
                     record.failures, int(record.retryable),
                     run_dirs.get(record.name, ours["run_dir"] if ours else record.run_dir), record.config_sha,
                     record.host, record.exit_code, note, json.dumps(record.summary, default=str),
                     record.resumed_from, record.started_at, record.finished_at, record.updated_at or time.time()),
                )
                adopted.append(record.name)
        return adopted

    def recover_stale(self, name: str, reason: str) -> JobRecord:
        """running (its scheduler is gone) -> preempted, so the next pick resumes it."""
        return self._move(name, "preempted", ("running",), last_error=reason, child_pid=None, finished_at=time.time())

    # ------------------------------------------------------------------ internals

    def _require(self, db, name: str, allowed: tuple[str, ...]) -> sqlite3.Row:
        row = db.execute("SELECT * FROM jobs WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise StateConflict(f"job '{name}' is not in the state store")
        if row["state"] not in allowed:
            raise StateConflict(f"job '{name}' is {row['state']}, expected one of {', '.join(allowed)}")
        return row

    def _move(self, name: str, new_state: str, allowed: tuple[str, ...], **columns) -> JobRecord:
        assert set(allowed) <= set(ALLOWED_FROM[new_state]), (new_state, allowed)
        with self.transaction() as db:
            self._require(db, name, allowed)
            assignments, params = ["state = ?", "updated_at = ?"], [new_state, time.time()]
            for column, value in columns.items():
                if isinstance(value, str) and value == f"{column} + 1":
                    assignments.append(f"{column} = {column} + 1")
                else:
                    assignments.append(f"{column} = ?")
                    params.append(value)
            db.execute(f"UPDATE jobs SET {', '.join(assignments)} WHERE name = ?", (*params, name))
            row = db.execute("SELECT * FROM jobs WHERE name = ?", (name,)).fetchone()
        return _record(row)


def _unusable(path: Path, why: str) -> UserError:
    return UserError(
        f"{path} is not a usable cpuft batch state database: {why}. It was left as it is (it may hold this"
        " queue's job history). Restore it from a backup, or move it aside (e.g. `mv"
        f" {shlex.quote(str(path))} {shlex.quote(f'{path}.bad')}`) and run the queue again: a new state starts, jobs whose run directories"
        " hold a finished run are recorded as done, and the others resume from their last checkpoint"
        " (their attempt and failure counts start again)."
    )


def _record(row: sqlite3.Row) -> JobRecord:
    data = dict(row)
    data["retryable"] = bool(data["retryable"])
    data["summary"] = json.loads(data["summary"]) if data.get("summary") else {}
    return JobRecord(**data)
