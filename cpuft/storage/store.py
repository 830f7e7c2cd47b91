"""A run's durable copy in a store named by an fsspec URL (`--sync-to`).

    gs://bucket/path    Google Cloud Storage, through gcsfs (installed separately: `cpuft[gcs]`)
    s3://bucket/path    S3, through s3fs
    /a/path, file://    a local directory (tests; a mounted disk)

fsspec picks the filesystem from the URL's protocol and imports its package only then, so cpuft
has no hard dependency on any cloud SDK. Credentials are the filesystem's own (on a GCE VM gcsfs
uses the VM's service account).

Layout in the store mirrors the run directory:

    config.yaml, plan.json, metrics.jsonl, summary.json    whole files, replaced whole
    checkpoint-N/...  + checkpoint-N/cpuft-manifest.json   a Trainer checkpoint, manifest last
    adapter/...       + adapter/cpuft-manifest.json        the final adapter, manifest last

A single file is written under a temporary name and then moved into place, so a reader never sees
half of it (on an object store one PUT is already all-or-nothing and the move is one server-side
copy; on a local directory the move is an atomic rename). A directory is complete only when its
manifest says so (see cpuft.storage.manifest). `restore()` fills an empty local run directory
from the newest complete checkpoint; `prune_checkpoints()` keeps the newest K complete ones and
deletes older ones only once a newer complete one exists.

Limits: one writer per run (the batch lease in cpuft.storage.lease ensures it for queue jobs);
temporary objects of an upload killed mid-file stay in the store (small: at most one file).
Failures raise: the background uploader (cpuft.storage.uploader) is what keeps them away from
the training loop.
"""

from __future__ import annotations

import os
import shutil
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

from cpuft.artifacts import atomic_directory
from cpuft.checkpoints import CHECKPOINT_NAME
from cpuft.errors import UserError, first_line
from cpuft.run_dir import RunDir
from cpuft.storage.manifest import MANIFEST_NAME, Manifest, sha256_of_file

_TEMP_MARK = ".cpuft-tmp-"


