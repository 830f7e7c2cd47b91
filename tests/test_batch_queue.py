"""`cpuft batch`: the queue file, the state store, the lock, failure handling and the timer units.

The end-to-end test runs real `cpuft sft` children on the tiny model; the rest runs no training.
Preemption (SIGTERM, kill -9, resume) is in test_batch_preemption.py.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

from cpuft.batch.lock import QueueLock
from cpuft.batch.queue import load_queue
from cpuft.batch.state import StateConflict, StateStore
from cpuft.errors import UserError
from tests.conftest import run_cpuft, write_jsonl

QA_ROWS = [{"prompt": f"What is {a} times {b}?", "completion": f"{a} times {b} is {a * b}."}
           for a in range(2, 8) for b in range(2, 6)]


@pytest.fixture
def queue_dir(tmp_path, tiny_model_dir) -> Path:
    """A directory with a dataset and a symlink to the tiny model, so queues can use relative paths."""
    write_jsonl(tmp_path / "qa.jsonl", QA_ROWS)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny").symlink_to(tiny_model_dir)
    return tmp_path


def write_queue(directory: Path, text: str, name: str = "queue.yaml") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text))
    return path


def status_json(queue: Path) -> dict:
    result = run_cpuft("batch", "status", queue, "--json")
    assert result.returncode == 0, result.stderr
    return {job["name"]: job for job in json.loads(result.stdout)["jobs"]}


# ----------------------------------------------------------------------------- the queue file


def test_defaults_merge_under_jobs_and_paths_are_relative_to_the_queue(queue_dir, tmp_path_factory, monkeypatch):
    queue_path = write_queue(queue_dir, """\
        defaults:
          model: models/tiny
          dataset: qa.jsonl
          max_steps: 7
          lora_r: 4
        jobs:
          - name: small
          - name: wide
            lora_r: 32
            output_dir: elsewhere/wide-run
        """)
    monkeypatch.chdir(tmp_path_factory.mktemp("somewhere-else"))  # as under a timer: cwd is unrelated
    queue = load_queue(queue_path)

    small, wide = queue.jobs
    assert (small.config.lora_r, wide.config.lora_r) == (4, 32)
    assert small.config.max_steps == wide.config.max_steps == 7
    assert small.config.dataset == str(queue_dir / "qa.jsonl")
    assert small.config.model == str(queue_dir / "models" / "tiny")
    assert small.run_dir == queue_dir / "runs" / "small"
    assert wide.run_dir == queue_dir / "elsewhere" / "wide-run"
    assert small.config_sha != wide.config_sha
    assert queue.max_failures == 3


def test_bad_queue_is_refused_whole_with_job_field_and_line(queue_dir):
    queue_path = write_queue(queue_dir, """\
        defaults:
          model: models/tiny
          dataset: qa.jsonl
        jobs:
          - name: fine
          - name: typo
            lora_rr: 8
          - name: fine
            lora_r: 4
          - name: nodata
            dataset: data/missing.jsonl
          - name: nomodel
            model: ./models/absent
          - name: badtype
            max_steps: lots
        """)
    result = run_cpuft("batch", "run", queue_path)

    assert result.returncode == 2, result.stdout + result.stderr
    message = result.stderr
    assert "Traceback" not in message
    assert "5 problems; nothing was run" in message
    assert f"{queue_path}:7: job 'typo': unknown config key 'lora_rr'. Did you mean 'lora_r'?" in message
    assert f"{queue_path}:8: job 'fine': duplicate name (first defined on line 5)" in message
    assert f"{queue_path}:11: job 'nodata': field 'dataset': dataset file data/missing.jsonl" in message
    assert f"{queue_path}:13: job 'nomodel': field 'model': model directory ./models/absent" in message
    assert f"{queue_path}:15: job 'badtype': 'max_steps' must be an integer" in message
    # refused before anything ran: no state, no run directories
    assert not (queue_dir / "queue.batch").exists()
    assert not (queue_dir / "runs").exists()


def test_bad_rows_in_a_later_jobs_dataset_stop_the_queue_before_it_starts(queue_dir):
    write_jsonl(queue_dir / "broken.jsonl", QA_ROWS[:3] + [{"prompt": "no completion here"}])
    queue_path = write_queue(queue_dir, """\
        - name: first
          model: models/tiny
          dataset: qa.jsonl
        - name: second
          model: models/tiny
          dataset: broken.jsonl
        """)
    with pytest.raises(UserError) as caught:
        load_queue(queue_path)
    assert "job 'second': field 'dataset'" in str(caught.value)
    assert "broken.jsonl:4" in str(caught.value)


def test_an_empty_queue_is_valid_and_runs_nothing(queue_dir):
    queue_path = write_queue(queue_dir, "jobs: []\n")
    result = run_cpuft("batch", "run", queue_path)
    assert result.returncode == 0, result.stderr
    assert status_json(queue_path) == {}


# ----------------------------------------------------------------------------- state and lock


def _try_start(database: str, barrier, results) -> None:
    store = StateStore(database)
    barrier.wait()
    try:
        store.start("job", os.getpid(), "host", "sha", None)
        results.put("started")
    except StateConflict:
        results.put("conflict")
    finally:
        store.close()


def test_only_one_of_many_racing_schedulers_can_start_a_job(tmp_path):
    database = tmp_path / "state.sqlite"
    store = StateStore(database)
    store.sync([("job", str(tmp_path / "runs" / "job"), "sha")])
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(6), context.Queue()
    workers = [context.Process(target=_try_start, args=(str(database), barrier, results)) for _ in range(6)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    outcomes = sorted(results.get(timeout=5) for _ in workers)

    assert outcomes == ["conflict"] * 5 + ["started"]
    record = store.get("job")
    assert (record.state, record.attempts) == ("running", 1)


def test_transitions_are_checked_and_a_fixed_failed_job_is_requeued(tmp_path):
    store = StateStore(tmp_path / "state.sqlite")
    store.sync([("a", "/runs/a", "sha1")])
    with pytest.raises(StateConflict):
        store.finish("a", "done", 0)  # never started
    store.start("a", 1, "host", "sha1", None)
    with pytest.raises(StateConflict):
        store.start("a", 2, "host", "sha1", None)  # already running: no double run
    failed = store.finish("a", "failed", 2, error="bad input", retryable=False)
    assert (failed.state, failed.failures, failed.retryable) == ("failed", 1, False)
    assert not failed.runnable(max_failures=3)

    assert store.sync([("a", "/runs/a", "sha1")]) == []  # unchanged config: stays failed
    assert store.sync([("a", "/runs/a", "sha2")]) == ["a"]  # edited in the queue: requeued
    requeued = store.get("a")
    assert (requeued.state, requeued.failures, requeued.attempts) == ("queued", 0, 1)


def test_a_second_scheduler_is_locked_out(queue_dir):
    queue_path = write_queue(queue_dir, """\
        - name: only
          model: models/tiny
          dataset: qa.jsonl
        """)
    with QueueLock(queue_dir / "queue.batch" / "lock"):
        result = run_cpuft("batch", "run", queue_path)
        status = run_cpuft("batch", "status", queue_path)
    assert result.returncode == 73, result.stdout + result.stderr
    assert f"pid {os.getpid()}" in result.stderr
    assert not (queue_dir / "queue.batch" / "state.sqlite").exists()
    assert f"scheduler running (pid {os.getpid()}" in status.stdout


# ----------------------------------------------------------------------------- real runs


@pytest.mark.slow
def test_failures_stay_isolated_are_retried_and_the_drained_queue_shuts_down(queue_dir):
    queue_path = write_queue(queue_dir, """\
        defaults:
          model: models/tiny
          dataset: qa.jsonl
          max_steps: 4
          save_steps: 2
          per_device_batch_size: 4
          gradient_accumulation_steps: 1
          eval_fraction: 0.0
        max_failures: 2
        jobs:
          - name: wants-gpu          # bad input at run time (no GPU here): exit 2, not retried
            device: cuda
          - name: blocked-output     # bad input too: 'blocker' is a plain file, so the run directory
            output_dir: blocker/run  # cannot be made; found before anything is loaded: exit 2
          - name: diverges           # the run fails (exit 1: its weights turn NaN): retried up to max_failures
            learning_rate: 1.0e+30
            lr_scheduler_type: constant
            warmup_steps: 0
          - name: good
        """)
    (queue_dir / "blocker").write_text("a file, not a directory\n")
    drained = queue_dir / "DRAINED"
    result = run_cpuft("batch", "run", queue_path, "--shutdown-when-done", "--shutdown-command", f"touch {drained}")

    assert result.returncode == 1, result.stdout + result.stderr  # some job failed for good
    jobs = status_json(queue_path)
    good, gpu, blocked, diverges = jobs["good"], jobs["wants-gpu"], jobs["blocked-output"], jobs["diverges"]
    assert (good["state"], good["attempts"], good["summary"]["steps"]) == ("done", 1, 4)
    assert (queue_dir / "runs" / "good" / "adapter" / "adapter_model.safetensors").is_file()
    assert (gpu["state"], gpu["attempts"], gpu["exit_code"], gpu["retryable"]) == ("failed", 1, 2, False)
    assert "CUDA" in gpu["last_error"]
    assert (blocked["state"], blocked["attempts"], blocked["exit_code"], blocked["retryable"]) == ("failed", 1, 2, False)
    assert "blocker is a file" in blocked["last_error"]
    assert (diverges["state"], diverges["attempts"], diverges["failures"], diverges["exit_code"]) == ("failed", 2, 2, 1)
    assert "NaN" in diverges["last_error"]
    assert drained.exists()  # nothing left to run -> the shutdown command ran

    # Running again starts nothing: done is done, and both failures are final.
    drained.unlink()
    again = run_cpuft("batch", "run", queue_path, "--shutdown-when-done", "--shutdown-command", f"touch {drained}")
    assert again.returncode == 1
    assert "attempt" not in again.stdout
    assert {name: (job["state"], job["attempts"]) for name, job in status_json(queue_path).items()} == {
        "wants-gpu": ("failed", 1), "blocked-output": ("failed", 1), "diverges": ("failed", 2), "good": ("done", 1)}
    assert drained.exists()
    table = run_cpuft("batch", "status", queue_path).stdout
    assert "good" in table and "4/4" in table and "4 job(s): 3 failed, 1 done; no scheduler running." in table


# ----------------------------------------------------------------------------- scheduling


def test_install_timer_writes_a_systemd_service_and_timer(queue_dir, tmp_path):
    queue_path = write_queue(queue_dir, """\
        - name: only
          model: models/tiny
          dataset: qa.jsonl
        """)
    unit_dir = tmp_path / "units"
    result = run_cpuft("batch", "install-timer", queue_path, "--unit-dir", unit_dir, "--every", "10min",
                       "--shutdown-when-done", "--shutdown-command", "touch /tmp/x y")
    assert result.returncode == 0, result.stderr
    service_path, timer_path = sorted(unit_dir.glob("cpuft-batch-queue-*.service")), sorted(unit_dir.glob("*.timer"))
    assert len(service_path) == len(timer_path) == 1
    service, timer = service_path[0].read_text(), timer_path[0].read_text()
    assert f"-m cpuft batch run {queue_path} --shutdown-when-done --shutdown-command \"touch /tmp/x y\"" in service
    assert "KillMode=mixed" in service and "SuccessExitStatus=73 75" in service
    assert "OnBootSec=" in timer and "OnUnitInactiveSec=10min" in timer
    assert f"Unit={service_path[0].name}" in timer
    assert "to enable it: systemctl" in result.stdout
    if shutil.which("systemd-analyze"):
        check = subprocess.run(["systemd-analyze", "verify", str(service_path[0]), str(timer_path[0])],
                               capture_output=True, text=True)
        assert "Unknown key" not in check.stderr and "Invalid" not in check.stderr, check.stderr


def test_cron_fallback_runs_at_boot_and_on_the_interval(queue_dir):
    queue_path = write_queue(queue_dir, """\
        - name: only
          model: models/tiny
          dataset: qa.jsonl
        """)
    result = run_cpuft("batch", "install-timer", queue_path, "--cron", "--dry-run", "--every", "30min")
    assert result.returncode == 0, result.stderr
    reboot, every = result.stdout.strip().splitlines()
    assert reboot.startswith("@reboot cd ") and every.startswith("*/30 * * * * cd ")
    for line in (reboot, every):
        assert f"-m cpuft batch run {queue_path}" in line and f"# cpuft-batch:{queue_path}" in line
    assert not (queue_dir / "queue.batch").exists()  # a dry run changes nothing


def test_install_timer_refuses_a_bad_queue(queue_dir, tmp_path):
    queue_path = write_queue(queue_dir, "- name: x\n  dataset: nope.jsonl\n")
    result = run_cpuft("batch", "install-timer", queue_path, "--unit-dir", tmp_path / "units")
    assert result.returncode == 2
    assert "job 'x': field 'dataset'" in result.stderr
    assert not (tmp_path / "units").exists()
