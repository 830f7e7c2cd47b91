"""Background uploads of a run to its store, so training never waits on (or dies of) the network.

One worker thread takes uploads from an ordered queue:

- a checkpoint (`upload_checkpoint`) is uploaded file by file with its manifest last, then the
  store keeps the newest `keep_checkpoints` complete ones; a newer checkpoint takes the place of
  an older one still waiting (the one being uploaded finishes first);
- a run file (`upload_file`, e.g. metrics.jsonl after every log) is read when its turn comes, so
  asking twice before it is sent uploads it once, with the newer content;
- a directory (`upload_directory`, the final adapter/) goes up like a checkpoint, without
  retention.

A failed upload stays at the head of the queue and is retried with exponential backoff
(`first_retry_seconds` doubling up to `max_retry_seconds`); the first failure of an outage prints
one warning, the first success after it one line saying uploads work again. Nothing here raises
into the caller: enqueueing only takes a lock. A source deleted locally before its upload
finished (the Trainer's save_total_limit rotating an old checkpoint away) is dropped with a note.

`flush(timeout)` retries at once and waits until the queue is empty (on SIGTERM and at the end of
a run); it returns False when the time ran out. The thread is a daemon: a process that exits
with uploads pending loses only those uploads, never the store's complete copies.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cpuft.checkpoints import CHECKPOINT_NAME
from cpuft.errors import first_line
from cpuft.storage.store import RunStore, warn_to_stderr


@dataclass(frozen=True)
class _Upload:
    kind: str  # "checkpoint" | "directory" | "file"
    local: Path
    name: str  # where it goes in the store
    step: int | None = None  # checkpoints only

    @property
    def key(self) -> str:
        """Uploads with one key replace each other while they wait: one slot for all checkpoints."""
        return "checkpoint" if self.kind == "checkpoint" else f"{self.kind}:{self.name}"


class BackgroundUploader:
    """Uploads a run's files to `store` from one background thread; see the module docstring."""

    @classmethod
    def for_run(cls, store: RunStore, run_dir, keep_checkpoints: int) -> BackgroundUploader:
        """The uploader of a run starting in `run_dir` (a cpuft.run_dir.RunDir), its header
        (config.yaml, plan.json) queued first."""
        uploader = cls(store, keep_checkpoints=keep_checkpoints)
        for path in (run_dir.config_file, run_dir.plan_file):
            uploader.upload_file(path)
        return uploader

    def __init__(
        self,
        store: RunStore,
        keep_checkpoints: int = 2,
        first_retry_seconds: float = 1.0,
        max_retry_seconds: float = 60.0,
        warn: Callable[[str], None] = warn_to_stderr,
    ):
        if keep_checkpoints < 1:
            raise ValueError("keep_checkpoints must be at least 1")
        self.store = store
        self.keep_checkpoints = keep_checkpoints
        self.first_retry_seconds = first_retry_seconds
        self.max_retry_seconds = max_retry_seconds
        self.warn = warn
        self.uploaded: list[str] = []  # store names, in the order they became durable
        self.failed_attempts = 0
        self._pending: OrderedDict[str, _Upload] = OrderedDict()
        self._in_flight: _Upload | None = None
        self._failing_since: float | None = None
        self._retry_now = False
        self._closing = False
        self._newest_step = -1
        self._condition = threading.Condition()
        self._thread = threading.Thread(target=self._work, name="cpuft-uploader", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ what training calls

    def upload_checkpoint(self, checkpoint_dir: str | Path) -> None:
        checkpoint_dir = Path(checkpoint_dir)
        match = CHECKPOINT_NAME.match(checkpoint_dir.name)
        if match is None:
            raise ValueError(f"{checkpoint_dir} is not a Trainer checkpoint-N directory")
        step = int(match.group(1))
        with self._condition:
            if step < self._newest_step:
                return  # an older checkpoint than one already queued or stored is no use
            self._newest_step = step
        self._enqueue(_Upload("checkpoint", checkpoint_dir, checkpoint_dir.name, step))

    def upload_file(self, local_path: str | Path, name: str | None = None) -> None:
        local_path = Path(local_path)
        self._enqueue(_Upload("file", local_path, name or local_path.name))

    def upload_directory(self, local_dir: str | Path, name: str | None = None) -> None:
        local_dir = Path(local_dir)
        self._enqueue(_Upload("directory", local_dir, name or local_dir.name))

    def flush(self, timeout: float | None = None) -> bool:
        """Retry now and wait until every queued upload is stored; False if `timeout` ran out."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._condition:
            self._retry_now = True
            self._condition.notify_all()
            while self._pending or self._in_flight is not None:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._condition.wait(remaining)
            return True

    def close(self, timeout: float | None = None) -> bool:
        """flush(timeout), then stop the thread after its current attempt; True if all was stored."""
        stored = self.flush(timeout)
        with self._condition:
            self._closing = True
            self._condition.notify_all()
        if stored:
            self._thread.join()
        return stored

    @property
    def pending(self) -> list[str]:
        with self._condition:
            waiting = [u.name for u in self._pending.values()]
            if self._in_flight is not None and self._in_flight.name not in waiting:
                waiting.insert(0, self._in_flight.name)
            return waiting

    # ------------------------------------------------------------------ the worker

    def _enqueue(self, upload: _Upload) -> None:
        with self._condition:
            if self._closing:
                raise RuntimeError("the uploader is closed")
            self._pending[upload.key] = upload  # an existing key keeps its place in the queue
            self._condition.notify_all()

    def _work(self) -> None:
        delay = self.first_retry_seconds
        while True:
            with self._condition:
                while not self._pending and not self._closing:
                    self._condition.wait()
                if self._closing:
                    return
                key, upload = next(iter(self._pending.items()))
                self._in_flight = upload
                self._retry_now = False  # a flush() from now on cuts the coming backoff short
            outcome = self._attempt(upload)
            with self._condition:
                self._in_flight = None
                if outcome != "failed" and self._pending.get(key) is upload:
                    del self._pending[key]
                self._condition.notify_all()
                if outcome == "failed":
                    self._condition.wait_for(lambda: self._retry_now or self._closing, timeout=delay)
                    delay = min(delay * 2, self.max_retry_seconds)
                else:
                    delay = self.first_retry_seconds

    def _attempt(self, upload: _Upload) -> str:
        """One try: 'stored', 'gone' (the local source vanished) or 'failed'. Never raises."""
        if not upload.local.exists():
            self._note_gone(upload)
            return "gone"
        try:
            if upload.kind == "file":
                self.store.put_file(upload.local, upload.name)
            else:
                self.store.put_directory(upload.local, upload.name)
        except Exception as exc:  # anything at all: the training loop must not see it
            if not upload.local.exists():
                self._note_gone(upload)
                return "gone"
            self._note_failure(upload, exc)
            return "failed"
        self.uploaded.append(upload.name)
        self._note_success()
        if upload.kind == "checkpoint":
            try:
                self.store.prune_checkpoints(self.keep_checkpoints)
            except Exception as exc:  # retention can wait for the next checkpoint
                self._note_failure(upload, exc, action="remove old checkpoints of")
        return "stored"

    def _note_failure(self, upload: _Upload, exc: BaseException, action: str = "upload") -> None:
        self.failed_attempts += 1
        if self._failing_since is None:
            self._failing_since = time.monotonic()
            self.warn(
                f"cannot {action} {upload.name} to {self.store.url} ({type(exc).__name__}:"
                f" {first_line(exc)}); training goes on and cpuft retries with backoff (at most"
                f" {self.max_retry_seconds:g} s apart). This is said once per outage."
            )

    def _note_success(self) -> None:
        if self._failing_since is not None:
            seconds = time.monotonic() - self._failing_since
            self._failing_since = None
            self.warn(f"uploads to {self.store.url} work again after {seconds:.0f} s.")

    def _note_gone(self, upload: _Upload) -> None:
        self.warn(f"{upload.local} was deleted before its upload finished; not uploaded (a newer one follows).")
