#!/usr/bin/env python
"""What `--sync-to` costs in training throughput: the same `cpuft sft` job without and with a store.

Runs, interleaved (plain, synced, plain, synced, ...), the same small job with `save_steps` small
so that several checkpoints are uploaded while training goes on, the store being a local
directory (the uploads' sha256 and copying then compete for the same cores as training, which is
the cost that matters on a 2-core VM; a network upload to GCS waits on the network instead). It
reports `train_tokens_per_second` from each run's summary.json, the medians and their ratio, and
the CPU's flags.

    python scripts/bench_sync_overhead.py [--reps 2] [--model DIR] [--out bench-results/sync_overhead.json]

Default model: `cpuft tiny-model` at its default size (hidden 256, 4 layers, vocab 4096), built
here offline; dataset: the bundled sample. Timings on a shared machine are noisy: compare within
one run only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

JOB = {"max_steps": 40, "save_steps": 4, "save_total_limit": 2, "per_device_batch_size": 4,
       "gradient_accumulation_steps": 1, "max_length": 256, "eval_fraction": 0.0, "lora_r": 16, "logging_steps": 4}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=2, help="pairs of runs (default 2)")
    parser.add_argument("--model", default=None, help="model directory (default: build `cpuft tiny-model`)")
    parser.add_argument("--dataset", default="sample")
    parser.add_argument("--max-steps", type=int, default=JOB["max_steps"])
    parser.add_argument("--save-steps", type=int, default=JOB["save_steps"])
    parser.add_argument("--out", default="bench-results/sync_overhead.json")
    args = parser.parse_args()
    job = dict(JOB, max_steps=args.max_steps, save_steps=args.save_steps)

    work = Path(tempfile.mkdtemp(prefix="cpuft-sync-bench-"))
    model = Path(args.model) if args.model else work / "model"
    if not args.model:
        cpuft("tiny-model", "--out", model)

    runs = []
    for rep in range(args.reps):
        for synced in (False, True):
            run_dir, store = work / f"run-{rep}-{'synced' if synced else 'plain'}", work / f"store-{rep}"
            flags = [f"--{key.replace('_', '-')}={value}" for key, value in job.items()]
            extra = ["--sync-to", str(store)] if synced else []
            output = cpuft("sft", "--model", model, "--dataset", args.dataset, "--output-dir", run_dir,
                           "--no-progress", *flags, *extra)
            summary = json.loads((run_dir / "summary.json").read_text())
            stored = sorted(p.name for p in store.glob("checkpoint-*")) if synced else []
            runs.append({"rep": rep, "synced": synced, "tokens_per_second": summary["train_tokens_per_second"],
                         "train_seconds": summary["train_seconds"], "steps": summary["steps"],
                         "checkpoints_saved": summary["steps"] // job["save_steps"], "stored_at_end": stored,
                         "synced_line": next((line for line in output.splitlines() if line.startswith("synced to")), None)})
            print(f"rep {rep} {'synced' if synced else 'plain '}: {summary['train_tokens_per_second']:.1f} tok/s,"
                  f" {summary['train_seconds']:.1f} s", flush=True)

    plain = statistics.median(r["tokens_per_second"] for r in runs if not r["synced"])
    synced = statistics.median(r["tokens_per_second"] for r in runs if r["synced"])
    result = {
        "job": job, "model": str(model), "dataset": args.dataset, "runs": runs,
        "median_tokens_per_second": {"plain": plain, "synced": synced},
        "synced_over_plain": synced / plain, "overhead_percent": 100 * (1 - synced / plain),
        "cpu": cpu_facts(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"median tok/s: plain {plain:.1f}, synced {synced:.1f}; synced/plain {synced / plain:.4f}"
          f" ({result['overhead_percent']:+.2f} % overhead); CPU flags {result['cpu']['flags']}; wrote {out}")
    return 0


def cpuft(*args) -> str:
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run([sys.executable, "-m", "cpuft", *map(str, args)], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        sys.exit(f"cpuft {' '.join(map(str, args))} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result.stdout


def cpu_facts() -> dict:
    """As `grep -o -w 'amx_bf16\\|avx512_bf16\\|avx2' /proc/cpuinfo | sort -u`, plus the model name."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {"flags": [], "model": platform.processor(), "cores": os.cpu_count()}
    flags = sorted(set(re.findall(r"\b(amx_bf16|avx512_bf16|avx2)\b", text)))
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "")
    return {"flags": flags, "model": model, "cores": os.cpu_count()}


if __name__ == "__main__":
    raise SystemExit(main())
