"""Where one cpuft training step's time goes on this CPU, by category.

    python scripts/profile_step.py --size 100m [--batch 8] [--fp32] [--out bench-results/profile-100m]

Builds the bench's model and data for `--size` (cpuft.bench.sizes; random weights, nothing
downloaded), builds cpuft's own trainer exactly as `cpuft sft` does (cpuft.bench.worker.cpuft_trainer:
the plan's dtype, threads, length-grouped batches, TRL's SFTTrainer and its loss), runs one
warm-up optimizer step, then times one plain step (wall, user and system CPU seconds, minor page
faults from getrusage) and profiles one more with torch.profiler (record_shapes; `--profile-batches all`:
every batch of the data, each run once unprofiled first, reported one by one and summed). Each op's self CPU
time goes to one category:

- frozen-weight GEMMs: aten mm/addmm/bmm/linear whose shapes do not contain the LoRA rank;
- LoRA matmuls: the same ops with the LoRA rank among their dimensions;
- attention: SDPA's kernels, forward and backward, and the batched GEMMs (aten::bmm) of cpuft's
  short-row attention;
- lm_head GEMMs, and the loss: under TRL's chunked log-prob function (forward and backward), its
  matmuls, and everything else (log-softmax, entropy, top-1);
- optimizer: everything under optimizer.step() and zero_grad();
- elementwise and casts: every other aten op (norms, rotary, activations, dropout masks, copies)
  and inductor's compiled graphs (cpuft.fastpaths.compiled_elementwise);
- Python and framework overhead: the step's wall time minus the ops' summed self time.

Allocator cost shows as minor page faults and system CPU time (the kernel zeroing pages it hands
back). Writes profile.json and prints a Markdown table. The profiler adds overhead: shares are
indicative; the plain step's wall time is the figure to quote.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm")
CATEGORIES = ("frozen-weight GEMMs", "LoRA matmuls", "attention", "lm_head GEMMs", "loss (outside the head's GEMMs)",
              "optimizer", "elementwise and casts")
# The GEMMs a LoRA step cannot avoid: what the issue-22 metric leaves out ("time outside the
# frozen-weight and lm_head GEMMs").
UNAVOIDABLE_GEMMS = ("frozen-weight GEMMs", "lm_head GEMMs")
# In the names of the head's backward nodes: TRL's ChunkedLogProbFunctionBackward and cpuft's
# CompactHeadLogProbFunctionBackward (cpuft.fastpaths.chunked_loss).
HEAD_BACKWARD = "LogProbFunction"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="100m")
    parser.add_argument("--batch", type=int, help="micro-batch rows (default: the bench size's)")
    parser.add_argument("--steps-data", type=int, default=4, help="optimizer steps of data to build")
    parser.add_argument("--fp32", action="store_true", help="force fp32 (the plan's dtype otherwise)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--plain-steps", type=int, default=1,
                        help="unprofiled steps to time (each its own batch); the median is reported")
    parser.add_argument("--no-profile", action="store_true", help="time the plain steps only")
    parser.add_argument("--profile-batches", metavar="N[,N]|all",
                        help="profile these batches of the data (0 is the warm-up's; `all`: every one, each run once"
                             " unprofiled first), each in its own profiled step, and report their sum; default: the"
                             " one batch after the plain steps")
    parser.add_argument("--top-ops", type=int, default=15, help="rows of the by-op table to print")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="glibc mallopt: large allocations from the heap, freed memory kept (cpuft.hardware.allocator)")
    parser.add_argument("--fused-swiglu", action="store_true",
                        help="also fuse the MLP's silu(gate) * up (cpuft.fastpaths.fused_swiglu; not in the plan)")
    parser.add_argument("--plan-on", default="", metavar="FIELD[,FIELD]",
                        help="turn these boolean plan fields on, e.g. compiled_elementwise (off for short runs)")
    parser.add_argument("--plan-off", default="", metavar="FIELD[,FIELD]",
                        help="turn these boolean plan fields off to measure what they save, e.g. fused_lora,cpu_lm_head")
    return parser.parse_args(argv)


def build_trainer(args):
    from dataclasses import replace

    from cpuft.bench.data import write_bench_data
    from cpuft.bench.orchestrator import bench_model
    from cpuft.bench.sizes import LORA_SETTINGS, OPTIMIZER_SETTINGS, SIZES
    from cpuft.bench.worker import cpuft_trainer
    from cpuft.hardware.probe import probe_machine
    from cpuft.planning.plan import PlanRequest, plan_for

    size = SIZES[args.size]
    if args.batch:
        size = replace(size, batch_size=args.batch)
    size = replace(size, steps=args.steps_data)
    out = args.out or Path("bench-results") / f"profile-{args.size}"
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    train, evaluation, _ = write_bench_data(work, size.train_rows, 2, None, 42, size.median_reply_words)
    # The model directory is shared with `cpuft bench --size SIZE` so it is built once.
    model_dir = bench_model(Path("bench-results") / args.size / "work", args.size, SIZES[args.size], print)
    machine = probe_machine()
    spec = {
        "model": str(model_dir), "train": str(train), "eval": str(evaluation), "steps": size.steps,
        "batch_size": size.batch_size, "accumulation": 1, "max_length": size.max_length, "seed": 42,
        "threads": plan_for(machine, PlanRequest(device="cpu")).threads, "native_bf16": machine.native_bf16,
        "run_dir": str(work / "run"), **OPTIMIZER_SETTINGS, **LORA_SETTINGS,
    }
    import shutil

    shutil.rmtree(work / "run", ignore_errors=True)
    overrides = {name: False for name in args.plan_off.split(",") if name}
    overrides.update({name: True for name in args.plan_on.split(",") if name})
    trainer, _, plan_facts = cpuft_trainer(spec, plan_overrides=overrides, dtype="fp32" if args.fp32 else "auto")
    plan_facts["plan_off"] = sorted(k for k, v in overrides.items() if not v)
    plan_facts["plan_on"] = sorted(k for k, v in overrides.items() if v)
    return trainer, plan_facts, out, size


def mark_lm_head(record_function):
    """Wrap TRL's chunked log-prob function (and so cpuft's compact head, its subclass) so its
    forward shows as one profiler region."""
    from trl.kernels import ChunkedLogProbFunction

    original = ChunkedLogProbFunction.apply.__func__

    def apply(cls, *args):
        with record_function("cpuft:lm_head+loss"):
            return original(cls, *args)

    ChunkedLogProbFunction.apply = classmethod(apply)


def one_step(trainer, batch, record_function):
    loss = trainer.training_step(trainer.model, batch)
    with record_function("cpuft:optimizer"):
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
    return float(loss)


def non_padding_tokens(batch) -> int:
    return int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()


def usage():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), r.ru_utime, r.ru_stime, r.ru_minflt


def categorise(events, lora_rank: int) -> dict[str, float]:
    """Self CPU seconds per category (see the module docstring)."""
    seconds = defaultdict(float)
    for event in events:
        ancestors = []
        parent = event.cpu_parent
        while parent is not None:
            ancestors.append(parent.name)
            parent = parent.cpu_parent
        name = event.name
        if name.startswith("cpuft:") and not ancestors:
            continue  # the region markers themselves carry no self time worth counting
        if any(a == "cpuft:optimizer" for a in ancestors) or name == "cpuft:optimizer":
            category = "optimizer"
        elif any(a == "cpuft:lm_head+loss" or HEAD_BACKWARD in a for a in ancestors) or HEAD_BACKWARD in name:
            category = "lm_head GEMMs" if name in MATMUL_OPS else "loss (outside the head's GEMMs)"
        elif "scaled_dot_product" in name or "flash_attention" in name or name == "aten::bmm":
            category = "attention"  # aten::bmm: cpuft's short-row attention (linear layers run mm/addmm)
        elif any("scaled_dot_product" in a or "flash_attention" in a for a in ancestors):
            category = "attention"
        elif name in MATMUL_OPS:
            dims = {d for shape in (event.input_shapes or []) for d in (shape or [])}
            category = "LoRA matmuls" if lora_rank in dims else "frozen-weight GEMMs"
        elif name.startswith("aten::") or name.startswith("## Call CompiledFxGraph"):
            category = "elementwise and casts"  # compiled graphs: cpuft.fastpaths.compiled_elementwise
        else:
            continue  # autograd engine wrappers, python frames: their self time is bookkeeping
        seconds[category] += event.self_cpu_time_total / 1e6
    return seconds


def main(argv) -> int:
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    args = parse_args(argv)
    if args.keep_freed_memory:
        from cpuft.hardware.allocator import keep_freed_memory

        print(f"keep_freed_memory: {keep_freed_memory()}")
    trainer, plan_facts, out, size = build_trainer(args)
    if args.fused_swiglu:
        from cpuft.fastpaths.fused_swiglu import fuse_swiglu_mlps

        print(f"fused_swiglu: {fuse_swiglu_mlps(trainer.model)} (fused, kept) MLPs")
    mark_lm_head(record_function)
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train's loop otherwise
    batches = list(trainer.get_train_dataloader())
    if len(batches) < args.plain_steps + 2:
        raise SystemExit(f"--steps-data {args.steps_data} gives {len(batches)} batches; need --plain-steps + 2")
    warm, plains = batches[0], batches[1:1 + args.plain_steps]
    if args.profile_batches == "all":
        profiled_indices = list(range(len(batches)))
        for batch in batches[1:]:  # every shape seen once before it is profiled (compiles, allocator)
            one_step(trainer, batch, record_function)
    elif args.profile_batches:
        profiled_indices = [int(n) for n in args.profile_batches.split(",")]
    else:
        profiled_indices = [1 + args.plain_steps]
    one_step(trainer, warm, record_function)

    timed = []  # (wall, user, system, faults) per plain step
    for batch in plains:
        start = usage()
        one_step(trainer, batch, record_function)
        timed.append(tuple(b - a for a, b in zip(start, usage())))
    median = sorted(range(len(timed)), key=lambda i: timed[i][0])[len(timed) // 2]  # by wall time
    (wall, user, system, faults), plain = timed[median], plains[median]
    if args.no_profile:
        print(f"{args.size}: plain steps {', '.join(f'{t[0]:.2f}' for t in timed)} s wall; median {wall:.2f} s,"
              f" {faults:,} minor page faults, {system:.2f} s system; plan off: {plan_facts['plan_off'] or 'none'};"
              f" faults per step {', '.join(f'{t[3]:,}' for t in timed)};"
              f" peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
        return 0

    by_category, profiled_runs, last_prof = defaultdict(float), [], None
    for index in profiled_indices:
        batch = batches[index]
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            profile_start = time.perf_counter()
            one_step(trainer, batch, record_function)
            profiled_wall = time.perf_counter() - profile_start
        categories = categorise(prof.events(), trainer.model.peft_config["default"].r)
        categories["Python and framework overhead"] = max(0.0, profiled_wall - sum(categories.values()))
        batch_tokens = non_padding_tokens(batch)
        outside = profiled_wall - sum(categories.get(name, 0.0) for name in UNAVOIDABLE_GEMMS)
        profiled_runs.append({"batch": index, "shape": list(batch["input_ids"].shape), "non_padding_tokens": batch_tokens,
                              "wall_seconds": profiled_wall, "outside_unavoidable_gemms_seconds": outside,
                              "self_seconds_by_category": dict(categories)})
        for name, seconds in categories.items():
            by_category[name] += seconds
        last_prof = prof

    tokens = non_padding_tokens(plain)
    profiled_tokens = sum(run["non_padding_tokens"] for run in profiled_runs)
    profiled_wall = sum(run["wall_seconds"] for run in profiled_runs)
    outside = sum(run["outside_unavoidable_gemms_seconds"] for run in profiled_runs)
    result = {
        "command": "python scripts/profile_step.py " + " ".join(argv),
        "size": args.size, **plan_facts, "threads": torch.get_num_threads(),
        "batch_shape": list(plain["input_ids"].shape), "non_padding_tokens": tokens,
        "step_wall_seconds": wall, "step_user_seconds": user, "step_system_seconds": system,
        "step_minor_page_faults": faults, "plain_step_wall_seconds": [t[0] for t in timed],
        "profiled_steps": profiled_runs,
        "profiled_step_wall_seconds": profiled_wall,
        "profiled_batch_shape": profiled_runs[0]["shape"] if len(profiled_runs) == 1 else [run["shape"] for run in profiled_runs],
        "profiled_non_padding_tokens": profiled_tokens,
        "outside_unavoidable_gemms_seconds": outside,
        "outside_unavoidable_gemms_seconds_per_1k_tokens": outside / profiled_tokens * 1000,
        "self_seconds_by_category": dict(by_category),
        "load_average": os.getloadavg(),
        "top_ops": last_prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top_ops),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps(result, indent=2))
    print(result["top_ops"])
    print(f"\n{args.size}: batch {result['batch_shape']} ({tokens} non-padding tokens),"
          f" {plan_facts['compute_dtype']}, {result['threads']} threads; plain step {wall:.2f} s wall,"
          f" {user:.2f} s user, {system:.2f} s system, {faults:,} minor page faults;"
          f" load average {result['load_average'][0]:.1f}")
    for run in profiled_runs:
        print(f"\nprofiled step: batch {run['batch']} {run['shape']} ({run['non_padding_tokens']} non-padding tokens),"
              f" {run['wall_seconds']:.2f} s wall; outside the frozen-weight and lm_head GEMMs"
              f" {run['outside_unavoidable_gemms_seconds']:.2f} s ="
              f" {run['outside_unavoidable_gemms_seconds'] / run['non_padding_tokens'] * 1000:.2f} s per 1,000 tokens")
    if len(profiled_runs) > 1:
        print(f"\nall {len(profiled_runs)} profiled steps: {profiled_tokens} non-padding tokens, {profiled_wall:.2f} s wall;"
              f" outside the frozen-weight and lm_head GEMMs {outside:.2f} s ="
              f" {outside / profiled_tokens * 1000:.2f} s per 1,000 tokens")
    print("\n| category | self CPU s (profiled steps) | share |\n|---|---|---|")
    total = sum(by_category.values())
    for name in (*CATEGORIES, "Python and framework overhead"):
        print(f"| {name} | {by_category.get(name, 0.0):.2f} | {by_category.get(name, 0.0) / total:.1%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
