"""Losing the machine for real: `cpuft sft --sync-to` with a local directory standing in for the
bucket, real processes, real signals, and the run directory deleted as a lost VM's disk would be.

The job accumulates gradients over 2 micro-batches, so a SIGTERM lands inside an optimizer step
and the trainer stops after the current micro-batch. lora_dropout is 0: a checkpoint written
mid-step holds the RNG state of the micro-batches already run, which a dropout mask would use (see
docs/durable-storage.md); without dropout the resumed run is the uninterrupted one, to 0.0 on one
machine with the same thread count (tolerance 1e-6, as tests/test_batch_preemption.py).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import fixed_rule_dtype, random_chat_rows, run_cpuft, write_jsonl
from tests.test_batch_preemption import max_abs_difference

MAX_STEPS = 10
JOB = {
    "max_steps": MAX_STEPS, "save_steps": 2, "save_total_limit": 2, "per_device_batch_size": 2,
    "gradient_accumulation_steps": 2, "max_length": 128, "eval_fraction": 0.0, "logging_steps": 1,
    "lora_dropout": 0.0,
    "dtype": fixed_rule_dtype(),  # the reference and the resumed run alike (see conftest)
}
ADAPTER_TOLERANCE = 1e-6
MANIFEST = "cpuft-manifest.json"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "chat.jsonl", random_chat_rows(seed=1, question_words=8, answer_words=30))


def job_flags() -> list[str]:
    return [f"--{key.replace('_', '-')}={value}" for key, value in JOB.items()]


@pytest.fixture(scope="module")
def reference_adapter(tiny_model_dir, dataset, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    result = run_cpuft("sft", "--model", tiny_model_dir, "--dataset", dataset, "--output-dir", run_dir,
                       "--no-progress", *job_flags())
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir / "adapter"


def start_sft(*args, log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log, "a") as out:
        return subprocess.Popen([sys.executable, "-m", "cpuft", "sft", "--no-progress", *map(str, args)],
                                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def stored_complete_checkpoints(store: Path) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in store.glob(f"checkpoint-*/{MANIFEST}"))


def wait_for(predicate, what: str, process: subprocess.Popen, log: Path, timeout: float = 400.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if process.poll() is not None:
            pytest.fail(f"cpuft sft exited ({process.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


@pytest.mark.slow
def test_sigterm_then_kill_9_and_lost_disk_resume_from_the_store(tiny_model_dir, dataset, reference_adapter, tmp_path):
    store, run_dir, log = tmp_path / "bucket" / "job", tmp_path / "vm" / "run", tmp_path / "sft.log"
    resume_args = ("--resume", "--output-dir", run_dir, "--sync-to", store)

    # A new VM's first attempt: --resume with nothing local and nothing stored starts fresh.
    process = start_sft(*resume_args, "--model", tiny_model_dir, "--dataset", dataset, *job_flags(), log=log)
    wait_for(lambda: stored_complete_checkpoints(store), "a checkpoint complete in the store", process, log)
    signalled = time.monotonic()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 75, log.read_text()[-3000:]
    seconds_to_durable = time.monotonic() - signalled
    text = log.read_text()
    assert "starting fresh" in text
    stopped_at = max(stored_complete_checkpoints(store))
    assert 0 < stopped_at < MAX_STEPS
    assert not (store / "adapter").exists()
    print(f"SIGTERM -> exit 75 with checkpoint-{stopped_at} complete in the store: {seconds_to_durable:.1f} s")
    assert seconds_to_durable < 60

    # The VM is gone: its disk with it. Only the URL is left; resume, then kill -9 after a newer
    # checkpoint is durable, and lose the disk again.
    shutil.rmtree(run_dir.parent)
    process = start_sft(*resume_args, log=log)
    wait_for(lambda: [s for s in stored_complete_checkpoints(store) if s > stopped_at], "a newer stored checkpoint",
             process, log)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    assert not (store / "adapter").exists(), "the run finished before the kill; the test proves nothing"
    shutil.rmtree(run_dir.parent)
    newest = max(stored_complete_checkpoints(store))

    # A third machine finishes it from the store alone.
    result = run_cpuft("sft", "--no-progress", *resume_args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"restored checkpoint-{newest} from {store}" in result.stdout
    assert (store / "adapter" / MANIFEST).is_file() and (store / "summary.json").is_file()
    assert len(stored_complete_checkpoints(store)) <= JOB["save_total_limit"]
    assert max_abs_difference(store / "adapter", reference_adapter) <= ADAPTER_TOLERANCE
    assert max_abs_difference(run_dir / "adapter", reference_adapter) <= ADAPTER_TOLERANCE


def test_store_that_cannot_be_written_is_refused_before_anything_is_written(tmp_path, tiny_model_dir, dataset):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the store's parent should be\n")
    run_dir = tmp_path / "run"
    result = run_cpuft("sft", "--model", tiny_model_dir, "--dataset", dataset, "--output-dir", run_dir,
                       "--sync-to", blocker / "store", "--no-progress", *job_flags())
    assert result.returncode == 2, result.stderr[-2000:]
    assert "cannot be written" in result.stderr and str(blocker / "store") in result.stderr
    assert not run_dir.exists()


@pytest.mark.slow
def test_store_unreachable_mid_run_training_goes_on_and_uploads_resume(tmp_path, tiny_model_dir, dataset):
    store, run_dir, log = tmp_path / "bucket", tmp_path / "run", tmp_path / "sft.log"
    parked = tmp_path / "bucket-away"
    process = start_sft("--model", tiny_model_dir, "--dataset", dataset, "--output-dir", run_dir,
                        "--sync-to", store, *job_flags(), log=log)
    wait_for(lambda: stored_complete_checkpoints(store), "the first stored checkpoint", process, log)
    # The bucket goes away (a file in its place: even root cannot write under it) ...
    store.rename(parked)
    store.write_text("outage\n")
    wait_for(lambda: "training goes on" in log.read_text(), "the upload warning", process, log)
    # ... and comes back while the run is still training.
    store.unlink()
    parked.rename(store)
    assert process.wait(timeout=400) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "work again" in text and "synced to" in text
    assert (store / "adapter" / MANIFEST).is_file()
    assert max(stored_complete_checkpoints(store)) == MAX_STEPS


def test_resume_skips_a_checkpoint_a_hard_kill_cut_short(tmp_path, capsys):
    # The Trainer writes trainer_state.json last: checkpoint-4 without it was cut short mid-save.
    from cpuft.run_dir import RunDir

    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text('{"global_step": 2}')
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-4" / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    (tmp_path / "checkpoint-3-notes").mkdir()  # not a checkpoint name: ignored
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3, 4)))

    assert RunDir(tmp_path).checkpoint_to_resume() == str(tmp_path / "checkpoint-2")
    assert not (tmp_path / "checkpoint-4").exists()
    assert [p.name.startswith("incomplete-checkpoint-4-") for p in tmp_path.glob("incomplete-*")] == [True]
    assert "checkpoint-4 was cut short" in capsys.readouterr().err
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
