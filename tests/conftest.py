"""Shared fixtures: an offline tiny model built once per session, and a CLI runner.

Everything runs offline (no hub): HF_HUB_OFFLINE is set before any Hugging Face import.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Small enough that a few optimizer steps take seconds on 2 cores; big enough to learn a little.
TEST_MODEL_SPEC = dict(vocab_size=1024, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=192)  # multiple of 32: see TinyModelSpec


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from cpuft.testing.tiny_model import TinyModelSpec, build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", spec=TinyModelSpec(**TEST_MODEL_SPEC))


# How closely two computations of the same function agree, by the compute dtype the plan picked:
# fp32 rounding, or bf16's 8-bit mantissa (one rounding step is 2**-8 = 0.4 % of a value) compounded
# over a model's layers. Tests that compare logits or losses of a trained run read it through
# `planned_tolerance`, so the same test holds where the plan picks bf16 (AMX, AVX-512-BF16) and fp32 (AVX2).
DTYPE_TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2, "fp16": 1e-2}


def fixed_rule_dtype() -> str:
    """The dtype the plan's fixed rule picks on this CPU (bf16 where it is native). Tests that
    compare two separate runs at fp32's tolerance pin it (`dtype`): on a native-bf16 CPU a small
    model's dtype is otherwise chosen by timing (cpuft.planning.dtype_choice), and a timing taken
    at a busy moment is not believed, so two runs of one job could train in different dtypes."""
    from cpuft.hardware.probe import probe_machine

    return "bf16" if probe_machine().native_bf16 else "fp32"


def planned_tolerance(run_dir: str | Path) -> tuple[str, float]:
    """(compute dtype, absolute tolerance) of the run in `run_dir`, from its plan.json."""
    dtype = json.loads((Path(run_dir) / "plan.json").read_text())["plan"]["compute_dtype"]
    return dtype, DTYPE_TOLERANCE[dtype]


def run_cpuft(*args: str, timeout: float = 600, cwd: str | Path | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
    """Run the real CLI in a fresh process (as a user would); returns the completed process."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", "cpuft", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd,
        input=stdin,
    )


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def cpuft_cli():
    return run_cpuft


# Chat rows of random words for the preemption and durability tests: long enough that a step of
# the test model costs enough for a test to act between two checkpoints.
CHAT_WORDS = "cpu core thread cache memory loss adapter rank alpha token batch step spot queue job resume checkpoint".split()


def random_chat_rows(seed: int, question_words: int, answer_words: int, count: int = 48) -> list[dict]:
    import random

    rng = random.Random(seed)
    return [{"messages": [
        {"role": "user", "content": f"Question {i}: " + " ".join(rng.choice(CHAT_WORDS) for _ in range(question_words)) + "?"},
        {"role": "assistant", "content": " ".join(rng.choice(CHAT_WORDS) for _ in range(answer_words))},
    ]} for i in range(count)]


# Question/answer rows with a learnable pattern, for the inference/merge/eval tests (issue 5).
_CAPITALS = [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"), ("Egypt", "Cairo"),
             ("Peru", "Lima"), ("Kenya", "Nairobi"), ("Chile", "Santiago"), ("Norway", "Oslo"), ("Cuba", "Havana")]


def qa_rows() -> list[dict]:
    rows = [{"prompt": f"What is the capital of {country}?", "completion": f"The capital of {country} is {city}."}
            for country, city in _CAPITALS]
    rows += [{"prompt": f"What is {a} plus {b}?", "completion": f"{a} plus {b} is {a + b}."}
             for a in range(2, 7) for b in range(3, 9)]
    return rows


@pytest.fixture(scope="session")
def qa_dataset(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "qa.jsonl", qa_rows())


@pytest.fixture(scope="session")
def qa_model_dir(tmp_path_factory) -> Path:
    """The test-size tiny model, its tokenizer trained on the Q/A rows (no bundled sample needed)."""
    from cpuft.testing.tiny_model import TinyModelSpec, build_tiny_model

    texts = [row["prompt"] + " " + row["completion"] for row in qa_rows()]
    return build_tiny_model(tmp_path_factory.mktemp("models") / "qa", texts=texts, spec=TinyModelSpec(**TEST_MODEL_SPEC))


@pytest.fixture(scope="session")
def qa_run_dir(qa_model_dir, qa_dataset, tmp_path_factory) -> Path:
    """One finished `cpuft sft` run (LoRA on the Q/A rows), shared by the merge and inference tests."""
    run_dir = tmp_path_factory.mktemp("runs") / "qa"
    result = run_cpuft(
        "sft", "--model", qa_model_dir, "--dataset", qa_dataset, "--max-steps", "12", "--learning-rate", "5e-3",
        "--eval-fraction", "0.1", "--per-device-batch-size", "8", "--gradient-accumulation-steps", "1",
        "--save-steps", "6", "--output-dir", run_dir, "--no-progress",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def start_serve(*args, env: dict | None = None, while_loading=None, timeout: float = 180) -> tuple[subprocess.Popen, str, list[str]]:
    """`cpuft serve ARGS --port 0` in a fresh process: (the process, its http://127.0.0.1:PORT URL
    as it announced it, its stderr lines so far). Its stderr is read all along, so the pipe never
    fills and blocks the server; `while_loading()` runs while the model loads."""
    command = [sys.executable, "-m", "cpuft", "serve", *map(str, args), "--port", "0", "--log-level", "warning"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})))
    log: list[str] = []
    url: list[str] = []
    listening = threading.Event()

    def drain() -> None:
        for line in process.stderr:
            log.append(line)
            if line.startswith("serving ") and " on http://" in line:
                url.append(line.split(" on ", 1)[1].split("/v1")[0])
                listening.set()

    threading.Thread(target=drain, daemon=True).start()
    if while_loading is not None:
        while_loading()
    deadline = time.monotonic() + timeout
    while not listening.wait(0.5):
        assert process.poll() is None and time.monotonic() < deadline, "server did not start:\n" + "".join(log)[-3000:]
    return process, url[0], log
