"""Preemption for real: one batch job is stopped by SIGTERM, then its scheduler is killed with -9,
then it finishes; its adapter must equal an uninterrupted run of the same job.

Phase 1  SIGTERM to `cpuft batch run` mid-job: the runner forwards it, the trainer saves a
         checkpoint, the job is 'preempted' and the runner exits 75.
Phase 2  `cpuft batch run` again resumes from that checkpoint; once it has saved a newer
         checkpoint, the runner's whole process group (trainer included) gets SIGKILL. The row is
         left 'running', which `status` reports as stale.
Phase 3  `cpuft batch run` again sees the stale row, resumes from the newest checkpoint and
         finishes.

Tolerance: the adapter tensors must agree to 1e-6 (max abs difference). The Trainer restores the
optimizer, scheduler and RNG states from the checkpoint and skips the batches already seen, with
the same seeded data order, so on one machine with the same thread count the difference is 0.0.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import fixed_rule_dtype, random_chat_rows, run_cpuft, write_jsonl

MAX_STEPS = 24
SAVE_STEPS = 4
ADAPTER_TOLERANCE = 1e-6
JOB = {  # small, but each step costs enough that the test can act between checkpoints
    "max_steps": MAX_STEPS, "save_steps": SAVE_STEPS, "save_total_limit": 2, "per_device_batch_size": 2,
    "gradient_accumulation_steps": 1, "max_length": 256, "eval_fraction": 0.0, "logging_steps": 1,
    "dtype": fixed_rule_dtype(),  # the reference and the resumed run alike (see conftest)
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "chat.jsonl", random_chat_rows(seed=0, question_words=12, answer_words=60))


@pytest.fixture(scope="module")
def reference_adapter(tiny_model_dir, dataset, tmp_path_factory) -> Path:
    """The same job, run straight through with `cpuft sft`."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in JOB.items()]
    result = run_cpuft("sft", "--model", tiny_model_dir, "--dataset", dataset, "--output-dir", run_dir,
                       "--no-progress", *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir / "adapter"


def start_batch(queue: Path, log: Path) -> subprocess.Popen:
    """`cpuft batch run` in its own process group (the trainer it starts joins that group)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log, "a") as out:
        return subprocess.Popen([sys.executable, "-m", "cpuft", "batch", "run", str(queue)],
                                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def wait_for(predicate, what: str, process: subprocess.Popen, timeout: float = 300.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if process.poll() is not None:
            pytest.fail(f"the batch runner exited ({process.returncode}) before {what}")
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in record:
            steps.append(record["step"])
    return steps


def complete_checkpoints(run_dir: Path) -> list[int]:
    if not run_dir.is_dir():
        return []
    return sorted(int(p.name.split("-")[1]) for p in run_dir.glob("checkpoint-*") if (p / "trainer_state.json").is_file())


def job_status(queue: Path) -> dict:
    result = run_cpuft("batch", "status", queue, "--json")
    assert result.returncode == 0, result.stderr
    (job,) = json.loads(result.stdout)["jobs"]
    return job


def max_abs_difference(adapter_a: Path, adapter_b: Path) -> float:
    from safetensors.torch import load_file

    a = load_file(adapter_a / "adapter_model.safetensors")
    b = load_file(adapter_b / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.slow
def test_sigterm_then_kill_9_then_resume_matches_an_uninterrupted_run(tiny_model_dir, dataset, reference_adapter, tmp_path):
    queue = tmp_path / "queue.yaml"
    job_keys = "\n".join(f"    {key}: {value}" for key, value in JOB.items())
    queue.write_text(textwrap.dedent(f"""\
        jobs:
          - name: victim
            model: {tiny_model_dir}
            dataset: {dataset}
        """) + job_keys + "\n")
    run_dir = tmp_path / "runs" / "victim"
    log = tmp_path / "batch.log"

    # Phase 1: SIGTERM to the runner once training has logged a step.
    runner = start_batch(queue, log)
    wait_for(lambda: logged_steps(run_dir), "the first logged step", runner)
    runner.send_signal(signal.SIGTERM)
    assert runner.wait(timeout=300) == 75, log.read_text()[-3000:]
    preempted = job_status(queue)
    stopped_at = preempted["summary"]["steps"]
    assert preempted["state"] == "preempted" and preempted["attempts"] == 1
    assert 0 < stopped_at < MAX_STEPS
    assert stopped_at in complete_checkpoints(run_dir)  # the checkpoint written on the signal
    assert not (run_dir / "adapter").exists()

    # Phase 2: resume, then SIGKILL the whole process group once a newer checkpoint is on disk.
    runner = start_batch(queue, log)
    wait_for(lambda: [s for s in complete_checkpoints(run_dir) if s > stopped_at], "a newer checkpoint", runner)
    os.killpg(runner.pid, signal.SIGKILL)
    runner.wait(timeout=60)
    killed = job_status(queue)
    assert killed["state"] == "running" and killed["stale"], killed
    assert killed["resumed_from"].endswith(f"checkpoint-{stopped_at}")
    assert not (run_dir / "adapter").exists(), "the job finished before the kill; the test proves nothing"
    last_checkpoint = complete_checkpoints(run_dir)[-1]

    # Phase 3: the next start finds the stale row and resumes from the newest checkpoint.
    runner = start_batch(queue, log)
    assert runner.wait(timeout=600) == 0, log.read_text()[-3000:]
    done = job_status(queue)
    assert (done["state"], done["attempts"], done["failures"]) == ("done", 3, 0)
    assert done["resumed_from"].endswith(f"checkpoint-{last_checkpoint}")
    assert done["summary"]["steps"] == MAX_STEPS
    text = log.read_text()
    assert "was left running by a scheduler that died" in text
    assert f"resuming from checkpoint-{last_checkpoint}" in text

    # Every step is logged exactly once across the three attempts ...
    assert logged_steps(run_dir) == list(range(1, MAX_STEPS + 1))
    # ... and the adapter is the one an uninterrupted run produces.
    assert max_abs_difference(run_dir / "adapter", reference_adapter) <= ADAPTER_TOLERANCE
