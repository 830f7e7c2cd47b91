"""Run a validated queue: each job is a `cpuft sft` child process; its exit status sets its state.

    exit 0   -> done       (summary figures copied from the run's summary.json)
    exit 75  -> preempted  (the child checkpointed on SIGTERM/SIGINT; the next start resumes it)
    exit 2   -> failed, not retried (bad input: retrying cannot help; fix the queue file, which
                requeues the job)
    other    -> failed, retried on this and later starts until the job has max_failures failures

Preemption: on SIGTERM/SIGINT the runner forwards SIGTERM to the child, waits for it to save its
checkpoint and exit, records 'preempted' and stops (exit 75) without starting another job. Under
systemd use KillMode=mixed (timer.py does) so only the runner is signalled and it forwards once.

With a store (`--sync-to URL` or the queue's `sync_to`; cpuft.batch.durable) the queue's state is
also kept in the store, each job runs under a lease there and syncs its run to
`<url>/jobs/<name>`, so a new VM with an empty disk carries on where the last one stopped. Jobs
leased to another machine are skipped; when only those are left the runner exits 73.

Recovery (the previous scheduler died, e.g. kill -9 or a VM reset): holding the queue lock proves
no scheduler is alive, so every 'running' row is stale. If the dead scheduler's child still runs
(an orphan on this host), it is sent SIGTERM and awaited, so it checkpoints and nothing trains
twice at once. The job then resumes from its last complete checkpoint; a checkpoint cut short by a
hard kill (no trainer_state.json, which the Trainer writes last) is set aside first. A run that had
in fact completed (summary.json says so and adapter/ exists) is recorded as done, not rerun. A run
directory with files but no checkpoint is moved aside to `<run_dir>.abandoned-<time>` and the job
starts from scratch (`cpuft sft` refuses a non-empty output directory without --resume).
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from cpuft.artifacts import atomic_write_text
from cpuft.batch.lock import EXIT_LOCKED, current_host, process_alive
from cpuft.batch.queue import BatchJob, BatchQueue
from cpuft.batch.state import JobRecord, StateStore
from cpuft.checkpoints import checkpoint_step, newest_complete_checkpoint, set_aside
from cpuft.errors import (
    EXIT_BAD_INPUT,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_RUN_FAILED,
    UserError,
    first_line,
)
from cpuft.run_dir import RunDir
from cpuft.summary import Summary

ORPHAN_STOP_SECONDS = 120  # how long an orphaned trainer gets to checkpoint after SIGTERM
STORE_RETRY_SECONDS = (2, 4, 8, 16, 30)  # waits between tries of a store call before giving up


@dataclass(frozen=True)
class BatchPaths:
    """Where a queue keeps its state: `<state dir>/state.sqlite, lock, jobs/<name>.yaml, logs/<name>.log`."""

    state_dir: Path

    @property
    def database(self) -> Path:
        return self.state_dir / "state.sqlite"

    @property
    def lock(self) -> Path:
        return self.state_dir / "lock"

    def job_config(self, name: str) -> Path:
        return self.state_dir / "jobs" / f"{name}.yaml"

    def job_log(self, name: str) -> Path:
        return self.state_dir / "logs" / f"{name}.log"


class StoreUnreachable(RuntimeError):
    """The queue's store did not answer a call the runner cannot do without; no job was changed."""


@dataclass(frozen=True)
class BatchOutcome:
    records: list[JobRecord]
    stopped_by_signal: bool
    max_failures: int
    held_elsewhere: tuple[str, ...] = ()  # jobs whose lease a live scheduler on another machine holds

    @property
    def drained(self) -> bool:
        """Nothing left to do: no job is queued, preempted or failed-but-retryable."""
        return not self.stopped_by_signal and not any(r.runnable(self.max_failures) for r in self.records)

    @property
    def exit_code(self) -> int:
        if self.stopped_by_signal:
            return EXIT_INTERRUPTED
        if any(r.state == "failed" for r in self.records):
            return EXIT_RUN_FAILED
        return EXIT_LOCKED if self.held_elsewhere else EXIT_OK