def warn_to_stderr(message: str) -> None:
    print(f"cpuft: warning: {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class StoredCheckpoint:
    name: str
    step: int
    problem: str | None  # None when complete

    @property
    def complete(self) -> bool:
        return self.problem is None


@dataclass
class RestoreReport:
    checkpoint: str | None  # the checkpoint-N restored, None when the store held no complete one
    files: list[str] = field(default_factory=list)  # run files restored
    adapter: bool = False
    skipped: list[StoredCheckpoint] = field(default_factory=list)  # newer, incomplete ones


class RunStore:
    """One run's copy at `url`. Construction checks the URL's protocol; nothing is written."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = url.rstrip("/")
        try:
            self.fs, root = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        except ImportError as exc:
            # fsspec knows the protocol but its package is absent, e.g. gs:// without gcsfs.
            raise UserError(
                f"--sync-to {url}: {first_line(exc)}. For gs:// install cpuft's gcs extra"
                " (pip install 'cpuft[gcs]')."
            ) from None
        except ValueError as exc:
            raise UserError(
                f"--sync-to {url}: {first_line(exc)}. Use gs://bucket/path, s3://bucket/path or a"
                " local directory."
            ) from None
        self.root = root.rstrip("/")
        # Object stores have no directories; a local directory tree has to be made as it grows.
        self._local = isinstance(self.fs, LocalFileSystem)

    def __repr__(self) -> str:
        return f"RunStore({self.url!r})"

    def path(self, name: str) -> str:
        return f"{self.root}/{name}" if name else self.root

    # ------------------------------------------------------------------ checks

    def check_writable(self) -> None:
        """Write, read back and delete a probe object; UserError (exit 2) says why it failed."""
        probe = self.path(f".cpuft-probe-{uuid.uuid4().hex}")
        payload = f"cpuft write probe {probe}\n".encode()
        try:
            self._make_parent(probe)
            self.fs.pipe_file(probe, payload)
            read_back = self.fs.cat_file(probe)
            self.fs.rm_file(probe)
        except Exception as exc:  # any failure means the run could not be made durable
            raise UserError(
                f"--sync-to {self.url} cannot be written ({type(exc).__name__}: {first_line(exc)})."
                " Nothing was trained; check the URL, that the bucket exists, and the credentials"
                " and permissions of this machine."
            ) from None
        if read_back != payload:
            raise UserError(f"--sync-to {self.url}: a probe object read back different bytes than written.")

    # ------------------------------------------------------------------ writing

    def put_file(self, local_path: str | Path, name: str) -> None:
        """Upload one file whole: to a temporary name, then moved over `name`."""
        final = self.path(name)
        temp = f"{final}{_TEMP_MARK}{uuid.uuid4().hex[:12]}"
        self._make_parent(final)
        self.fs.put_file(str(local_path), temp)
        self._move_into_place(temp, final)

    def put_directory(self, local_dir: str | Path, name: str) -> Manifest:
        """Upload every file of `local_dir` to `name/`, then its manifest; returns the manifest.

        A manifest already at `name/` (an earlier upload of the same directory) is deleted first,
        so it never vouches for files that are being replaced.
        """
        local_dir = Path(local_dir)
        manifest_path = self.path(f"{name}/{MANIFEST_NAME}")
        if self.fs.exists(manifest_path):
            self.fs.rm_file(manifest_path)
        manifest = Manifest.of_directory(local_dir)
        for entry in manifest.entries:
            target = self.path(f"{name}/{entry.path}")
            self._make_parent(target)
            self.fs.put_file(str(local_dir / entry.path), target)
        self.put_bytes(manifest.to_json(), f"{name}/{MANIFEST_NAME}")
        return manifest

    def put_bytes(self, data: bytes, name: str) -> None:
        """Write `data` as the whole of `name`: to a temporary name, then moved over `name`."""
        final = self.path(name)
        temp = f"{final}{_TEMP_MARK}{uuid.uuid4().hex[:12]}"
        self._make_parent(final)
        self.fs.pipe_file(temp, data)
        self._move_into_place(temp, final)

    def _move_into_place(self, temp: str, final: str) -> None:
        if self._local:
            os.replace(temp, final)  # atomic, and replaces an existing file
        else:
            self.fs.mv(temp, final)

    def _make_parent(self, path: str) -> None:
        if self._local:
            self.fs.makedirs(self.fs._parent(path), exist_ok=True)

    # ------------------------------------------------------------------ reading

    def checkpoints(self) -> list[StoredCheckpoint]:
        """Every checkpoint-N/ in the store, newest first, each with what (if anything) it lacks."""
        self.fs.invalidate_cache(self.root)
        try:
            listing = self.fs.ls(self.root, detail=True)
        except FileNotFoundError:
            return []
        found = []
        for info in listing:
            name = info["name"].rstrip("/").rsplit("/", 1)[-1]
            match = CHECKPOINT_NAME.match(name)
            if match and info.get("type") == "directory":
                found.append(StoredCheckpoint(name, int(match.group(1)), self.directory_problem(name)))
        return sorted(found, key=lambda c: c.step, reverse=True)

    def directory_problem(self, name: str) -> str | None:
        """Why the stored directory `name` is not complete, or None when it is."""
        try:
            manifest = self._manifest(name)
        except FileNotFoundError:
            return "no manifest (its upload was cut off)"
        except ValueError as exc:
            return str(exc)
        problems = manifest.problems_with(self._stored_sizes(name))
        return "; ".join(problems) or None

    def _manifest(self, name: str) -> Manifest:
        return Manifest.from_json(self.fs.cat_file(self.path(f"{name}/{MANIFEST_NAME}")))

    def _stored_sizes(self, name: str) -> dict[str, int]:
        base = self.path(name)
        self.fs.invalidate_cache(base)
        found = self.fs.find(base, detail=True)
        return {p[len(base) + 1:]: int(info["size"]) for p, info in found.items() if info.get("type") != "directory"}

    def has(self, name: str) -> bool:
        return self.fs.exists(self.path(name))

    def get_bytes(self, name: str) -> bytes | None:
        """The whole of the stored file `name`, or None when there is none."""
        try:
            return self.fs.cat_file(self.path(name))
        except FileNotFoundError:
            return None

    # ------------------------------------------------------------------ retention

    def prune_checkpoints(self, keep: int) -> list[str]:
        """Keep the newest `keep` complete checkpoints; delete older ones and older incomplete ones.

        Nothing is deleted unless at least one complete checkpoint remains newer than it; a
        complete checkpoint loses its manifest first, so it is never seen complete but partial.
        """
        if keep < 1:
            raise ValueError("keep must be at least 1")
        stored = self.checkpoints()
        complete = [c for c in stored if c.complete]
        if not complete:
            return []
        kept = {c.name for c in complete[:keep]}
        newest_complete = complete[0].step
        deleted = []
        for checkpoint in stored:
            if checkpoint.name in kept or checkpoint.step > newest_complete:
                continue  # a newer incomplete one may still be uploading
            manifest_path = self.path(f"{checkpoint.name}/{MANIFEST_NAME}")
            if checkpoint.complete:
                self.fs.rm_file(manifest_path)
            self.fs.rm(self.path(checkpoint.name), recursive=True)
            deleted.append(checkpoint.name)
        return deleted

    # ------------------------------------------------------------------ restore

    def restore(self, run_dir: str | Path, warn: Callable[[str], None] = warn_to_stderr) -> RestoreReport:
        """Fill a local run directory that has no config.yaml from the store.

        Downloads the newest complete checkpoint (newer incomplete ones are skipped with a
        warning naming them, as is one whose bytes do not match its manifest), the final adapter
        when it is complete, and the run files; config.yaml comes last, so a restore cut short
        leaves a directory that is restored again rather than resumed. Everything is downloaded
        under a temporary name and renamed into place.
        """
        run = RunDir(run_dir)
        if run.config_file.exists():
            raise UserError(f"{run} already holds a run ({RunDir.CONFIG}); restore fills only an empty run directory.")
        try:
            self.fs.invalidate_cache()  # listings cached by an earlier call may predate other writers
            if not self.has(RunDir.CONFIG):
                raise UserError(f"--sync-to {self.url} holds no cpuft run (no {RunDir.CONFIG}); nothing to resume.")
            run.path.mkdir(parents=True, exist_ok=True)
            _remove_partial_downloads(run.path)
            report = RestoreReport(checkpoint=None)
            for checkpoint in self.checkpoints():
                problem = checkpoint.problem
                if problem is None:
                    problem = self._download_directory(checkpoint.name, run.path / checkpoint.name)
                if problem is None:
                    report.checkpoint = checkpoint.name
                    break
                report.skipped.append(StoredCheckpoint(checkpoint.name, checkpoint.step, problem))
                warn(f"skipping {checkpoint.name} in {self.url}: {problem}; trying an older checkpoint.")
            if self.has(f"{RunDir.ADAPTER}/{MANIFEST_NAME}") and self.directory_problem(RunDir.ADAPTER) is None:
                report.adapter = self._download_directory(RunDir.ADAPTER, run.adapter_dir) is None
            for name in sorted(RunDir.RUN_FILES, key=lambda n: n == RunDir.CONFIG):
                if self.has(name):
                    self._download_file(name, run.path / name)
                    report.files.append(name)
        except UserError:
            raise
        except Exception as exc:
            raise UserError(
                f"cannot restore from --sync-to {self.url} ({type(exc).__name__}: {first_line(exc)})."
            ) from None
        return report

    def _download_directory(self, name: str, destination: Path) -> str | None:
        """Download a complete stored directory; returns why it was refused, or None on success."""
        try:
            manifest = self._manifest(name)
            with atomic_directory(destination) as temp:
                for entry in manifest.entries:
                    local = temp / entry.path
                    local.parent.mkdir(parents=True, exist_ok=True)
                    self.fs.get_file(self.path(f"{name}/{entry.path}"), str(local))
                    if local.stat().st_size != entry.size or sha256_of_file(local) != entry.sha256:
                        raise _Mismatch(f"{entry.path} does not match its manifest (sha256)")
        except (_Mismatch, ValueError) as exc:
            return str(exc)
        except FileNotFoundError as exc:  # deleted while we read it (retention by another writer)
            return f"{first_line(exc)} vanished during download"
        return None

    def _download_file(self, name: str, destination: Path) -> None:
        temp = destination.with_name(f".{destination.name}{_TEMP_MARK}{uuid.uuid4().hex[:12]}")
        try:
            self.fs.get_file(self.path(name), str(temp))
            os.replace(temp, destination)
        finally:
            temp.unlink(missing_ok=True)


class _Mismatch(Exception):
    pass


def _remove_partial_downloads(run_dir: Path) -> None:
    """Temporary names of an earlier restore that was killed (cpuft.artifacts' and ours)."""
    for path in run_dir.iterdir():
        if path.name.startswith(".") and (path.name.endswith(".tmp") or _TEMP_MARK in path.name):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
