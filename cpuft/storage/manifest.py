"""The manifest that marks an uploaded directory complete.

An object store cannot rename a directory atomically, so a directory (a Trainer `checkpoint-N/`,
the final `adapter/`) is uploaded file by file and `cpuft-manifest.json` is written last: it lists
every file with its size and sha256. A stored directory counts as complete only when its manifest
parses and every file it lists is there with the listed size; the sha256 is checked after
download, so a file of the right length with the wrong bytes is caught too.

Limits: files only (empty directories are not recorded); symlinks are followed.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

MANIFEST_NAME = "cpuft-manifest.json"
MANIFEST_FORMAT = 1
_HASH_CHUNK = 4 * 2**20


@dataclass(frozen=True)
class ManifestEntry:
    path: str  # relative, '/'-separated
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    entries: tuple[ManifestEntry, ...]

    @property
    def total_bytes(self) -> int:
        return sum(e.size for e in self.entries)

    @classmethod
    def of_directory(cls, local_dir: str | Path) -> Manifest:
        """Hash every file under `local_dir` (the manifest itself excluded), in a stable order."""
        local_dir = Path(local_dir)
        entries = []
        for dirpath, dirnames, filenames in os.walk(local_dir):
            dirnames.sort()
            for filename in sorted(filenames):
                path = Path(dirpath) / filename
                relative = path.relative_to(local_dir).as_posix()
                if relative == MANIFEST_NAME:
                    continue
                entries.append(ManifestEntry(relative, path.stat().st_size, sha256_of_file(path)))
        return cls(tuple(entries))

    def to_json(self) -> bytes:
        record = {
            "format": MANIFEST_FORMAT,
            "files": [{"path": e.path, "size": e.size, "sha256": e.sha256} for e in self.entries],
        }
        return (json.dumps(record, indent=1) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        """Parse a stored manifest; ValueError says what is wrong with it."""
        try:
            record = json.loads(data)
            if record.get("format") != MANIFEST_FORMAT:
                raise ValueError(f"manifest format {record.get('format')!r}, expected {MANIFEST_FORMAT}")
            entries = tuple(
                ManifestEntry(str(f["path"]), int(f["size"]), str(f["sha256"])) for f in record["files"]
            )
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"unreadable manifest ({type(exc).__name__}: {exc})") from None
        for entry in entries:
            parts = entry.path.split("/")
            if entry.path.startswith("/") or ".." in parts or "" in parts:
                raise ValueError(f"manifest lists an unsafe path {entry.path!r}")
        return cls(entries)

    def problems_with(self, stored_sizes: dict[str, int]) -> list[str]:
        """What makes a stored copy incomplete, given its relative path -> size listing."""
        problems = []
        for entry in self.entries:
            size = stored_sizes.get(entry.path)
            if size is None:
                problems.append(f"{entry.path} is missing")
            elif size != entry.size:
                problems.append(f"{entry.path} has {size} of {entry.size} bytes")
        return problems


def sha256_of_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
