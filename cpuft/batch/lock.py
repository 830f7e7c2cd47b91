"""One scheduler per queue: an exclusive flock on `<state dir>/lock`, holding the owner's PID and host.

The kernel drops a flock when its holder dies, however it dies (kill -9, OOM, power cut of a
process but not of the disk), so a free lock proves no scheduler is running this queue and any
'running' row in the state store is stale. flock is reliable on local filesystems; do not share
one queue between machines over NFS.

The lock file is never deleted: unlinking a lock file lets a second process lock a new inode while
the first still holds the old one.

`current_host()` is the name a scheduler records here, in its state rows and in job leases;
$CPUFT_HOST overrides the machine's host name (two containers on one machine, tests of two hosts).
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

# sysexits' EX_CANTCREAT: another scheduler holds this queue's lock, or the jobs left are leased to
# schedulers on other machines (cpuft.batch.durable); this runner can do nothing more now.
EXIT_LOCKED = 73


def current_host() -> str:
    """The name schedulers record and compare: $CPUFT_HOST if set, else the machine's host name."""
    return os.environ.get("CPUFT_HOST") or socket.gethostname()


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but someone else's
        return True
    return True


class QueueLocked(Exception):
    """Another scheduler holds the lock; `holder` is what it wrote ('pid N on host H')."""

    def __init__(self, path: Path, holder: str):
        super().__init__(f"{path} is held by {holder or 'another process'}")
        self.path, self.holder = path, holder


class QueueLock:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock without waiting, or raise QueueLocked."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
            os.close(fd)
            raise QueueLocked(self.path, holder) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {current_host()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = None

    def __enter__(self) -> QueueLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_holder(path: str | Path) -> str | None:
    """Who holds the lock now ('pid N on host H'), or None when it is free. Never blocks."""
    path = Path(path)
    if not path.exists():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