class BatchRunner:
    """Runs a queue once through: call `run()` while holding the queue's lock."""

    def __init__(self, queue: BatchQueue, paths: BatchPaths, log=print, python: str = sys.executable):
        self.queue = queue
        self.paths = paths
        self.log = log
        self.python = python
        self.host = current_host()
        self.store = StateStore(paths.database)
        self.durable = None  # cpuft.batch.durable.QueueStore when the queue has a store
        if queue.sync_to:
            from cpuft.batch.durable import QueueStore

            self.durable = QueueStore(queue.sync_to, self.host, warn=lambda m: self.log(f"warning: {m}"))
        self.child: subprocess.Popen | None = None
        self.stop_signal: int | None = None
        self._previous_handlers: dict[int, object] = {}
        self._checkpoint_steps: dict[str, int] = {}  # newest complete stored checkpoint per job
        self._held: dict[str, object] = {}  # job -> LeaseRecord of another host, not yet seen alive
        self._held_alive: dict[str, object] = {}  # job -> LeaseRecord of a holder that renewed
        self._lease_lost: str | None = None

    # ------------------------------------------------------------------ the loop

    def run(self) -> BatchOutcome:
        if self.durable is not None:
            self._adopt_stored_state()
        for name in self.store.sync([(j.name, str(j.run_dir), j.config_sha) for j in self.queue.jobs]):
            self.log(f"job {name}: its config changed since it failed; queued again with a fresh failure count")
        self._install_signal_handlers()
        try:
            self._recover_stale_jobs()
            self._publish()
            while self.stop_signal is None:
                job = self._next_job()
                if job is None:
                    if self._held and self._wait_for_held_jobs():
                        continue
                    break
                self._run_job(job)
        finally:
            self._restore_signal_handlers()
        records = self._queue_records()
        held = tuple(name for name in self._held_alive if any(r.name == name and r.runnable(self.queue.max_failures)
                                                              for r in records))
        return BatchOutcome(records, self.stop_signal is not None, self.queue.max_failures, held_elsewhere=held)

    def close(self) -> None:
        self.store.close()

    def _queue_records(self) -> list[JobRecord]:
        names = {j.name for j in self.queue.jobs}
        return [r for r in self.store.all() if r.name in names]

    def _next_job(self) -> BatchJob | None:
        """Queue order, but jobs that failed before go after those that have not; jobs another
        machine holds wait."""
        runnable = [r for r in self._queue_records() if r.runnable(self.queue.max_failures)
                    and r.name not in self._held and r.name not in self._held_alive]
        if not runnable:
            return None
        best = min(runnable, key=lambda r: (r.failures, r.position))
        return self.queue.job(best.name)

    # ------------------------------------------------------------------ one job

    def _run_job(self, job: BatchJob) -> None:
        if self.stop_signal is not None:
            return
        if self.durable is None:
            self._run_job_here(job, lease=None)
            return
        lease = self.durable.lease(job.name)
        if not self._store_call(f"taking the lease of job {job.name}",
                                lambda: lease.acquire(break_if=self.durable.holder_is_gone)):
            holder = self._store_call(f"reading the lease of job {job.name}", lease.current)
            self._held[job.name] = holder
            if holder is not None:
                until = time.strftime("%H:%M:%S", time.localtime(holder.expires_at))
                self.log(f"job {job.name}: leased to {holder.host} ({holder.owner}, until {until}); left to it for now")
            return
        try:
            self._run_job_here(job, lease)
        finally:
            if not lease.release():
                self.log(f"warning: could not release the lease of job {job.name}; it expires by itself")

    def _run_job_here(self, job: BatchJob, lease) -> None:
        resume_from, finished_summary = self._prepare_run_dir(job)
        if finished_summary is not None:
            self.store.mark_done_on_disk(job.name, finished_summary.to_dict())
            self.log(f"job {job.name}: already finished in {job.run_dir}; recorded as done, not rerun")
            self._publish()
            return
        store_flags: list[str] = []
        if self.durable is not None:
            resume_from, finished_summary = self._prepare_from_store(job, resume_from)
            if finished_summary is not None:
                self.store.mark_done_on_disk(job.name, finished_summary.to_dict())
                self.log(f"job {job.name}: its store {self.durable.job_url(job.name)} holds the finished run;"
                         " recorded as done, not rerun")
                self._publish()
                return
            store_flags = ["--sync-to", self.durable.job_url(job.name)]
        previous = self.store.get(job.name)
        if previous.config_sha and previous.config_sha != job.config_sha and resume_from:
            self.log(f"job {job.name}: its config changed since the last attempt; resuming with the new values")
        record = self.store.start(job.name, os.getpid(), self.host, job.config_sha, resume_from)
        self._publish()

        config_path = self.paths.job_config(job.name)
        atomic_write_text(config_path, yaml.safe_dump(job.config.to_dict(), sort_keys=False))
        command = [
            self.python, "-m", "cpuft", "sft", "--config", str(config_path),
            "--output-dir", str(job.run_dir), "--no-progress", *store_flags,
        ] + (["--resume"] if resume_from else [])
        log_path = self.paths.job_log(job.name)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        how = "from scratch"
        if resume_from:
            place, _, checkpoint = resume_from.rpartition("/")
            how = f"resuming from {checkpoint}" + (" in the store" if place != str(job.run_dir) else "")
        self.log(f"job {job.name}: attempt {record.attempts}, {how} -> {job.run_dir} (log: {log_path})")

        started = time.monotonic()
        self._lease_lost = None
        keeper = None
        with open(log_path, "a") as log_file:
            log_file.write(f"\n=== cpuft batch: attempt {record.attempts} at {time.strftime('%Y-%m-%d %H:%M:%S')}:"
                           f" {shlex.join(command)}\n")
            log_file.flush()
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            # Same process group as the runner: a kill of the group (or of the VM) takes both.
            self.child = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
            try:
                self.store.set_child(job.name, self.child.pid)
                if lease is not None:
                    from cpuft.storage import LeaseKeeper

                    keeper = LeaseKeeper(lease, on_lost=self._on_lease_lost,
                                         warn=lambda m: self.log(f"warning: {m}")).start()
                if self.stop_signal is not None:  # the signal came while the child was being started
                    self._forward_stop()
                code = self.child.wait()
            finally:
                if keeper is not None:
                    keeper.stop()
                self.child = None
        if self.durable is not None:
            self._refresh_checkpoint_step(job.name)
        self._record_exit(job, code, log_path, time.monotonic() - started)
        if self._lease_lost is not None and self.store.get(job.name).runnable(self.queue.max_failures):
            self._held[job.name] = None  # the wait at the end of the pass finds out who holds it now
        self._publish()

    def _record_exit(self, job: BatchJob, code: int, log_path: Path, seconds: float) -> None:
        summary = RunDir(job.run_dir).read_summary()  # None when the child stopped before writing one
        figures = summary.to_dict() if summary is not None else {}  # the state row's copy
        steps = summary.steps if summary is not None else "?"
        if code == EXIT_OK:
            self.store.finish(job.name, "done", code, summary=figures)
            loss = ""
            if summary is not None and summary.first_loss is not None and summary.final_loss is not None:
                loss = f", loss {summary.first_loss:.4f} -> {summary.final_loss:.4f}"
            self.log(f"job {job.name}: done in {seconds:.0f} s, {steps} steps{loss}")
        elif self._lease_lost is not None and code != EXIT_BAD_INPUT:
            # We stopped it: another scheduler holds its lease now. Not a failure, and not a reason
            # for this runner to stop (exit 75 stays reserved for a signal to the runner).
            self.store.finish(job.name, "preempted", code, summary=figures or None,
                              error=f"stopped because its lease was lost: {self._lease_lost}")
            self.log(f"job {job.name}: stopped at step {steps}: its lease was lost"
                     f" ({self._lease_lost})")
        elif code == EXIT_INTERRUPTED or (self.stop_signal is not None and code != EXIT_BAD_INPUT):
            # A child stopped before its signal handler was installed dies of the signal itself;
            # we asked it to stop, so that is a preemption too (it resumes from its last checkpoint).
            self.store.finish(job.name, "preempted", code, summary=figures or None,
                              error="stopped by a signal; resumes from its last checkpoint")
            self.log(f"job {job.name}: preempted at step {steps}; the next start resumes it")
            if self.stop_signal is None:
                # Someone signalled the trainer directly: the machine is likely going down. Stop too.
                self.stop_signal = signal.SIGTERM
        else:
            retryable = code != EXIT_BAD_INPUT
            error = _last_error(log_path) or f"exit status {code}"
            record = self.store.finish(job.name, "failed", code, error=error, retryable=retryable)
            if not retryable:
                plan = "bad input, not retried: fix the queue file (that requeues it)"
            elif record.failures < self.queue.max_failures:
                plan = f"failure {record.failures} of {self.queue.max_failures}; will retry"
            else:
                plan = f"failure {record.failures} of {self.queue.max_failures}; giving up"
            self.log(f"job {job.name}: FAILED (exit {code}): {error} [{plan}; log: {log_path}]")

    def _prepare_run_dir(self, job: BatchJob) -> tuple[str | None, Summary | None]:
        """(checkpoint to resume from or None, summary if the run already completed)."""
        run = RunDir(job.run_dir)
        if not run.path.is_dir() or not any(run.path.iterdir()):
            return None, None
        summary = run.read_summary()
        if summary is not None and summary.status == "completed" and run.adapter_dir.is_dir():
            return None, summary
        checkpoint = last_complete_checkpoint(run.path, log=self.log)
        if checkpoint is not None and run.config_file.is_file():
            return str(checkpoint), None
        self._set_aside(job, "has no checkpoint to resume from (starting afresh)")
        return None, None

    def _set_aside(self, job: BatchJob, why: str) -> None:
        run_dir = job.run_dir
        aside = run_dir.with_name(f"{run_dir.name}.abandoned-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(run_dir, aside)
        self.log(f"job {job.name}: {run_dir} {why}; moved it to {aside}")

    # ------------------------------------------------------------------ the store

    def _prepare_from_store(self, job: BatchJob, local_checkpoint: str | None) -> tuple[str | None, Summary | None]:
        """(checkpoint to resume from, summary if the store holds the finished run), where the
        store's newest complete checkpoint wins over an older (or no) local one."""
        job_store = self.durable.job_store(job.name)
        summary = self._store_call(f"reading the store of job {job.name}",
                                   lambda: self.durable.completed_summary(job_store))
        if summary is not None:
            return None, summary
        newest = self._store_call(f"listing the checkpoints of job {job.name}",
                                  lambda: self.durable.newest_checkpoint(job_store))
        if newest is None:
            return local_checkpoint, None
        self._checkpoint_steps[job.name] = newest.step
        local_step = checkpoint_step(Path(local_checkpoint).name) if local_checkpoint else None
        if local_step is not None and local_step >= newest.step:
            return local_checkpoint, None
        if job.run_dir.is_dir() and any(job.run_dir.iterdir()):
            self._set_aside(job, f"is behind its store ({newest.name} there); `cpuft sft --resume` restores from the store")
        return f"{job_store.url}/{newest.name}", None

    def _refresh_checkpoint_step(self, name: str) -> None:
        try:
            newest = self.durable.newest_checkpoint(self.durable.job_store(name))
        except Exception as exc:  # only the snapshot's figure goes stale
            self.log(f"warning: cannot list the stored checkpoints of job {name} ({type(exc).__name__}: {first_line(exc)})")
            return
        if newest is not None:
            self._checkpoint_steps[name] = newest.step

    def _adopt_stored_state(self) -> None:
        """Take the rows of the store's snapshot that are newer than ours (a new VM: all of them)."""
        records, steps = self._store_call("reading the queue state", self.durable.read_snapshot)
        names = {j.name: str(j.run_dir) for j in self.queue.jobs}
        adopted = self.store.adopt([r for r in records if r.name in names], names)
        self._checkpoint_steps.update({n: s for n, s in steps.items() if n in names})
        if adopted:
            states = ", ".join(f"{r.name} {r.state}" for r in self._queue_records() if r.name in adopted)
            self.log(f"took the state of {len(adopted)} job(s) from {self.durable.url}: {states}")

    def _publish(self) -> None:
        if self.durable is not None:
            self.durable.publish(self._queue_records(), self._checkpoint_steps)

    def _store_call(self, what: str, call):
        """`call()`, tried again with backoff while the store does not answer; StoreUnreachable
        after the last try (bad input, UserError, is raised at once)."""
        for attempt, wait in enumerate((*STORE_RETRY_SECONDS, None)):
            try:
                return call()
            except UserError:
                raise
            except Exception as exc:
                reason = f"{type(exc).__name__}: {first_line(exc)}"
                if wait is None or self.stop_signal is not None:
                    raise StoreUnreachable(f"{what} in {self.durable.url} failed {attempt + 1} times ({reason})") from None
                self.log(f"warning: {what} in {self.durable.url} failed ({reason}); trying again in {wait} s")
                time.sleep(wait)

    def _wait_for_held_jobs(self) -> bool:
        """Watch the leases of the jobs left to other machines: True as soon as one is released or
        expires (take it over), False once every holder has renewed (each runs its job) or on a signal."""
        self.log(f"waiting to see whether the holders of {', '.join(sorted(self._held))} are alive"
                 " (a live one renews its lease, a dead one lets it expire)")
        from cpuft.batch.durable import HELD_POLL_SECONDS

        while self.stop_signal is None and self._held:
            time.sleep(HELD_POLL_SECONDS)
            for name, seen in list(self._held.items()):
                current = self._store_call(f"reading the lease of job {name}", self.durable.lease(name).current)
                if current is None or not current.live(time.time()) or self.durable.holder_is_gone(current):
                    del self._held[name]
                    self.log(f"job {name}: its lease was released or has expired; taking the job over")
                    return True
                if seen is None or (current.owner, current.generation) != (seen.owner, seen.generation):
                    del self._held[name]
                    self._held_alive[name] = current
                    self.log(f"job {name}: {current.host} renewed its lease, so it is alive and runs the job;"
                             " leaving it to it")
        return False

    def _on_lease_lost(self, reason: str) -> None:
        """From the lease keeper's thread: another scheduler may take the job; stop our trainer."""
        self._lease_lost = reason
        self.log(f"warning: {reason}; asking the trainer to checkpoint and stop")
        self._forward_stop()

    # ------------------------------------------------------------------ stale jobs

    def _recover_stale_jobs(self) -> None:
        for record in self._queue_records():
            if record.state != "running":
                continue
            who = f"pid {record.runner_pid} on {record.host}"
            if record.host == self.host and record.child_pid and _is_trainer(record.child_pid, record.run_dir):
                self.log(f"job {record.name}: its scheduler ({who}) is gone but its trainer (pid"
                         f" {record.child_pid}) still runs; asking it to checkpoint and stop")
                _stop_orphan(record.child_pid)
            self.store.recover_stale(record.name, f"its scheduler ({who}) died while it ran")
            self.log(f"job {record.name}: was left running by a scheduler that died ({who}); will resume it")

    # ------------------------------------------------------------------ signals

    def _install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous_handlers[sig] = signal.signal(sig, self._on_stop_signal)

    def _restore_signal_handlers(self) -> None:
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        self._previous_handlers.clear()

    def _on_stop_signal(self, signum, frame) -> None:
        first = self.stop_signal is None
        self.stop_signal = signum
        if first:
            print(f"cpuft batch: received {signal.Signals(signum).name}; the running job checkpoints and"
                  " stops, no further job starts.", file=sys.stderr, flush=True)
        self._forward_stop()

    def _forward_stop(self) -> None:
        # Always SIGTERM: a second SIGINT would make the trainer abort without its checkpoint.
        child = self.child
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)


