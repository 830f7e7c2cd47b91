"""More than one process: real `cpuft sft` runs under torchrun, 2 ranks x 1 thread over gloo.

Each run starts two Python processes on the 2 cores, so this file takes a few minutes; it holds
as few runs as the claims need: one process against two (the same global batch and order), and
one run directory taken through every way a rank can stop: a late error on one rank (a real
memory limit on rank 1 alone), SIGTERM to one rank, kill -9 of one rank, each followed by
--resume, the last as two "machines" (two --nnodes 2 invocations on 127.0.0.1).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cpuft.errors import UserError
from cpuft.planning.world import threads_per_rank
from cpuft.train.distributed import (
    parse_cpulist,
    processes_per_node,
    world_from_flags,
)
from tests.conftest import fixed_rule_dtype, planned_tolerance, run_cpuft

# The dtype is pinned to the fixed rule's (bf16 where native): one process measures a small
# model's dtype (cpuft.planning.dtype_choice) while DDP ranks keep the fixed rule, and these tests
# compare one process with several.
PINNED_DTYPE = ("--dtype", fixed_rule_dtype())
COMMON = ("--eval-fraction", "0", "--per-device-batch-size", "1", "--logging-steps", "1", "--lora-dropout", "0",
          "--threads", "1", "--no-progress", *PINNED_DTYPE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in metrics(run_dir) if "loss" in r]


def test_cpulist_and_shares_by_hand():
    assert parse_cpulist("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    assert parse_cpulist("5") == [5]
    assert threads_per_rank(16, 2) == 8 and threads_per_rank(16, 3) == 5 and threads_per_rank(2, 4) == 1
    assert processes_per_node("auto", 1) == 1 and processes_per_node("auto", 2) == 2 and processes_per_node("3", 1) == 3
    assert world_from_flags("auto", 2, 2) == (2, 2)
    for nproc, nnodes in (("0", 1), ("two", 1), ("1", 0)):
        with pytest.raises(UserError):
            world_from_flags(nproc, nnodes, 1)


def test_bad_world_flags_are_refused_by_plan_and_sft_alike(qa_model_dir):
    for command in ("plan", "sft"):
        result = run_cpuft(command, "--model", qa_model_dir, "--nproc-per-node", "0", "--tokens" if command == "plan" else "--dry-run",
                           *(["1000"] if command == "plan" else []))
        assert result.returncode == 2 and "--nproc-per-node must be 'auto' or a positive integer" in result.stderr


@pytest.fixture(scope="module")
def one_and_two(qa_model_dir, qa_dataset, tmp_path_factory):
    """4 steps of global batch 2: one process accumulating 2 micro-batches, and 2 ranks x 1."""
    root = tmp_path_factory.mktemp("ddp")
    base = ("sft", "--model", qa_model_dir, "--dataset", qa_dataset, "--max-steps", "4", *COMMON)
    one = run_cpuft(*base, "--gradient-accumulation-steps", "2", "--output-dir", root / "one")
    two = run_cpuft(*base, "--gradient-accumulation-steps", "1", "--nproc-per-node", "2", "--output-dir", root / "two")
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    return root / "one", root / "two", two


@pytest.mark.slow
def test_two_ranks_follow_the_one_process_loss_curve_and_adapter(one_and_two):
    from safetensors.torch import load_file

    one, two, _ = one_and_two
    # The same rows in the same steps and a gradient averaged over the same tokens: only the
    # order of float additions differs (gloo's all-reduce), so 1e-4 on a loss near 6 is ample.
    assert [s for s, _ in losses(one)] == [s for s, _ in losses(two)] == [1, 2, 3, 4]
    for (_, a), (_, b) in zip(losses(one), losses(two)):
        assert abs(a - b) < 1e-4
    a = load_file(one / "adapter" / "adapter_model.safetensors")
    b = load_file(two / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5  # LoRA B weights are ~0.1 after 4 steps


@pytest.mark.slow
def test_two_ranks_write_one_run_directory(one_and_two):
    _, two, result = one_and_two
    steps = [r["step"] for r in metrics(two) if "loss" in r]
    assert steps == sorted(set(steps)), "a rank other than 0 appended to metrics.jsonl"
    assert len(list(two.glob("adapter*"))) == 1 and not list(two.glob(".*tmp*"))
    summary = json.loads((two / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 4 and summary["threads"] == 1
    assert result.stdout.count("done: 4 steps") == 1 and result.stdout.count("run directory:") == 1
    # The plan knows the world: printed once, and in plan.json (no separate "world" record).
    plan = json.loads((two / "plan.json").read_text())["plan"]
    assert (plan["world_size"], plan["ranks_per_node"], plan["nodes"]) == (2, 2, 1)
    assert (plan["effective_batch_size"], plan["global_batch_size"], plan["threads"]) == (1, 2, 1)
    assert plan["allreduce"]["gradient_bytes"] == summary["trainable_params"] * 4  # fp32 LoRA gradients
    assert result.stdout.count("2 ranks = 2 per node on 1 node") == 1


@pytest.mark.slow
def test_ddp_does_not_search_for_unused_parameters(one_and_two):
    # LoRA gives every trainable parameter a gradient: with find_unused_parameters=True (the
    # Trainer's default without checkpointing) DDP warns on every rank that the search found none.
    _, _, result = one_and_two
    assert "find_unused_parameters=True" not in result.stderr + result.stdout


# Micro-batches of more than one row: the global batch of 8 is 4 x 2 in one process and 2 x 2 on
# each of 2 ranks. 36 rows make 5 steps an epoch, the 5th filled up from 4 rows (cpuft.data.packing),
# so 6 steps cross an epoch. A constant learning rate makes a run stopped at step 3 and continued
# to 6 the same as one run to 6 (a decaying schedule is laid over the max_steps of the run).
WIDE = ("--eval-fraction", "0", "--max-samples", "36", "--logging-steps", "1", "--lora-dropout", "0",
        "--learning-rate", "5e-3", "--lr-scheduler-type", "constant", "--warmup-steps", "0", "--threads", "1",
        "--no-progress", *PINNED_DTYPE)
ONE_PROCESS_SPLIT = ("--per-device-batch-size", "4", "--gradient-accumulation-steps", "2")
TWO_RANK_SPLIT = ("--per-device-batch-size", "2", "--gradient-accumulation-steps", "2", "--nproc-per-node", "2")


def step_tokens(run_dir: Path, resumed_after: int | None = None) -> list[int]:
    """Non-padding tokens of each optimizer step (TRL's num_tokens sums them over all ranks, from
    zero in each process: a run resumed after step `resumed_after` counts afresh from the next)."""
    tokens, previous = [], 0
    for record in metrics(run_dir):
        if "num_tokens" in record:
            previous = 0 if record["step"] == (resumed_after or -1) + 1 else previous
            tokens.append(record["num_tokens"] - previous)
            previous = record["num_tokens"]
    return tokens


def adapter_difference(a_dir: Path, b_dir: Path) -> tuple[float, float]:
    """(largest absolute difference, norm of the difference / norm of `a_dir`'s adapter)."""
    from safetensors.torch import load_file

    a = load_file(a_dir / "adapter" / "adapter_model.safetensors")
    b = load_file(b_dir / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    largest = max((a[k] - b[k]).abs().max().item() for k in a)
    relative = sum(((a[k] - b[k]) ** 2).sum().item() for k in a) ** 0.5 / sum((a[k] ** 2).sum().item() for k in a) ** 0.5
    return largest, relative


def assert_same_adapter(a_dir: Path, b_dir: Path, tolerance: float) -> None:
    # Adam turns rounding differences in a near-zero gradient into updates of up to the learning
    # rate, so under bf16 a few weights move by ~1e-2 while the adapter as a whole agrees to ~1 %
    # (measured: 0.85 %; rows of other steps gave ~50 % in issue 21): both are checked.
    largest, relative = adapter_difference(a_dir, b_dir)
    assert largest < tolerance and relative < 0.05, (largest, relative)


@pytest.fixture(scope="module")
def wide_batches(qa_model_dir, qa_dataset, tmp_path_factory):
    """6 steps of global batch 8 in one process (4 x 2) and on 2 ranks (2 x 2 each); a 2-rank run of
    3 steps, resumed to 6 in one process. Returns the run directories and the resume's result."""
    root = tmp_path_factory.mktemp("ddp-wide")
    base = ("sft", "--model", qa_model_dir, "--dataset", qa_dataset, *WIDE)
    one = run_cpuft(*base, "--max-steps", "6", *ONE_PROCESS_SPLIT, "--output-dir", root / "one")
    two = run_cpuft(*base, "--max-steps", "6", *TWO_RANK_SPLIT, "--output-dir", root / "two")
    first = run_cpuft(*base, "--max-steps", "3", "--save-steps", "3", *TWO_RANK_SPLIT, "--output-dir", root / "moved")
    for result in (one, two, first):
        assert result.returncode == 0, result.stderr[-3000:]
    resumed = run_cpuft("sft", "--output-dir", root / "moved", "--resume", "--max-steps", "6", *ONE_PROCESS_SPLIT,
                        "--no-progress")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return root / "one", root / "two", root / "moved", resumed


@pytest.mark.slow
def test_two_ranks_with_wider_micro_batches_train_the_one_process_rows(wide_batches):
    one, two, _, _ = wide_batches
    plans = [json.loads((run / "plan.json").read_text())["plan"] for run in (one, two)]
    assert [(p["per_device_batch_size"], p["world_size"], p["global_batch_size"]) for p in plans] == [(4, 1, 8), (2, 2, 8)]
    # The same rows in every step: the same token counts, exactly (they differed from step 1 when
    # the order was grouped by the per-device micro-batch).
    tokens = step_tokens(one)
    assert len(tokens) == 6 and tokens == step_tokens(two)
    _, tolerance = planned_tolerance(one)
    assert [s for s, _ in losses(one)] == [s for s, _ in losses(two)] == list(range(1, 7))
    for (step, a), (_, b) in zip(losses(one), losses(two)):
        assert abs(a - b) < tolerance, (step, a, b)
    assert_same_adapter(one, two, tolerance)


@pytest.mark.slow
def test_a_run_resumed_on_another_number_of_processes_ends_as_the_uninterrupted_one(wide_batches):
    one, _, moved, resumed = wide_batches
    assert f"resuming from {moved / 'checkpoint-3'}" in resumed.stdout
    plan = json.loads((moved / "plan.json").read_text())["plan"]
    assert (plan["world_size"], plan["per_device_batch_size"], plan["global_batch_size"]) == (1, 4, 8)
    _, tolerance = planned_tolerance(one)
    assert [s for s, _ in losses(moved)] == list(range(1, 7))  # steps 1-3 on 2 ranks, 4-6 in one process
    for (step, a), (_, b) in zip(losses(one), losses(moved)):
        assert abs(a - b) < tolerance, (step, a, b)
    assert step_tokens(moved, resumed_after=3) == step_tokens(one)
    assert_same_adapter(one, moved, tolerance)


def _rank_process(launcher: subprocess.Popen, rank: int):
    import psutil

    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "cpuft" in " ".join(child.cmdline()):
                return child
        except psutil.Error:
            continue
    return None


def _start(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cpuft", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _wait_for(condition, launcher: subprocess.Popen, what: str, seconds: float = 240):
    deadline = time.time() + seconds
    while time.time() < deadline and launcher.poll() is None:
        if condition():
            return
        time.sleep(0.2)
    launcher.kill()
    pytest.fail(f"{what} did not happen: {launcher.communicate()[0][-3000:]}")


def _finish(launcher: subprocess.Popen, seconds: float, others: tuple = ()) -> str:
    """The launcher's output once it ends; a failure (not a hang) when it takes over `seconds`.
    `others`: the other nodes' launchers. torchrun's agent waits up to 300 s in its exit barrier for
    every node's agent, so a node that hangs may be waiting on another: the failure shows the
    output of those still running too."""
    try:
        return launcher.communicate(timeout=seconds)[0]
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        waited_on = ""
        for other in others:
            if other.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(other.pid, signal.SIGKILL)
                waited_on += f"\n--- another node, still running then ---\n{other.communicate()[0][-3000:]}"
        pytest.fail(f"the job still ran {seconds} s after one rank stopped: {launcher.communicate()[0][-3000:]}{waited_on}")


def _checkpoints(run_dir: Path) -> list[int]:
    """Steps of the complete checkpoints (transformers writes trainer_state.json last)."""
    return sorted(int(c.name.split("-")[1]) for c in run_dir.glob("checkpoint-*") if (c / "trainer_state.json").is_file())


def _one_paragraph(out: str, start: str) -> str:
    """The launcher's message: exactly one, and no traceback from any rank around it."""
    lines = [line for line in out.splitlines() if line.startswith(start)]
    assert len(lines) == 1 and "Traceback" not in out, out[-3000:]
    return lines[0]


@pytest.mark.slow
def test_a_rank_that_fails_or_stops_ends_the_job_and_resume_continues(qa_model_dir, qa_dataset, tmp_path):
    import psutil

    run_dir = tmp_path / "run"
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               # Every allocation over 64 KiB maps new memory, so rank 1's limit below bites at its
               # next such allocation instead of whenever the heap's free lists run dry.
               GLIBC_TUNABLES="glibc.malloc.mmap_threshold=65536")
    train = ["sft", "--model", str(qa_model_dir), "--dataset", str(qa_dataset), "--max-steps", "400",
             "--save-steps", "2", *COMMON, "--output-dir", str(run_dir), "--nproc-per-node", "2"]
    resume = ["sft", "--output-dir", str(run_dir), "--resume", "--no-progress"]

    # 1. A late error on one rank: rank 1 alone runs out of memory (its address space capped at
    # what it has mapped, a real limit: prlimit), mid-run. Both ranks end, one message names it.
    launcher = _start(train, env)
    _wait_for(lambda: 2 in _checkpoints(run_dir), launcher, "checkpoint-2")
    rank1 = _rank_process(launcher, 1)
    limit = rank1.memory_info().vms
    rank1.rlimit(psutil.RLIMIT_AS, (limit, limit))
    out = _finish(launcher, 120)
    assert launcher.returncode == 1, out[-3000:]
    message = _one_paragraph(out, "cpuft: rank 1 of 2 ")
    assert "failed: RuntimeError:" in message and "allocate" in message, message
    traceback_file = Path(message.split("Its traceback: ")[1].split(". ")[0])
    assert "alloc" in traceback_file.read_text()
    first = _checkpoints(run_dir)[-1]

    # 2. --resume continues from the last complete checkpoint; SIGTERM to rank 1 then stops every
    # rank at the same step with one checkpoint (exit 75).
    # The failed run may have logged steps past `first`; the resumed one trims them first, so wait
    # for a step past `first` in a metrics file that is no longer the failed run's.
    failed_run_metrics = (run_dir / "metrics.jsonl").read_text()
    launcher = _start([*resume, "--nproc-per-node", "2"], env)
    _wait_for(lambda: (run_dir / "metrics.jsonl").read_text() != failed_run_metrics
              and any(r["step"] > first for r in metrics(run_dir) if "loss" in r)
              and _rank_process(launcher, 1) is not None, launcher, "a step after resuming")
    os.kill(_rank_process(launcher, 1).pid, signal.SIGTERM)
    out = _finish(launcher, 120)
    assert launcher.returncode == 75, out[-3000:]
    assert f"resuming from {run_dir / f'checkpoint-{first}'}" in out
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"
    stopped = _checkpoints(run_dir)[-1]
    assert stopped > first

    # 3. kill -9 one rank: torchrun tears the other down; one message, no hang.
    launcher = _start([*resume, "--nproc-per-node", "2"], env)
    _wait_for(lambda: max(_checkpoints(run_dir)) > stopped, launcher, "a checkpoint after resuming")
    _rank_process(launcher, 1).kill()
    killed_at = time.time()
    out = _finish(launcher, 60)
    assert launcher.returncode == 1 and time.time() - killed_at < 45, out[-3000:]
    assert "was killed by SIGKILL" in _one_paragraph(out, "cpuft: rank 1 of 2 ")
    last = _checkpoints(run_dir)[-1]

    # 4. Two "machines": node 0 hosts the rendezvous on 127.0.0.1, node 1 joins it; they finish.
    end = last + 2
    port = free_port()
    nodes = [_start([*resume, "--max-steps", str(end), "--nnodes", "2", "--rdzv-endpoint", f"127.0.0.1:{port}",
                     "--node-rank", str(r)], env) for r in (0, 1)]
    outs = [_finish(node, 300, others=tuple(n for n in nodes if n is not node)) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    steps = [s for s, _ in losses(run_dir)]
    assert steps == list(range(1, end + 1))  # every step logged exactly once across the four runs
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == end
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    plan = json.loads((run_dir / "plan.json").read_text())["plan"]
    assert (plan["world_size"], plan["ranks_per_node"], plan["nodes"]) == (2, 1, 2)


def test_a_rank_killed_by_a_signal_is_named_before_one_that_aborted_because_of_it():
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from cpuft.train.distributed import failure_message

    def failure(rank: int, exitcode: int) -> ProcessFailure:
        return ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=exitcode, error_file="/nonexistent")

    # kill -9 rank 1: rank 0 aborted in the broken collective (SIGABRT), seen in the same poll.
    message, status = failure_message({0: failure(0, -signal.SIGABRT), 1: failure(1, -signal.SIGKILL)}, 2)
    assert message.startswith("cpuft: rank 1 of 2 was killed by SIGKILL") and status == 1
    # An abort alone is still named.
    message, _ = failure_message({0: failure(0, -signal.SIGABRT), 1: failure(1, -signal.SIGTERM)}, 2)
    assert message.startswith("cpuft: rank 0 of 2 was killed by SIGABRT")
