"""The name of a Trainer checkpoint directory, `checkpoint-N`, and the step N it holds.

One definition for the batch runner (local run directories) and the run store (its copy in a
bucket). It lives outside cpuft.storage so that reading it does not import fsspec, and does not
import transformers (where the prefix comes from: `trainer_utils.PREFIX_CHECKPOINT_DIR`) either.
"""

from __future__ import annotations

import re

CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_step(name: str) -> int | None:
    """N for a directory named `checkpoint-N`, None for any other name."""
    match = CHECKPOINT_NAME.match(name)
    return int(match.group(1)) if match else None
