"""`cpuft batch`: run a queue of fine-tuning jobs unattended (check | run | status | install-timer)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cpuft.batch.lock import EXIT_LOCKED
from cpuft.errors import EXIT_RUN_FAILED, UserError

EPILOG = """\
The queue file is YAML: a list of named jobs, each a `cpuft sft` config (same keys as --config),
with optional queue-level `defaults:` merged under every job:

  defaults: {model: models/tiny, dataset: data/train.jsonl, max_steps: 200, save_steps: 20}
  max_failures: 3
  jobs:
    - {name: r16, lora_r: 16}
    - {name: r32, lora_r: 32}

Relative paths are relative to the queue file. Each job runs in <queue dir>/runs/<name> (or its
output_dir). State (SQLite), the lock, per-job configs and logs live in <queue>.batch/ beside the
queue (or --state-dir).

`run` skips done jobs, resumes preempted or interrupted ones from their last checkpoint and retries
failed ones up to max_failures; one job's failure does not stop the others. SIGTERM (a spot
preemption notice) makes the running job checkpoint and the runner exit 75; the next `run`
resumes it. A job left 'running' by a scheduler that was killed is resumed the same way.

`run --sync-to URL` (or `sync_to:` in the queue file; the flag wins) keeps the queue's state in
URL/queue-state.json and each job's run in URL/jobs/<name>, and runs each job under a lease in
URL/leases/<name>: a new VM with the same queue file and URL (its disk empty) skips what is done,
resumes the rest from their stored checkpoints and keeps the failure counts; a job another live
machine holds is left to it. $CPUFT_HOST names this machine in leases (default: its host name).

Exit status of `run`: 0 all jobs done; 1 some job failed for good (or the store stopped
answering); 2 bad queue file, unusable store or a state.sqlite that is damaged or not cpuft's
(nothing run, the file left as it is); 73 another scheduler is running this queue, or every job
left is leased to another machine; 75 stopped by a signal (run again to resume).

examples:
  cpuft batch check queue.yaml
  cpuft batch run queue.yaml
  cpuft batch run queue.yaml --sync-to gs://my-bucket/queues/q1
  cpuft batch status queue.yaml --json
  cpuft batch install-timer queue.yaml --every 15min --shutdown-when-done
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "batch",
        help="run a queue of fine-tunes unattended (survives preemption)",
        description="Run a YAML queue of `cpuft sft` jobs in order, with state in SQLite, resume after"
        " preemption, retries, and a systemd timer or cron line to start it.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="batch_action", metavar="ACTION")

    def queue_parser(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("queue", metavar="QUEUE", help="the queue YAML file")
        sub.add_argument("--state-dir", metavar="DIR", default=None,
                         help="where state.sqlite, the lock, job configs and logs live (default: <queue>.batch/ beside the queue)")
        return sub

    check = queue_parser("check", "validate the queue file (every job, model dir and dataset) and list the jobs")
    check.set_defaults(handler=run_check)

    run = queue_parser("run", "run every job that is not done yet; resume preempted ones")
    run.add_argument("--sync-to", metavar="URL", default=None,
                     help="keep the queue's state and every job's run in this store (gs://bucket/path, s3://...,"
                     " a directory) so a new machine carries on; overrides the queue file's sync_to")
    _add_shutdown_arguments(run)
    run.set_defaults(handler=run_queue)

    status = queue_parser("status", "print each job's state, attempts and summary figures")
    status.add_argument("--json", action="store_true", help="print a JSON list of job rows instead of a table")
    status.set_defaults(handler=run_status)

    timer = queue_parser("install-timer", "start `cpuft batch run QUEUE` at boot and on a schedule (systemd timer or cron)")
    timer.add_argument("--every", default="15min", metavar="INTERVAL",
                       help="start again this long after the previous run ended, e.g. 10min, 1h (default: 15min)")
    _add_shutdown_arguments(timer)
    timer.add_argument("--cron", action="store_true", help="install a crontab entry even where systemd runs")
    timer.add_argument("--unit-dir", metavar="DIR", default=None,
                       help="write the systemd units here and do not enable them (default: /etc/systemd/system"
                       " as root, else ~/.config/systemd/user, then enable the timer)")
    timer.add_argument("--dry-run", action="store_true", help="print what would be installed; change nothing")
    timer.set_defaults(handler=run_install_timer)

    parser.set_defaults(handler=lambda args: _missing_action(parser))


def _add_shutdown_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shutdown-when-done", action="store_true",
                        help="when no job is left to run (all done or failed for good), run the shutdown command")
    parser.add_argument("--shutdown-command", metavar="CMD", default=None,
                        help="what --shutdown-when-done runs (default: 'shutdown -h now'; e.g. a gcloud"
                        " command that deletes this VM)")


