#!/usr/bin/env python
"""Numbers behind `cpuft batch`: preemption latency, resume exactness, scheduler overhead.

For each repetition, interleaved (A B C D, A B C D, ...):
  A  `cpuft sft` straight through (the reference adapter and the baseline wall time)
  B  `cpuft batch run` of a one-job queue with the same job, straight through (overhead vs A)
  C  `cpuft batch run`, SIGTERM to the runner after the first logged step; time until the
     runner has exited (checkpoint saved) -- what a 30-second spot notice must cover; then resume
  D  `cpuft batch run`, SIGKILL to its process group after the first checkpoint; resume
and reports medians plus the max |adapter(C or D) - adapter(A)| over all tensors.

    python scripts/bench_batch_resume.py --reps 3 [--model DIR] [--out bench-results/batch_resume.json]

Default model: the test-size tiny Llama (built here, offline). Timings on a shared machine are
noisy: compare within one run only.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = "cpu core thread cache memory loss adapter rank alpha token batch step spot queue job resume checkpoint".split()
JOB = {"max_steps": 24, "save_steps": 4, "per_device_batch_size": 2, "gradient_accumulation_steps": 1,
       "max_length": 256, "eval_fraction": 0.0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--model", default=None, help="model directory (default: build the test-size tiny model)")
    parser.add_argument("--max-steps", type=int, default=JOB["max_steps"])
    parser.add_argument("--out", default="bench-results/batch_resume.json")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    job = dict(JOB, max_steps=args.max_steps)

    work = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    dataset = work / "chat.jsonl"
    rng = random.Random(0)
    rows = [{"messages": [
        {"role": "user", "content": f"Question {i}: " + " ".join(rng.choice(WORDS) for _ in range(12)) + "?"},
        {"role": "assistant", "content": " ".join(rng.choice(WORDS) for _ in range(60))},
    ]} for i in range(48)]
    dataset.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = Path(args.model) if args.model else build_model(work / "tiny", rows)

    results: dict[str, list[float]] = {"sft_seconds": [], "batch_seconds": [], "sigterm_to_exit_seconds": [],
                                       "sigterm_stop_step": [], "diff_after_sigterm": [], "diff_after_kill9": [],
                                       "diff_batch_vs_sft": []}
    for rep in range(args.reps):
        base = work / f"rep{rep}"
        base.mkdir()
        # A: plain cpuft sft
        started = time.perf_counter()
        flags = [f"--{k.replace('_', '-')}={v}" for k, v in job.items()]
        subprocess.run([sys.executable, "-m", "cpuft", "sft", "--model", str(model), "--dataset", str(dataset),
                        "--output-dir", str(base / "sft"), "--no-progress", *flags], check=True, capture_output=True)
        results["sft_seconds"].append(time.perf_counter() - started)
        reference = base / "sft" / "adapter"

        # B: the same job through the batch runner
        queue = write_queue(base / "b", model, dataset, job)
        started = time.perf_counter()
        assert batch(queue).wait() == 0
        results["batch_seconds"].append(time.perf_counter() - started)
        results["diff_batch_vs_sft"].append(max_abs_diff(base / "b" / "runs" / "job" / "adapter", reference))

        # C: SIGTERM after the first logged step
        queue = write_queue(base / "c", model, dataset, job)
        run_dir = base / "c" / "runs" / "job"
        runner = batch(queue)
        wait_until(lambda: (run_dir / "metrics.jsonl").is_file() and (run_dir / "metrics.jsonl").read_text().strip())
        signalled = time.perf_counter()
        runner.send_signal(signal.SIGTERM)
        assert runner.wait() == 75
        results["sigterm_to_exit_seconds"].append(time.perf_counter() - signalled)
        results["sigterm_stop_step"].append(json.loads((run_dir / "summary.json").read_text())["steps"])
        assert batch(queue).wait() == 0
        results["diff_after_sigterm"].append(max_abs_diff(run_dir / "adapter", reference))

        # D: kill -9 of the whole process group after the first checkpoint
        queue = write_queue(base / "d", model, dataset, job)
        run_dir = base / "d" / "runs" / "job"
        runner = batch(queue)
        wait_until(lambda: any((p / "trainer_state.json").is_file() for p in run_dir.glob("checkpoint-*")))
        os.killpg(runner.pid, signal.SIGKILL)
        runner.wait()
        assert batch(queue).wait() == 0
        results["diff_after_kill9"].append(max_abs_diff(run_dir / "adapter", reference))
        print(f"rep {rep}: " + ", ".join(f"{k}={v[-1]:.4g}" for k, v in results.items()), flush=True)

    summary = {
        "machine_note": "shared machine (other engineers' tests running): timings are noisy",
        "job": job, "model": str(model), "reps": args.reps, "raw": results,
        "median": {k: statistics.median(v) for k, v in results.items()},
        # per repetition (A and B ran back to back), then the median: steadier than a ratio of medians
        "batch_over_sft_wall_ratio": statistics.median(
            b / a for a, b in zip(results["sft_seconds"], results["batch_seconds"], strict=True)),
        "max_adapter_diff": max(results["diff_after_sigterm"] + results["diff_after_kill9"] + results["diff_batch_vs_sft"]),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: summary[k] for k in ("median", "batch_over_sft_wall_ratio", "max_adapter_diff")}, indent=2))
    print(f"written: {out} (work dir {work})")
    return 0


def build_model(out: Path, rows: list[dict]) -> Path:
    from cpuft.testing.tiny_model import TinyModelSpec, build_tiny_model

    texts = [m["content"] for r in rows for m in r["messages"]]
    spec = TinyModelSpec(vocab_size=1024, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=172)
    return build_tiny_model(out, texts=texts, spec=spec)


def write_queue(directory: Path, model: Path, dataset: Path, job: dict) -> Path:
    directory.mkdir(parents=True)
    keys = "".join(f"    {k}: {v}\n" for k, v in job.items())
    queue = directory / "queue.yaml"
    queue.write_text(f"jobs:\n  - name: job\n    model: {model}\n    dataset: {dataset}\n{keys}")
    return queue


def batch(queue: Path) -> subprocess.Popen:
    log = open(queue.with_suffix(".log"), "a")
    return subprocess.Popen([sys.executable, "-m", "cpuft", "batch", "run", str(queue)], stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def wait_until(predicate, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError
        time.sleep(0.05)


def max_abs_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    x, y = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    return max((x[k] - y[k]).abs().max().item() for k in x)


if __name__ == "__main__":
    raise SystemExit(main())
