"""The name of a Trainer checkpoint directory, `checkpoint-N`, the step N it holds, and which
checkpoints in a run directory are complete (every file whole, not merely present).

One definition for the batch runner (local run directories) and the run store (its copy in a
bucket). It lives outside cpuft.storage so that reading it does not import fsspec, and does not
import transformers (where the prefix comes from: `trainer_utils.PREFIX_CHECKPOINT_DIR`) either.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_name(step: int) -> str:
    """The directory the Trainer saves step `step` in."""
    return f"checkpoint-{step}"


def checkpoint_step(name: str) -> int | None:
    """N for a directory named `checkpoint-N`, None for any other name."""
    match = CHECKPOINT_NAME.match(name)
    return int(match.group(1)) if match else None


def newest_complete_checkpoint(run_dir: Path) -> tuple[Path | None, list[Path]]:
    """The newest checkpoint-N in `run_dir` that is whole (`checkpoint_problem` finds nothing),
    and the newer ones a hard kill cut short or that are corrupt (newest first). Reads only."""
    found = sorted(
        (step, path) for path in Path(run_dir).iterdir()
        if path.is_dir() and (step := checkpoint_step(path.name)) is not None
    )
    incomplete = []
    for _, path in reversed(found):
        if checkpoint_problem(path) is None:
            return path, incomplete
        incomplete.append(path)
    return None, incomplete


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint at `path` cannot be resumed from, or None when it is whole.

    Whole means: trainer_state.json (the file the Trainer writes last) is an object with a
    global_step; every other .json parses; every .safetensors file is as long as its header says
    (a truncated copy fails here, not as a SafetensorError inside the Trainer); every .pt / .pth /
    .bin file is a whole zip archive (torch.save's format: a cut-short file has no central
    directory) whose members' CRCs match. Reads every file once.
    """
    state_file = path / "trainer_state.json"
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError) as exc:
        return f"{state_file.name}: {'missing' if isinstance(exc, FileNotFoundError) else 'not whole'}"
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        return f"{state_file.name}: not a trainer state (no global_step)"
    for file in sorted(path.rglob("*")):
        if file.is_file() and (problem := _file_problem(file)) is not None:
            return f"{file.relative_to(path)}: {problem}"
    return None


def _file_problem(file: Path) -> str | None:
    import zipfile

    suffix = file.suffix.lower()
    try:
        if suffix == ".json":
            json.loads(file.read_text())
        elif suffix == ".safetensors":
            return _safetensors_problem(file)
        elif suffix in (".pt", ".pth", ".bin"):
            with zipfile.ZipFile(file) as archive:
                bad = archive.testzip()
            if bad is not None:
                return f"member {bad} fails its CRC check"
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        return f"unreadable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    return None


def _safetensors_problem(file: Path) -> str | None:
    """The safetensors layout: an 8-byte little-endian header length, a JSON header whose tensors'
    data_offsets end where the file ends."""
    import struct

    size = file.stat().st_size
    with open(file, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            return "shorter than a safetensors header"
        (header_length,) = struct.unpack("<Q", prefix)
        if 8 + header_length > size:
            return f"cut short ({size} bytes, header alone needs {8 + header_length})"
        header = json.loads(f.read(header_length))
    ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    expected = 8 + header_length + max(ends, default=0)
    if expected != size:
        return f"cut short or padded ({size} bytes where its header needs {expected})"
    return None


def set_aside(incomplete: list[Path], log=print) -> None:
    """Rename checkpoints cut short to `incomplete-checkpoint-N-<time>`, so that nothing that
    takes the highest checkpoint-N (the Trainer, `cpuft sft --resume`) picks them up."""
    import os
    import time

    for path in incomplete:
        problem = checkpoint_problem(path) or "changed while read"
        aside = path.with_name(f"incomplete-{path.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(path, aside)
        log(f"{path} was cut short or is corrupt ({problem}); set aside as {aside.name}")
