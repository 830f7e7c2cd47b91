"""Durable run storage on a local directory standing in for the bucket: real files, threads, processes.

Failure injection that works as root too (root ignores chmod): the store directory is moved
aside and a regular file put in its place, so every write below it fails with NotADirectoryError
until the directory is moved back.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import random
import shutil
import time
from pathlib import Path

import pytest

from cpuft.errors import UserError
from cpuft.storage import BackgroundUploader, JobLease, LeaseKeeper, LeaseLost, RunStore
from cpuft.storage.manifest import MANIFEST_NAME


def make_checkpoint(run_dir: Path, step: int) -> Path:
    """A small stand-in for a Trainer checkpoint-N/: binary files of known random bytes."""
    rng = random.Random(step)
    checkpoint = run_dir / f"checkpoint-{step}"
    checkpoint.mkdir(parents=True)
    (checkpoint / "adapter_model.safetensors").write_bytes(rng.randbytes(3000 + step))
    (checkpoint / "optimizer.pt").write_bytes(rng.randbytes(6000 + step))
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (checkpoint / "nested").mkdir()
    (checkpoint / "nested" / "rng_state.pth").write_bytes(rng.randbytes(500))
    return checkpoint


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@contextlib.contextmanager
def store_unreachable(store_dir: Path):
    """Replace the store directory by a regular file (fails writes for root too), then put it back."""
    aside = store_dir.with_name(store_dir.name + ".aside")
    os.replace(store_dir, aside)
    store_dir.write_text("not a directory")
    try:
        yield aside
    finally:
        store_dir.unlink()
        os.replace(aside, store_dir)


def fast_uploader(store: RunStore, warnings: list[str], keep: int = 2) -> BackgroundUploader:
    return BackgroundUploader(store, keep_checkpoints=keep, first_retry_seconds=0.05, max_retry_seconds=0.2, warn=warnings.append)


# ---------------------------------------------------------------------------- round trip


def test_upload_and_restore_round_trip_gives_the_same_bytes(tmp_path):
    from transformers.trainer_utils import get_last_checkpoint

    run = tmp_path / "vm1" / "run"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("model: tiny\nlora_r: 8\n")
    (run / "plan.json").write_text('{"plan": {"device": "cpu"}}\n')
    (run / "metrics.jsonl").write_text('{"step": 2, "loss": 3.1}\n{"step": 4, "loss": 2.7}\n')
    make_checkpoint(run, 2)
    make_checkpoint(run, 4)
    adapter = run / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(random.Random(9).randbytes(4096))
    (adapter / "adapter_config.json").write_text('{"r": 8}')

    store_dir = tmp_path / "bucket" / "runs" / "job1"
    warnings: list[str] = []
    uploader = fast_uploader(RunStore(f"file://{store_dir}"), warnings)
    for name in ("config.yaml", "plan.json", "metrics.jsonl"):
        uploader.upload_file(run / name)
    uploader.upload_checkpoint(run / "checkpoint-2")
    assert uploader.flush(30)
    uploader.upload_checkpoint(run / "checkpoint-4")
    uploader.upload_directory(adapter)
    assert uploader.close(30)
    assert warnings == []
    assert (store_dir / "checkpoint-4" / MANIFEST_NAME).is_file()

    # A new VM: its run directory does not exist yet.
    restored = tmp_path / "vm2" / "run"
    report = RunStore(str(store_dir)).restore(restored, warn=warnings.append)
    assert report.checkpoint == "checkpoint-4"
    assert report.adapter is True
    assert sorted(report.files) == ["config.yaml", "metrics.jsonl", "plan.json"]
    assert get_last_checkpoint(str(restored)) == str(restored / "checkpoint-4")
    assert files_of(restored / "checkpoint-4") == files_of(run / "checkpoint-4")
    assert files_of(restored / "adapter") == files_of(adapter)
    for name in ("config.yaml", "plan.json", "metrics.jsonl"):
        assert (restored / name).read_bytes() == (run / name).read_bytes()
    # Only the newest complete checkpoint comes back, and nothing temporary is left behind.
    assert sorted(p.name for p in restored.iterdir()) == [
        "adapter", "checkpoint-4", "config.yaml", "metrics.jsonl", "plan.json",
    ]
    assert warnings == []


def test_a_cut_off_checkpoint_is_skipped_with_a_warning_and_the_previous_one_restored(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: tiny\n")
    store_dir = tmp_path / "store"
    store = RunStore(str(store_dir))
    store.put_file(run / "config.yaml", "config.yaml")
    for step in (2, 3, 4, 5, 6):
        make_checkpoint(run, step)
    store.put_directory(run / "checkpoint-2", "checkpoint-2")
    # checkpoint-3: files there, manifest never written (the upload was cut off before its end).
    shutil.copytree(run / "checkpoint-3", store_dir / "checkpoint-3")
    # checkpoint-4: a listed file missing; checkpoint-5: one cut short; checkpoint-6: right size, wrong bytes.
    for step in (4, 5, 6):
        store.put_directory(run / f"checkpoint-{step}", f"checkpoint-{step}")
    (store_dir / "checkpoint-4" / "optimizer.pt").unlink()
    with open(store_dir / "checkpoint-5" / "optimizer.pt", "r+b") as f:
        f.truncate(100)
    damaged = store_dir / "checkpoint-6" / "adapter_model.safetensors"
    data = bytearray(damaged.read_bytes())
    data[10] ^= 0xFF
    damaged.write_bytes(bytes(data))

    stored = {c.name: c.problem for c in store.checkpoints()}
    assert stored["checkpoint-2"] is None and stored["checkpoint-6"] is None  # sizes alone look fine
    assert stored["checkpoint-3"] == "no manifest (its upload was cut off)"
    assert stored["checkpoint-4"] == "optimizer.pt is missing"
    assert stored["checkpoint-5"] == "optimizer.pt has 100 of 6005 bytes"

    restored = tmp_path / "restored"
    warnings: list[str] = []
    report = store.restore(restored, warn=warnings.append)
    assert report.checkpoint == "checkpoint-2"
    assert [c.name for c in report.skipped] == ["checkpoint-6", "checkpoint-5", "checkpoint-4", "checkpoint-3"]
    assert len(warnings) == 4
    assert "checkpoint-6" in warnings[0] and "sha256" in warnings[0]
    assert "checkpoint-3" in warnings[3] and "no manifest" in warnings[3]
    assert files_of(restored / "checkpoint-2") == files_of(run / "checkpoint-2")
    assert sorted(p.name for p in restored.iterdir()) == ["checkpoint-2", "config.yaml"]


def test_restore_refuses_a_run_directory_in_use_and_a_store_without_a_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: tiny\n")
    store = RunStore(str(tmp_path / "store"))
    store.put_file(run / "config.yaml", "config.yaml")
    with pytest.raises(UserError, match="already holds a run"):
        store.restore(run)
    with pytest.raises(UserError, match="holds no cpuft run"):
        RunStore(str(tmp_path / "empty-store")).restore(tmp_path / "new")
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------------------- the store failing


def test_uploads_warn_once_while_the_store_is_unreachable_and_complete_when_it_returns(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    metrics = run / "metrics.jsonl"
    metrics.write_text('{"step": 1}\n')
    store_dir = tmp_path / "store"
    store = RunStore(str(store_dir))
    warnings: list[str] = []
    uploader = fast_uploader(store, warnings, keep=1)
    uploader.upload_checkpoint(make_checkpoint(run, 1))
    assert uploader.flush(30)

    with store_unreachable(store_dir) as aside:
        started = time.perf_counter()
        uploader.upload_checkpoint(make_checkpoint(run, 2))
        time.sleep(0.6)
        uploader.upload_checkpoint(make_checkpoint(run, 3))  # takes checkpoint-2's place
        uploader.upload_file(metrics)
        enqueue_seconds = time.perf_counter() - started - 0.6
        metrics.write_text('{"step": 1}\n{"step": 3}\n')  # newer content before the store returns
        time.sleep(0.6)
        assert uploader.flush(0.3) is False  # times out, raises nothing
        assert uploader.failed_attempts >= 4
        assert len(warnings) == 1, warnings
        assert "checkpoint-2" in warnings[0] and "NotADirectoryError" in warnings[0]
        assert "retries with backoff" in warnings[0]
        assert uploader.pending == ["checkpoint-3", "metrics.jsonl"]
        # Retention never deletes the last complete checkpoint while no newer one is stored.
        assert (aside / "checkpoint-1" / MANIFEST_NAME).is_file()
    assert enqueue_seconds < 0.1  # training never waited on the outage

    assert uploader.close(30)
    assert len(warnings) == 2 and "work again" in warnings[1]
    assert [(c.name, c.complete) for c in store.checkpoints()] == [("checkpoint-3", True)]
    assert not (store_dir / "checkpoint-2").exists()  # superseded while waiting, never uploaded
    assert (store_dir / "metrics.jsonl").read_text() == '{"step": 1}\n{"step": 3}\n'
    assert uploader.uploaded == ["checkpoint-1", "checkpoint-3", "metrics.jsonl"]


def test_a_checkpoint_deleted_locally_before_its_upload_is_dropped(tmp_path):
    run = tmp_path / "run"
    store_dir = tmp_path / "store"
    store_dir.mkdir()
    warnings: list[str] = []
    uploader = fast_uploader(RunStore(str(store_dir)), warnings)
    with store_unreachable(store_dir):
        uploader.upload_checkpoint(make_checkpoint(run, 5))
        time.sleep(0.3)
        shutil.rmtree(run / "checkpoint-5")  # the Trainer's save_total_limit rotated it away
    assert uploader.close(30)
    assert any("checkpoint-5 was deleted before its upload finished" in w for w in warnings)
    assert not (store_dir / "checkpoint-5").exists()


def test_retention_keeps_the_newest_complete_checkpoints(tmp_path):
    run = tmp_path / "run"
    store_dir = tmp_path / "store"
    store = RunStore(str(store_dir))
    shutil.copytree(make_checkpoint(run, 0), store_dir / "checkpoint-0")  # an old cut-off upload
    shutil.copytree(make_checkpoint(run, 9), store_dir / "checkpoint-9")  # a newer one in progress
    uploader = fast_uploader(store, warnings := [], keep=2)
    for step in (1, 2, 3, 4):
        uploader.upload_checkpoint(make_checkpoint(run, step))
        assert uploader.flush(30)
    assert uploader.close(30) and warnings == []
    assert [(c.name, c.complete) for c in store.checkpoints()] == [
        ("checkpoint-9", False), ("checkpoint-4", True), ("checkpoint-3", True),
    ]


def test_check_writable_accepts_a_directory_and_refuses_what_cannot_be_written(tmp_path):
    good = tmp_path / "bucket"
    RunStore(f"file://{good}/run").check_writable()
    assert list((good / "run").iterdir()) == []  # the probe is gone

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(UserError, match=r"cannot be written \((NotADirectoryError|FileExistsError)") as err:
        RunStore(str(blocker / "run")).check_writable()
    assert str(blocker / "run") in str(err.value)

    with pytest.raises(UserError, match="Protocol not known: nosuchproto"):
        RunStore("nosuchproto://bucket/run")


def test_a_gs_url_without_gcsfs_says_what_to_install():
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("gcsfs is installed here")
    with pytest.raises(UserError, match=r"cpuft\[gcs\]"):
        RunStore("gs://some-bucket/run")


# ---------------------------------------------------------------------------- leases


def _race_for_leases(url: str, rounds: int, barrier, results) -> None:
    """Child process: race the others for fresh leases, then for expired ones."""
    for i in range(rounds):
        for kind in ("fresh", "expired"):
            lease = JobLease(url, f"{kind}-{i}", ttl_seconds=60)
            barrier.wait()
            results.put((kind, i, lease.owner, lease.acquire()))


def test_processes_racing_for_a_lease_exactly_one_wins_also_when_taking_over_an_expired_one(tmp_path):
    url = str(tmp_path / "store")
    rounds, processes = 15, 4
    for i in range(rounds):
        assert JobLease(url, f"expired-{i}", owner="dead-scheduler", ttl_seconds=0.01).acquire()
    time.sleep(0.05)

    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(processes)
    results = context.Queue()
    children = [context.Process(target=_race_for_leases, args=(url, rounds, barrier, results)) for _ in range(processes)]
    for child in children:
        child.start()
    outcomes = [results.get(timeout=120) for _ in range(rounds * 2 * processes)]
    for child in children:
        child.join(30)
        assert child.exitcode == 0

    for i in range(rounds):
        for kind in ("fresh", "expired"):
            winners = [owner for k, j, owner, won in outcomes if (k, j) == (kind, i) and won]
            assert len(winners) == 1, (kind, i, winners)
            assert JobLease(url, f"{kind}-{i}").current().owner == winners[0]


def test_renewal_keeps_the_lease_and_expiry_hands_it_over(tmp_path):
    url = str(tmp_path / "store")
    holder = JobLease(url, "job-a", owner="vm1", ttl_seconds=2.0)
    other = JobLease(url, "job-a", owner="vm2", ttl_seconds=2.0)
    assert holder.acquire()
    lost: list[str] = []
    with LeaseKeeper(holder, on_lost=lost.append, renew_every=0.2):
        deadline = time.monotonic() + 3.0  # longer than the TTL: only renewal keeps it
        while time.monotonic() < deadline:
            assert not other.acquire()
            time.sleep(0.1)
    assert lost == []
    time.sleep(2.1)
    assert other.acquire()
    with pytest.raises(LeaseLost, match="vm2"):
        holder.renew()
    assert other.current().owner == "vm2"


def test_a_stale_holder_cannot_renew_over_a_pruned_record():
    import tempfile

    now = [0.0]
    with tempfile.TemporaryDirectory() as store:
        holder = JobLease(store, "job-b", owner="slow", ttl_seconds=10, clock=lambda: now[0])
        taker = JobLease(store, "job-b", owner="taker", ttl_seconds=10, clock=lambda: now[0])
        assert holder.acquire()  # record 0
        now[0] = 20.0  # the holder stalled past its TTL
        assert taker.acquire()  # record 1
        taker.renew()  # record 2; records 0 and 1 are deleted
        assert sorted(os.listdir(Path(store) / "leases" / "job-b")) == ["000000000002.json"]
        with pytest.raises(LeaseLost, match="newer than ours"):
            holder.renew()  # re-creates the deleted record 1, then sees record 2
        assert taker.current().owner == "taker"


def test_release_frees_the_lease_at_once_and_break_if_takes_a_dead_holders(tmp_path):
    url = str(tmp_path / "store")
    first = JobLease(url, "job-c", owner="first", ttl_seconds=600)
    second = JobLease(url, "job-c", owner="second", ttl_seconds=600)
    assert first.acquire()
    assert not second.acquire()
    assert first.release()
    assert second.acquire()
    restarted = JobLease(url, "job-c", owner="second-restarted", ttl_seconds=600)
    assert not restarted.acquire()
    assert restarted.acquire(break_if=lambda holder: holder.owner == "second")


def test_the_keeper_gives_up_the_lease_when_the_store_stays_unreachable(tmp_path):
    store_dir = tmp_path / "store"
    lease = JobLease(str(store_dir), "job-d", owner="vm1", ttl_seconds=1.0)
    assert lease.acquire()
    lost: list[str] = []
    warnings: list[str] = []
    with store_unreachable(store_dir):
        with LeaseKeeper(lease, on_lost=lost.append, renew_every=0.05, fence_after=0.5, warn=warnings.append):
            deadline = time.monotonic() + 10
            while not lost and time.monotonic() < deadline:
                time.sleep(0.05)
    assert len(lost) == 1 and "not renewed for 0.5 s" in lost[0]
    assert len(warnings) == 1 and "cannot renew lease job-d" in warnings[0]


def test_a_lease_needs_a_store_with_atomic_create():
    with pytest.raises(UserError, match="atomic create-if-absent"):
        JobLease("memory://leases-test", "job-e")
