"""Start `cpuft batch run QUEUE` on a schedule: a systemd service + timer, or cron where there is no systemd.

The timer fires at boot (so a VM recreated after preemption picks the queue up again) and then
every `interval` after the previous run ended, which retries failed jobs and picks up jobs added
to the queue. Overlapping starts are harmless: the queue lock turns the second into a no-op.

The service uses KillMode=mixed: on shutdown (a spot preemption notice) systemd sends SIGTERM to
the runner only, which forwards it to the trainer once and waits for its checkpoint; anything
still alive after TimeoutStopSec gets SIGKILL, and the next start recovers it.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

INTERVAL = re.compile(r"^\d+(s|sec|min|m|h|hr)$")
CRON_MARKER = "# cpuft-batch:"


@dataclass(frozen=True)
class TimerSpec:
    queue_path: Path
    state_dir: Path | None = None  # None: the runner's default beside the queue
    interval: str = "15min"
    shutdown_when_done: bool = False
    shutdown_command: str | None = None
    python: str = sys.executable

    @property
    def unit_name(self) -> str:
        """cpuft-batch-<queue stem>-<hash of its path>: two queues never share a unit."""
        stem = re.sub(r"[^A-Za-z0-9_-]", "-", self.queue_path.stem)[:40]
        digest = hashlib.sha256(str(self.queue_path).encode()).hexdigest()[:8]
        return f"cpuft-batch-{stem}-{digest}"

    def run_command(self) -> list[str]:
        command = [self.python, "-m", "cpuft", "batch", "run", str(self.queue_path)]
        if self.state_dir is not None:
            command += ["--state-dir", str(self.state_dir)]
        if self.shutdown_when_done:
            command.append("--shutdown-when-done")
        if self.shutdown_command:
            command += ["--shutdown-command", self.shutdown_command]
        return command


def check_interval(interval: str) -> str:
    if not INTERVAL.match(interval):
        from cpuft.errors import UserError

        raise UserError(f"--every {interval!r}: give a number and a unit, e.g. 30s, 15min or 1h.")
    return interval


def systemd_units(spec: TimerSpec) -> dict[str, str]:
    """{file name: text} for the service and its timer."""
    exec_start = " ".join(_systemd_quote(arg) for arg in spec.run_command())
    service = f"""\
[Unit]
Description=cpuft batch queue {spec.queue_path}
Wants=network-online.target
After=network-online.target

[Service]
Type=oneshot
WorkingDirectory={spec.queue_path.parent}
Environment=PYTHONUNBUFFERED=1
ExecStart={exec_start}
# Exit 73: another scheduler holds this queue's lock; 75: stopped by a signal after a checkpoint.
SuccessExitStatus=73 75
# SIGTERM to the runner only; it forwards it to the trainer, which saves a checkpoint and exits.
KillMode=mixed
KillSignal=SIGTERM
TimeoutStopSec=25
Nice=5
"""
    timer = f"""\
[Unit]
Description=Start the cpuft batch queue {spec.queue_path} at boot and every {spec.interval}

[Timer]
OnBootSec=1min
OnUnitInactiveSec={spec.interval}
Unit={spec.unit_name}.service

[Install]
WantedBy=timers.target
"""
    return {f"{spec.unit_name}.service": service, f"{spec.unit_name}.timer": timer}


def cron_lines(spec: TimerSpec, log_path: Path) -> list[str]:
    """Crontab lines: at reboot and every interval (rounded to whole minutes, at least 1)."""
    minutes = max(1, _interval_minutes(spec.interval))
    command = f"cd {shlex.quote(str(spec.queue_path.parent))} && {shlex.join(spec.run_command())}" \
              f" >> {shlex.quote(str(log_path))} 2>&1"
    marker = f"{CRON_MARKER}{spec.queue_path}"
    every = f"*/{minutes} * * * *" if minutes < 60 else f"0 */{max(1, minutes // 60)} * * *"
    return [f"@reboot {command} {marker}", f"{every} {command} {marker}"]


def has_systemd() -> bool:
    return shutil.which("systemctl") is not None and Path("/run/systemd/system").is_dir()


def default_unit_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/etc/systemd/system")
    return Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "systemd" / "user"


def enable_commands(spec: TimerSpec) -> list[list[str]]:
    user = [] if os.geteuid() == 0 else ["--user"]
    return [["systemctl", *user, "daemon-reload"], ["systemctl", *user, "enable", "--now", f"{spec.unit_name}.timer"]]


def install_cron(lines: list[str], marker: str) -> None:
    """Replace this queue's lines in the user's crontab (other lines are kept)."""
    current = subprocess.run(["crontab", "-l"], capture_output=True, text=True)
    kept = [line for line in (current.stdout.splitlines() if current.returncode == 0 else []) if marker not in line]
    subprocess.run(["crontab", "-"], input="\n".join(kept + lines) + "\n", text=True, check=True)


def _interval_minutes(interval: str) -> int:
    number = int(re.match(r"\d+", interval).group())
    unit = interval[len(str(number)):]
    return {"s": number // 60, "sec": number // 60, "min": number, "m": number, "h": number * 60, "hr": number * 60}[unit]


def _systemd_quote(arg: str) -> str:
    """systemd's ExecStart splits on spaces and honours double quotes and backslash escapes."""
    if re.fullmatch(r"[A-Za-z0-9_@+=:,./-]+", arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%").replace("$", "$$") + '"'
