"""Job leases in the store, so schedulers on two machines never run the same queue job at once.

A lease is a sequence of numbered records under `<url>/leases/<job>/`:

    000000000000.json  000000000001.json  ...     {"owner", "host", "state", "expires_at", ...}

The record with the highest number is the lease. Every change (acquire, renew, take over an
expired lease, release) writes the *next* number with an atomic create-if-absent, so of two
schedulers that both saw record N, exactly one creates N+1 and the other learns it lost: this is
a compare-and-swap built from the one primitive every supported store has.

    local directory   write a temporary file, then link(2) it to the record's name: link fails
                      with EEXIST if the name exists (O_EXCL semantics, and the record appears
                      with all its bytes, never empty)
    gs://             gcsfs `pipe_file(..., mode="create")` sends `ifGenerationMatch=0`; GCS
                      answers 412 if the object exists, which gcsfs raises as FileExistsError
    s3://             s3fs `mode="create"` sends `If-None-Match: *` (AWS S3 only, per s3fs)

Any other protocol is refused (UserError): without an atomic create-if-absent no lease can be
safe. gcsfs exposes `ifGenerationMatch` only as `0` (create-if-absent), not as "overwrite only
generation G", so an in-place renewal with generation preconditions is not available through it;
numbered records need only create-if-absent, which every one of these stores has.

Renewal writes N+1 and deletes older records. Because deleted names could be created again, a
writer checks after each create that no higher record exists; a stale holder that re-creates a
pruned number so finds the higher one and learns it lost the lease.

A retried create whose first try had in fact succeeded (gcsfs retries on its own; cpuft retries
a renewal whose answer was lost) comes back as FileExistsError: the writer reads the record back
and recognises its own owner id, which is unique to one JobLease object.

Expiry is judged by wall clocks (the holder writes `expires_at`, others compare it with their
own clock): clocks must agree to well within the TTL (GCE VMs sync to Google's NTP). A holder
that cannot renew must stop its job before its lease runs out: LeaseKeeper calls `on_lost` once
renewal has failed for `fence_after` seconds (by default 60 % of the TTL), leaving the rest for
the job to checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass

from cpuft.errors import UserError, first_line
from cpuft.storage.store import RunStore, warn_to_stderr

LEASE_DIR = "leases"
_RECORD_NAME = re.compile(r"^(\d{12})\.json$")
_SAFE_JOB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_READ_RETRIES = 5  # a record pruned between listing and reading: list again


class LeaseLost(Exception):
    """Another owner holds the lease now (or this one could not prove it still holds it)."""


@dataclass(frozen=True)
class LeaseRecord:
    job: str
    generation: int
    owner: str
    host: str
    state: str  # "held" | "released"
    expires_at: float  # wall-clock seconds (time.time())
    written_at: float

    def live(self, now: float) -> bool:
        return self.state == "held" and self.expires_at > now


def _exclusive_create(fs) -> Callable[[str, bytes], None]:
    """The store's atomic create-if-absent: raises FileExistsError when `path` exists."""
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    if protocols & {"file", "local"}:

        def create_local(path: str, data: bytes) -> None:
            directory, name = os.path.split(path)
            try:
                os.makedirs(directory, exist_ok=True)
            except FileExistsError:  # a file in the way; FileExistsError must mean "record exists"
                raise NotADirectoryError(f"{directory} is not a directory") from None
            temp = os.path.join(directory, f".{name}.{uuid.uuid4().hex}.tmp")
            with open(temp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(temp, path)  # EEXIST if the name exists: the atomic step
            finally:
                os.unlink(temp)

        return create_local
    if protocols & {"gs", "gcs", "s3", "s3a"}:
        return lambda path, data: fs.pipe_file(path, data, mode="create")
    raise UserError(
        f"job leases need a store with an atomic create-if-absent; cpuft knows none for"
        f" {'/'.join(sorted(protocols))}://. Use gs://, s3:// (AWS) or a local directory."
    )


class JobLease:
    """The lease on one queue job in the store at `store` (a RunStore or a URL)."""

    def __init__(
        self,
        store: RunStore | str,
        job: str,
        owner: str | None = None,
        ttl_seconds: float = 300.0,
        clock: Callable[[], float] = time.time,
        host: str | None = None,
    ):
        if not _SAFE_JOB_NAME.match(job):
            raise UserError(f"job name {job!r} cannot name a lease (letters, digits, '.', '_', '-').")
        self.store = store if isinstance(store, RunStore) else RunStore(store)
        self.job = job
        self.host = host or socket.gethostname()  # what other schedulers see as the holder's machine
        self.owner = owner or f"{self.host}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.ttl_seconds = ttl_seconds
        self.clock = clock
        self.fs = self.store.fs
        self.directory = self.store.path(f"{LEASE_DIR}/{job}")
        self._create = _exclusive_create(self.fs)
        self.held: LeaseRecord | None = None

    # ------------------------------------------------------------------ the operations

    def current(self) -> LeaseRecord | None:
        """The lease as it stands (the highest record), or None if there never was one."""
        for _ in range(_READ_RETRIES):
            generations = self._generations()
            if not generations:
                return None
            try:
                return self._read(generations[-1])
            except FileNotFoundError:
                continue  # pruned between listing and reading, so a higher one exists: list again
        raise LeaseLost(f"lease {self.job}: its records keep changing; try again")

    def acquire(self, break_if: Callable[[LeaseRecord], bool] | None = None) -> bool:
        """Take the lease if it is free, released, expired, or `break_if(holder)` says its holder
        is dead (e.g. the same host, whose queue lock this process now holds). True if held."""
        current = self.current()
        now = self.clock()
        if current is not None and current.live(now) and current.owner != self.owner:
            if break_if is None or not break_if(current):
                return False
        generation = 0 if current is None else current.generation + 1
        try:
            self.held = self._claim(generation, "held")
        except (FileExistsError, LeaseLost):
            return False
        self._prune()
        return True

    def renew(self) -> None:
        """Extend the lease by the TTL; LeaseLost if another owner took it meanwhile."""
        if self.held is None:
            raise LeaseLost(f"lease {self.job}: not held by {self.owner}")
        try:
            self.held = self._claim(self.held.generation + 1, "held")
        except FileExistsError:
            self.held = None
            holder = self.current()
            raise LeaseLost(
                f"lease {self.job}: taken over by {holder.owner if holder else 'another owner'}"
            ) from None
        except LeaseLost:
            self.held = None
            raise
        self._prune()

    def release(self) -> bool:
        """Give the lease up now, so another scheduler need not wait for it to expire.

        Best effort (it runs on the way out, e.g. after SIGTERM): False when the store could not
        be reached, and the lease then simply expires.
        """
        if self.held is None:
            return True
        try:
            self._claim(self.held.generation + 1, "released")
        except (FileExistsError, LeaseLost):
            pass  # another owner holds it already: nothing of ours to release
        except Exception:
            return False
        finally:
            self.held = None
        self._prune()
        return True

    # ------------------------------------------------------------------ records

    def _claim(self, generation: int, state: str) -> LeaseRecord:
        now = self.clock()
        record = LeaseRecord(
            job=self.job, generation=generation, owner=self.owner, host=self.host, state=state,
            expires_at=now + self.ttl_seconds, written_at=now,
        )
        path = self._record_path(generation)
        try:
            self._create(path, json.dumps(asdict(record)).encode())
        except FileExistsError:
            try:
                existing = self._read(generation)
            except FileNotFoundError:
                raise FileExistsError(path) from None
            if existing.owner != self.owner:
                raise
            record = existing  # an earlier try of ours had succeeded after all
        newest = self._generations()
        if newest and newest[-1] > generation:
            raise LeaseLost(f"lease {self.job}: record {newest[-1]} is newer than ours ({generation})")
        return record

    def _read(self, generation: int) -> LeaseRecord:
        data = self.fs.cat_file(self._record_path(generation))
        try:
            return LeaseRecord(**json.loads(data))
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as exc:
            # Records are created whole, so this is damage from outside: treat it as expired.
            return LeaseRecord(self.job, generation, f"unreadable ({first_line(exc)})", "", "held", 0.0, 0.0)

    def _generations(self) -> list[int]:
        self.fs.invalidate_cache(self.directory)  # a cached listing could hide another's record
        try:
            names = self.fs.ls(self.directory, detail=False)
        except FileNotFoundError:
            return []
        found = (_RECORD_NAME.match(n.rstrip("/").rsplit("/", 1)[-1]) for n in names)
        return sorted(int(m.group(1)) for m in found if m)

    def _record_path(self, generation: int) -> str:
        return f"{self.directory}/{generation:012d}.json"

    def _prune(self) -> None:
        """Delete records older than the newest (best effort: they are never read again)."""
        generations = self._generations()
        for generation in generations[:-1]:
            try:
                self.fs.rm_file(self._record_path(generation))
            except Exception:
                pass


class LeaseKeeper:
    """Renews a held lease every `renew_every` seconds from a thread while a job runs.

    Calls `on_lost(reason)` once, and stops, when the lease is taken over or when renewal has
    failed for `fence_after` seconds; the caller then stops the job (SIGTERM: checkpoint, exit).
    """

    def __init__(
        self,
        lease: JobLease,
        on_lost: Callable[[str], None],
        renew_every: float | None = None,
        fence_after: float | None = None,
        warn: Callable[[str], None] = warn_to_stderr,
    ):
        if lease.held is None:
            raise ValueError("LeaseKeeper needs a held lease: acquire() it first")
        self.lease = lease
        self.on_lost = on_lost
        self.renew_every = renew_every if renew_every is not None else lease.ttl_seconds / 5
        self.fence_after = fence_after if fence_after is not None else lease.ttl_seconds * 0.6
        self.warn = warn
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"cpuft-lease-{lease.job}", daemon=True)

    def start(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def __enter__(self) -> LeaseKeeper:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self) -> None:
        last_renewed = time.monotonic()
        warned = False
        while not self._stop.wait(self.renew_every):
            try:
                self.lease.renew()
            except LeaseLost as exc:
                self._lose(str(exc))
                return
            except Exception as exc:  # the store is unreachable: keep trying until the fence
                if time.monotonic() - last_renewed >= self.fence_after:
                    self._lose(
                        f"lease {self.lease.job}: not renewed for {self.fence_after:g} s"
                        f" ({type(exc).__name__}: {first_line(exc)})"
                    )
                    return
                if not warned:
                    warned = True
                    self.warn(f"cannot renew lease {self.lease.job} ({type(exc).__name__}: {first_line(exc)}); retrying.")
                continue
            last_renewed = time.monotonic()
            warned = False

    def _lose(self, reason: str) -> None:
        self.lost = reason
        self.on_lost(reason)
