"""Shared fixtures: an offline tiny model built once per session, and a CLI runner.

Everything runs offline (no hub): HF_HUB_OFFLINE is set before any Hugging Face import.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Small enough that a few optimizer steps take seconds on 2 cores; big enough to learn a little.
TEST_MODEL_SPEC = dict(vocab_size=1024, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=172)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from cpuft.tiny_model import TinyModelSpec, build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", spec=TinyModelSpec(**TEST_MODEL_SPEC))


def run_cpuft(*args: str, timeout: float = 600, cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    """Run the real CLI in a fresh process (as a user would); returns the completed process."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", "cpuft", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd,
    )


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def cpuft_cli():
    return run_cpuft
