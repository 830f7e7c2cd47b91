"""More than one process: real `cpuft sft` runs under torchrun, 2 ranks x 1 thread over gloo.

Each run starts two Python processes on the 2 cores, so this file takes a few minutes; it holds
as few runs as the claims need: one process against two (the same global batch and order), and
SIGTERM to one rank followed by --resume as two "machines" (two --nnodes 2 invocations on
127.0.0.1).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cpuft.train.distributed import parse_cpulist, processes_per_node, threads_per_rank
from tests.conftest import run_cpuft

COMMON = ("--eval-fraction", "0", "--per-device-batch-size", "1", "--logging-steps", "1", "--lora-dropout", "0",
          "--threads", "1", "--no-progress")


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


def test_two_ranks_write_one_run_directory(one_and_two):
    _, two, result = one_and_two
    steps = [r["step"] for r in metrics(two) if "loss" in r]
    assert steps == sorted(set(steps)), "a rank other than 0 appended to metrics.jsonl"
    assert len(list(two.glob("adapter*"))) == 1 and not list(two.glob(".*tmp*"))
    summary = json.loads((two / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 4 and summary["threads"] == 1
    assert result.stdout.count("done: 4 steps") == 1 and result.stdout.count("run directory:") == 1


def _rank_pid(launcher: subprocess.Popen, rank: int) -> int | None:
    import psutil

    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "cpuft" in " ".join(child.cmdline()):
                return child.pid
        except psutil.Error:
            continue
    return None


def test_sigterm_to_one_rank_checkpoints_all_and_two_nodes_resume(qa_model_dir, qa_dataset, tmp_path):
    run_dir = tmp_path / "run"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    args = [sys.executable, "-m", "cpuft", "sft", "--model", str(qa_model_dir), "--dataset", str(qa_dataset),
            "--max-steps", "400", "--save-steps", "1000", *COMMON, "--output-dir", str(run_dir)]
    launcher = subprocess.Popen([*args, "--nproc-per-node", "2"], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not ((run_dir / "metrics.jsonl").is_file() and len(metrics(run_dir)) >= 2):
        time.sleep(0.5)
    pid = _rank_pid(launcher, 1)
    assert pid is not None, "rank 1 not found"
    os.kill(pid, signal.SIGTERM)
    out, _ = launcher.communicate(timeout=240)
    assert launcher.returncode == 75, out[-3000:]
    checkpoints = sorted(run_dir.glob("checkpoint-*"))
    assert len(checkpoints) == 1 and not (run_dir / "adapter").exists()
    stopped_at = int(checkpoints[0].name.split("-")[1])
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"

    # Two "machines": node 0 hosts the rendezvous on 127.0.0.1, node 1 joins it.
    end = stopped_at + 2
    port = free_port()
    resume = ["sft", "--output-dir", str(run_dir), "--resume", "--max-steps", str(end), "--no-progress",
              "--nnodes", "2", "--rdzv-endpoint", f"127.0.0.1:{port}"]
    nodes = [subprocess.Popen([sys.executable, "-m", "cpuft", *resume, "--node-rank", str(r)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    steps = [s for s, _ in losses(run_dir)]
    assert steps == list(range(1, end + 1))  # every step logged exactly once across both runs
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == end
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