def _missing_action(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _paths(args, queue_path: Path):
    from cpuft.batch.queue import default_state_dir
    from cpuft.batch.runner import BatchPaths

    state_dir = Path(args.state_dir).expanduser().resolve() if args.state_dir else default_state_dir(queue_path)
    return BatchPaths(state_dir)


def run_check(args) -> int:
    from cpuft.batch.queue import load_queue

    queue = load_queue(args.queue)
    stored = f", stored in {queue.sync_to}" if queue.sync_to else ""
    print(f"{queue.path}: {len(queue.jobs)} job(s), max_failures {queue.max_failures}; state in"
          f" {_paths(args, queue.path).state_dir}{stored}")
    for job in queue.jobs:
        c = job.config
        print(f"  {job.name}: model {c.model}, dataset {c.dataset}, max_steps {c.max_steps} -> {job.run_dir}")
    return 0


def run_queue(args) -> int:
    from cpuft.batch.lock import QueueLock, QueueLocked
    from cpuft.batch.queue import load_queue
    from cpuft.batch.runner import BatchRunner, StoreUnreachable, run_shutdown

    queue = load_queue(args.queue).with_sync_to(args.sync_to)  # every job validated before anything is touched
    if queue.sync_to:
        from cpuft.batch.durable import check_queue_store

        check_queue_store(queue.sync_to)  # UserError (exit 2) before anything runs
    paths = _paths(args, queue.path)
    lock = QueueLock(paths.lock)
    try:
        lock.acquire()
    except QueueLocked as exc:
        print(f"cpuft batch: another scheduler is running {queue.path} ({exc.holder}); nothing to do.", file=sys.stderr)
        return EXIT_LOCKED
    try:
        runner = BatchRunner(queue, paths, log=lambda message: print(f"cpuft batch: {message}", flush=True))
        try:
            outcome = runner.run()
        except StoreUnreachable as exc:
            print(f"cpuft batch: stopped: {exc}. Every job keeps its state; run again when the store answers.",
                  file=sys.stderr, flush=True)
            return EXIT_RUN_FAILED
        finally:
            runner.close()
    finally:
        lock.release()
    counts: dict[str, int] = {}
    for record in outcome.records:
        counts[record.state] = counts.get(record.state, 0) + 1
    print(f"cpuft batch: {', '.join(f'{n} {s}' for s, n in counts.items()) or 'no jobs'}"
          f" (`cpuft batch status {args.queue}` for details)", flush=True)
    if outcome.held_elsewhere:
        print(f"cpuft batch: left to schedulers on other machines: {', '.join(outcome.held_elsewhere)}", flush=True)
    if outcome.drained and args.shutdown_when_done:
        run_shutdown(args.shutdown_command or "shutdown -h now", log=lambda m: print(f"cpuft batch: {m}", flush=True))
    return outcome.exit_code


def run_status(args) -> int:
    from cpuft.batch.lock import lock_holder
    from cpuft.batch.queue import load_queue
    from cpuft.batch.report import format_status_table, status_rows
    from cpuft.batch.state import StateStore

    queue = load_queue(args.queue, check_files=False)
    paths = _paths(args, queue.path)
    records = []
    if paths.database.is_file():
        store = StateStore(paths.database)
        try:
            records = store.all()
        finally:
            store.close()
    holder = lock_holder(paths.lock)
    rows = status_rows(queue, records, holder)
    if args.json:
        print(json.dumps({"queue": str(queue.path), "scheduler": holder, "jobs": rows}, indent=2, default=str))
    else:
        print(format_status_table(rows, holder))
    return 0


def run_install_timer(args) -> int:
    from cpuft.artifacts import atomic_write_text
    from cpuft.batch import timer
    from cpuft.batch.queue import load_queue

    queue = load_queue(args.queue)  # refuse to schedule a queue that cannot run
    spec = timer.TimerSpec(
        queue_path=queue.path,
        state_dir=Path(args.state_dir).expanduser().resolve() if args.state_dir else None,
        interval=timer.check_interval(args.every),
        shutdown_when_done=args.shutdown_when_done,
        shutdown_command=args.shutdown_command,
    )
    if args.cron or (not timer.has_systemd() and args.unit_dir is None):
        log_path = _paths(args, queue.path).state_dir / "cron.log"
        lines = timer.cron_lines(spec, log_path)
        if args.dry_run:
            print("\n".join(lines))
            return 0
        import shutil

        if shutil.which("crontab") is None:
            raise UserError("neither systemd nor crontab is available here; start `cpuft batch run"
                            f" {queue.path}` from your VM's startup script instead.")
        timer.install_cron(lines, f"{timer.CRON_MARKER}{queue.path}")
        print(f"installed in your crontab (log: {log_path}):\n" + "\n".join(lines))
        return 0

    units = timer.systemd_units(spec)
    unit_dir = Path(args.unit_dir).expanduser() if args.unit_dir else timer.default_unit_dir()
    if args.dry_run:
        for name, text in units.items():
            print(f"# {unit_dir / name}\n{text}")
        return 0
    for name, text in units.items():
        atomic_write_text(unit_dir / name, text)
        print(f"wrote {unit_dir / name}")
    commands = timer.enable_commands(spec)
    if args.unit_dir:
        print("to enable it: " + " && ".join(" ".join(c) for c in commands))
        return 0
    import subprocess

    for command in commands:
        subprocess.run(command, check=True)
    print(f"enabled {spec.unit_name}.timer: `systemctl {'--user ' if '--user' in commands[0] else ''}list-timers`"
          f" shows it; logs: `journalctl {'--user ' if '--user' in commands[0] else ''}-u {spec.unit_name}`.")
    if "--user" in commands[0]:
        print("note: a user timer runs only while you are logged in unless you run `loginctl enable-linger`.")
    return 0
