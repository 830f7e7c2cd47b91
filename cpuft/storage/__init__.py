"""Durable run storage: a run's copy in a bucket (or any fsspec URL) that outlives the machine.

    store.py     RunStore: check a URL is writable, upload files and manifest-sealed
                 directories, keep the newest complete checkpoints, restore a run directory
    manifest.py  what marks an uploaded directory complete (file list, sizes, sha256)
    uploader.py  BackgroundUploader: one thread, retries with backoff, never raises into training
    lease.py     JobLease / LeaseKeeper: one scheduler per queue job across machines

Nothing here imports the training stack; the recipe and the batch runner call into it.
"""

from cpuft.storage.lease import JobLease, LeaseKeeper, LeaseLost, LeaseRecord
from cpuft.storage.store import RestoreReport, RunStore, StoredCheckpoint
from cpuft.storage.uploader import BackgroundUploader


def open_writable_store(url: str | None) -> RunStore | None:
    """The --sync-to store at `url`, checked writable (UserError, exit 2) before a run writes
    anything; None without a URL."""
    if not url:
        return None
    store = RunStore(url)
    store.check_writable()
    return store


__all__ = [
    "BackgroundUploader",
    "JobLease",
    "LeaseKeeper",
    "LeaseLost",
    "LeaseRecord",
    "RestoreReport",
    "RunStore",
    "StoredCheckpoint",
    "open_writable_store",
]
