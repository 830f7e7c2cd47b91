"""The name of a Trainer checkpoint directory, `checkpoint-N`, the step N it holds, and which
checkpoints in a run directory are complete.

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
    """The newest checkpoint-N in `run_dir` whose trainer_state.json (the file the Trainer writes
    last) parses, and the newer ones a hard kill cut short (newest first). Reads only."""
    found = sorted(
        (step, path) for path in Path(run_dir).iterdir()
        if path.is_dir() and (step := checkpoint_step(path.name)) is not None
    )
    incomplete = []
    for _, path in reversed(found):
        try:
            json.loads((path / "trainer_state.json").read_text())
            return path, incomplete
        except (OSError, ValueError):
            incomplete.append(path)
    return None, incomplete


def set_aside(incomplete: list[Path], log=print) -> None:
    """Rename checkpoints cut short to `incomplete-checkpoint-N-<time>`, so that nothing that
    takes the highest checkpoint-N (the Trainer, `cpuft sft --resume`) picks them up."""
    import os
    import time

    for path in incomplete:
        aside = path.with_name(f"incomplete-{path.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(path, aside)
        log(f"{path} was cut short (no complete trainer_state.json); set aside as {aside.name}")
