"""The durable batch queue for real: `cpuft batch run --sync-to` with a local directory standing in
for the bucket, real processes, kill -9, and the VM's disk (state dir and run dirs) deleted.

The queue: two training jobs with the same config, each of which must end with the adapter of a
plain uninterrupted `cpuft sft` run (max |delta| <= 1e-6; the job's lora_dropout is 0 and it resumes
from checkpoints on one machine with the same thread count, where the difference is 0.0; see
tests/test_durable_runs.py). Every "VM" after the first starts with nothing but the queue file
and the URL.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from cpuft.storage import JobLease, LeaseKeeper
from tests.conftest import fixed_rule_dtype, random_chat_rows, run_cpuft, write_jsonl
from tests.test_batch_preemption import max_abs_difference
from tests.test_durable_runs import stored_complete_checkpoints, wait_for

MAX_STEPS = 10
JOB = {
    "max_steps": MAX_STEPS, "save_steps": 2, "save_total_limit": 2, "per_device_batch_size": 2,
    "gradient_accumulation_steps": 2, "max_length": 128, "eval_fraction": 0.0, "logging_steps": 1,
    "lora_dropout": 0.0,
    "dtype": fixed_rule_dtype(),  # the reference and the resumed run alike (see conftest)
}
ADAPTER_TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "chat.jsonl", random_chat_rows(seed=2, question_words=8, answer_words=30))


@pytest.fixture(scope="module")
def reference_adapter(tiny_model_dir, dataset, tmp_path_factory) -> Path:
    """The job, run straight through by a plain `cpuft sft`."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in JOB.items()]
    result = run_cpuft("sft", "--model", tiny_model_dir, "--dataset", dataset, "--output-dir", run_dir, "--no-progress", *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir / "adapter"


def write_queue(path: Path, jobs: list[dict], model: Path, dataset: Path, job: dict = JOB, **top) -> Path:
    defaults = {"model": str(model), "dataset": str(dataset), **job}
    path.write_text(yaml.safe_dump({**top, "defaults": defaults, "jobs": jobs}, sort_keys=False))
    return path


def start_batch(queue: Path, state_dir: Path, log: Path, *args: str, host: str | None = None) -> subprocess.Popen:
    """`cpuft batch run` in its own process group (its trainer joins it), as the VM's startup script runs it."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if host:
        env["CPUFT_HOST"] = host
    with open(log, "a") as out:
        out.write(f"\n===== cpuft batch run {' '.join(args)} (host {host or 'default'})\n")
        out.flush()
        return subprocess.Popen([sys.executable, "-m", "cpuft", "batch", "run", str(queue), "--state-dir", str(state_dir), *args],
                                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def stored_queue_state(bucket: Path) -> dict:
    return json.loads((bucket / "queue-state.json").read_text())["jobs"]


def since_last_start(log: Path) -> str:
    return log.read_text().rsplit("===== cpuft batch run", 1)[-1]


@pytest.mark.slow
def test_two_job_queue_killed_mid_job_twice_with_the_vm_lost_each_time(tiny_model_dir, dataset, reference_adapter, tmp_path):
    vm, bucket, log = tmp_path / "vm", tmp_path / "bucket", tmp_path / "batch.log"
    queue = write_queue(tmp_path / "queue.yaml", [{"name": "first"}, {"name": "second"}], tiny_model_dir, dataset,
                        runs_dir=str(vm / "runs"))
    sync = ("--sync-to", str(bucket))

    def kill_the_vm_mid(job: str, runner: subprocess.Popen) -> int:
        """kill -9 the runner and its trainer once `job` has a complete checkpoint in the store;
        then the VM's disk goes too. Returns the newest complete stored checkpoint's step."""
        store = bucket / "jobs" / job
        wait_for(lambda: stored_complete_checkpoints(store), f"a stored checkpoint of {job}", runner, log)
        os.killpg(runner.pid, signal.SIGKILL)
        runner.wait(timeout=60)
        assert not (store / "adapter").exists(), f"{job} finished before the kill; the test proves nothing"
        assert stored_queue_state(bucket)[job]["state"] == "running"
        shutil.rmtree(vm)
        return max(stored_complete_checkpoints(store))

    # VM 1: `first` is killed mid-run.
    first_at = kill_the_vm_mid("first", start_batch(queue, vm / "state", log, *sync))
    assert 0 < first_at < MAX_STEPS

    # VM 2, empty disk: `first` resumes from the store and finishes, `second` starts and is killed.
    second_at = kill_the_vm_mid("second", start_batch(queue, vm / "state", log, *sync))
    text = since_last_start(log)
    assert "took the state of 2 job(s)" in text
    assert f"job first: attempt 2, resuming from checkpoint-{first_at} in the store" in text
    assert stored_queue_state(bucket)["first"]["state"] == "done"

    # VM 3 finishes the queue; `first` stays done (its run directory went with VM 2's disk).
    runner = start_batch(queue, vm / "state", log, *sync)
    assert runner.wait(timeout=600) == 0, log.read_text()[-3000:]
    text = since_last_start(log)
    assert f"job second: attempt 2, resuming from checkpoint-{second_at} in the store" in text
    assert "job first: attempt" not in text and not (vm / "runs" / "first").exists()

    state = stored_queue_state(bucket)
    assert {name: (row["state"], row["attempts"], row["failures"]) for name, row in state.items()} == {
        "first": ("done", 2, 0), "second": ("done", 2, 0),
    }
    for name, stopped_at in (("first", first_at), ("second", second_at)):
        assert state[name]["resumed_from"] == str(bucket / "jobs" / name / f"checkpoint-{stopped_at}")
        assert state[name]["summary"]["steps"] == MAX_STEPS and state[name]["checkpoint_step"] == MAX_STEPS
        assert max_abs_difference(bucket / "jobs" / name / "adapter", reference_adapter) <= ADAPTER_TOLERANCE
    assert max_abs_difference(vm / "runs" / "second" / "adapter", reference_adapter) <= ADAPTER_TOLERANCE
    # Every lease was given back (the killed runners' leases were broken by their successors).
    for name in ("first", "second"):
        records = [json.loads(p.read_text()) for p in (bucket / "leases" / name).glob("*.json")]
        assert [r["state"] for r in records] == ["released"]


@pytest.mark.slow
def test_a_job_leased_by_another_live_host_is_left_to_it_and_taken_over_once_that_host_is_gone(
        tiny_model_dir, dataset, tmp_path):
    bucket, log = tmp_path / "bucket", tmp_path / "batch.log"
    short_job = dict(JOB, max_steps=2)
    queue = write_queue(tmp_path / "queue.yaml", [{"name": "held"}], tiny_model_dir, dataset,
                        job=short_job, sync_to="bucket")  # relative to the queue file
    other_vm = JobLease(str(bucket), "held", owner="vm-a:scheduler", host="vm-a", ttl_seconds=4.0)
    assert other_vm.acquire()

    # vm-b skips `held`, watches its lease, sees vm-a renew it and leaves the job to it (exit 73).
    with LeaseKeeper(other_vm, on_lost=lambda reason: None, renew_every=0.3):
        runner = start_batch(queue, tmp_path / "vm-b" / "state", log, host="vm-b")
        assert runner.wait(timeout=300) == 73, log.read_text()[-3000:]
    text = since_last_start(log)
    assert "job held: leased to vm-a" in text and "vm-a renewed its lease" in text
    assert "left to schedulers on other machines: held" in text
    assert stored_queue_state(bucket)["held"]["state"] == "queued"
    assert not (bucket / "jobs" / "held").exists() and not (tmp_path / "runs" / "held").exists()

    # vm-a is gone (it stopped renewing and its lease expires): vm-b takes the job over.
    runner = start_batch(queue, tmp_path / "vm-b" / "state", log, host="vm-b")
    assert runner.wait(timeout=300) == 0, log.read_text()[-3000:]
    assert "job held: attempt 1, from scratch" in since_last_start(log)
    state = stored_queue_state(bucket)
    assert (state["held"]["state"], state["held"]["host"]) == ("done", "vm-b")
    assert (bucket / "jobs" / "held" / "adapter" / "cpuft-manifest.json").is_file()


def test_a_store_that_cannot_be_written_or_a_job_with_its_own_store_is_refused_before_anything_runs(
        tiny_model_dir, dataset, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("a file where the bucket's parent should be\n")
    queue = write_queue(tmp_path / "queue.yaml", [{"name": "one"}], tiny_model_dir, dataset)
    result = run_cpuft("batch", "run", queue, "--sync-to", blocker / "bucket")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "cannot be written" in result.stderr and str(blocker / "bucket") in result.stderr
    assert not (tmp_path / "queue.batch").exists() and not (tmp_path / "runs").exists()

    clash = tmp_path / "clash.yaml"
    clash.write_text(textwrap.dedent(f"""\
        sync_to: {tmp_path / 'bucket'}
        jobs:
          - name: one
            model: {tiny_model_dir}
            dataset: {dataset}
            sync_to: {tmp_path / 'elsewhere'}
        """))
    result = run_cpuft("batch", "run", clash)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"{clash}:3: job 'one': field 'sync_to'" in result.stderr and "jobs/one" in result.stderr
    assert not (tmp_path / "bucket").exists() and not (tmp_path / "clash.batch").exists()


def test_a_new_machine_takes_the_stored_rows_done_stays_done_failure_counts_stay_and_running_resumes(tmp_path):
    """The snapshot a dead VM left (hand-written here) seeds an empty state store; a newer local row wins."""
    from cpuft.batch.durable import parse_snapshot
    from cpuft.batch.state import StateStore

    def row(state, attempts, failures, updated_at, retryable=True):
        return {"position": 0, "state": state, "attempts": attempts, "failures": failures, "retryable": retryable,
                "run_dir": "/old-vm/runs/x", "config_sha": "sha-1", "host": "old-vm", "summary": {"steps": 7},
                "updated_at": updated_at, "checkpoint_step": 6}

    snapshot = {"format": 1, "jobs": {"finished": row("done", 1, 0, 100.0), "given-up": row("failed", 3, 3, 100.0),
                                      "bad-input": row("failed", 1, 1, 100.0, retryable=False),
                                      "interrupted": row("running", 2, 1, 100.0), "newer-here": row("done", 1, 0, 100.0)}}
    records, steps = parse_snapshot(json.dumps(snapshot).encode())
    store = StateStore(tmp_path / "state.sqlite")
    store.sync([("newer-here", "/new-vm/runs/newer-here", "sha-1")])  # a row of ours written after the snapshot
    adopted = store.adopt(records, {name: f"/new-vm/runs/{name}" for name in snapshot["jobs"]})
    store.sync([(name, f"/new-vm/runs/{name}", "sha-1") for name in snapshot["jobs"]])

    assert sorted(adopted) == ["bad-input", "finished", "given-up", "interrupted"]
    rows = {r.name: r for r in store.all()}
    assert {n: (r.state, r.attempts, r.failures) for n, r in rows.items()} == {
        "finished": ("done", 1, 0), "given-up": ("failed", 3, 3), "bad-input": ("failed", 1, 1),
        "interrupted": ("preempted", 2, 1), "newer-here": ("queued", 0, 0),
    }
    assert [n for n, r in rows.items() if r.runnable(max_failures=3)] == ["interrupted", "newer-here"]
    assert rows["interrupted"].run_dir == "/new-vm/runs/interrupted" and "old-vm" in rows["interrupted"].last_error
    assert rows["finished"].summary == {"steps": 7} and steps["interrupted"] == 6
    store.close()
    with pytest.raises(ValueError, match="state 'lost'"):
        parse_snapshot(json.dumps({"format": 1, "jobs": {"x": row("lost", 1, 0, 1.0)}}).encode())