# ----------------------------------------------------------------------------- helpers


def last_complete_checkpoint(run_dir: Path, log=print) -> Path | None:
    """The newest checkpoint-N whose trainer_state.json (written last by the Trainer) parses.

    Newer, incomplete ones are renamed `incomplete-checkpoint-N-<time>` so that `cpuft sft
    --resume` (which takes the highest N) does not pick them.
    """
    complete, incomplete = newest_complete_checkpoint(run_dir)
    set_aside(incomplete, log)
    return complete


def run_shutdown(command: str, log=print) -> int:
    """Run the drained-queue command (`shutdown -h now` by default); returns its exit status."""
    log(f"queue drained; running: {command}")
    try:
        return subprocess.run(shlex.split(command), check=False).returncode
    except OSError as exc:
        log(f"could not run {command!r}: {exc}")
        return 127


def _last_error(log_path: Path) -> str | None:
    """The line of the child's log that says what went wrong (our message, else the exception)."""
    try:
        lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return None
    # only this attempt's output
    for index in range(len(lines) - 1, -1, -1):
        if lines[index].startswith("=== cpuft batch: attempt"):
            lines = lines[index + 1:]
            break
    for line in reversed(lines):
        if line.startswith("cpuft: error:"):
            return line.removeprefix("cpuft: error:").strip()[:500]
    exception = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b")
    for line in reversed(lines):
        if exception.match(line):
            return line[:500]
    return lines[-1][:500] if lines else None


def _is_trainer(pid: int, run_dir: str) -> bool:
    """Is `pid` still the `cpuft sft` child for this run (and not a recycled PID)?"""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    args = [a.decode(errors="replace") for a in argv]
    return "cpuft" in args and "sft" in args and run_dir in args


def _stop_orphan(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + ORPHAN_STOP_SECONDS
    while time.monotonic() < deadline and process_alive(pid):
        time.sleep(0.5)
    if process_alive(pid):
        os.kill(pid, signal.SIGKILL)
