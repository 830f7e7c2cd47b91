"""`run_bench`: run every variant of the bench job, each in its own process, and write the report.

The parent validates the options, writes the data and builds the bench model (once per size,
reused while its spec is unchanged), measures this machine's matmul FLOP/s at the model's MLP
shape (fp32, and bf16 where native) in a worker of its own, then runs the variants interleaved
(A B C A B C for --repeats), and writes bench.json and bench.png (cpuft.bench.report).
`trl_micro_batches` (--trl-micro-batches) puts trl_best's runs at each micro-batch size where
trl_best would run; the report makes the fastest of them trl_best.

`--job dpo` runs the same machinery on preference pairs (cpuft.bench.data) with the DPO variants
(cpuft.bench.sizes.DPO_VARIANTS: plain TRL DPOTrainer and `cpuft dpo`'s stages); cpuft_fp32 is
not added by itself there.

Limits: timings on a shared machine are noisy: use `repeats` (medians are reported) and rerun on
a quiet machine before quoting a number.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from cpuft.artifacts import atomic_write_json, atomic_write_text
from cpuft.bench.data import (
    synthetic_conversations,
    write_bench_data,
    write_bench_preferences,
)
from cpuft.bench.report import build_report, write_bench_chart
from cpuft.bench.sizes import (
    CPUFT_FORCED_DTYPES,
    CPUFT_FP32,
    DPO_DEFAULT_VARIANTS,
    DPO_OPTIMIZER_SETTINGS,
    JOBS,
    LORA_SETTINGS,
    OPTIMIZER_SETTINGS,
    SIZES,
    TRL_BEST,
    VARIANTS,
    BenchSize,
    PublishedShape,
    describe_model,
    job_variants,
    trl_best_at,
)
from cpuft.bench.worker import run_in_worker
from cpuft.errors import UserError


@dataclass
class BenchOptions:
    size: str = "tiny"
    out_dir: Path = Path("bench-results")
    steps: int | None = None
    variants: tuple[str, ...] | None = None  # default: the job's (VARIANTS, or DPO_DEFAULT_VARIANTS)
    repeats: int = 1
    dataset: str | None = None  # sft: a messages-format .jsonl; dpo: preference pairs; default: synthetic
    job: str = "sft"  # "sft" or "dpo"
    onednn_verbose: Path | None = None
    seed: int = 42
    # sft: run trl_best at each of these micro-batch sizes (packed rows) and keep the fastest;
    # None: once, at the batch that fits one epoch in the steps (cpuft.bench.baselines.fit_packed_batch).
    trl_micro_batches: tuple[int, ...] | None = None


def run_bench(options: BenchOptions, log=print) -> dict:
    """Run every variant (interleaved, `repeats` times), measure GEMM peak, write bench.json/png."""
    from cpuft.hardware.probe import probe_machine
    from cpuft.planning.plan import PlanRequest, plan_for

    size = _checked_size(options)
    dpo = options.job == "dpo"
    machine = probe_machine()
    threads = plan_for(machine, PlanRequest(device="cpu")).threads
    variants = list(options.variants or (DPO_DEFAULT_VARIANTS if dpo else VARIANTS))
    if not dpo and machine.native_bf16 and "cpuft" in variants and CPUFT_FP32 not in variants:
        variants.append(CPUFT_FP32)  # bf16 against fp32 where bf16 is real

    out_dir = Path(options.out_dir)
    work = out_dir / "work"
    write_data = write_bench_preferences if dpo else write_bench_data
    train_path, eval_path, data_note = write_data(
        work, size.train_rows, size.eval_samples, options.dataset, options.seed, size.median_reply_words)
    model_dir = bench_model(work, options.size, size, log)

    log(f"measuring GEMM peak ({threads} threads)...")
    tokens_per_microbatch = size.batch_size * size.max_length // 2
    gemm = run_in_worker(work, "gemm", {
        "m": tokens_per_microbatch, "k": size.model.hidden_size, "n": size.model.intermediate_size,
        "threads": threads, "dtypes": ["fp32", "bf16"] if machine.native_bf16 else ["fp32"],
    })

    common = {
        "model": str(model_dir), "train": str(train_path), "eval": str(eval_path),
        "steps": size.steps, "batch_size": size.batch_size, "accumulation": size.accumulation,
        "max_length": size.max_length, "seed": options.seed, "threads": threads,
        "native_bf16": machine.native_bf16, "job": options.job,
        **(DPO_OPTIMIZER_SETTINGS if dpo else OPTIMIZER_SETTINGS), **LORA_SETTINGS,
    }
    # trl_best once per asked micro-batch, each a run of its own name, where trl_best would run.
    runs_order = [name for v in variants for name in (
        [trl_best_at(m) for m in options.trl_micro_batches] if v == TRL_BEST and options.trl_micro_batches else [v])]
    micro_batch_of = {trl_best_at(m): m for m in options.trl_micro_batches or ()}
    runs: dict[str, list[dict]] = {v: [] for v in runs_order}
    for repeat in range(options.repeats):
        for variant in runs_order:
            log(f"[{repeat + 1}/{options.repeats}] {variant}: {size.steps} steps...")
            verbose = options.onednn_verbose if variant == "cpuft" and repeat == 0 else None
            spec = {**common, "run_dir": str(work / f"run-{variant}-{repeat}")}
            if variant in micro_batch_of:
                spec["trl_micro_batch"] = micro_batch_of[variant]
            result = run_in_worker(work, variant, spec, onednn_verbose=verbose)
            runs[variant].append(result)
            held_out = (f"held-out reward accuracy {result['eval_reward_accuracy']:.3f}" if dpo
                        else f"eval loss {result['eval_loss']:.4f}")
            log(f"    {result['tokens_per_second']:.0f} tok/s, step {result['median_step_seconds']:.2f} s,"
                f" peak RSS {result['peak_rss_bytes'] / 2**20:.0f} MiB, {held_out}")

    command = (f"cpuft bench --job {options.job} --size {options.size} --steps {size.steps}"
               f" --variants {','.join(variants)} --repeats {options.repeats}"
               + (f" --dataset {options.dataset}" if options.dataset else "")
               + (f" --trl-micro-batches {','.join(map(str, options.trl_micro_batches))}"
                  if options.trl_micro_batches else ""))
    report = build_report(command, options.size, size, machine, gemm, runs, data_note, job=options.job)
    atomic_write_json(out_dir / "bench.json", report)
    write_bench_chart(report, out_dir / "bench.png")
    return report


def _checked_size(options: BenchOptions) -> BenchSize:
    """The size to run, with --steps applied; UserError on any bad option, before anything runs."""
    if options.job not in JOBS:
        raise UserError(f"unknown bench job {options.job!r}: choose {', '.join(JOBS)}.")
    if options.size not in SIZES:
        raise UserError(f"unknown bench size {options.size!r}: choose {', '.join(SIZES)}.")
    known = (*job_variants(options.job), *CPUFT_FORCED_DTYPES)
    unknown = [v for v in options.variants or () if v not in known]
    if unknown:
        raise UserError(f"unknown bench variant(s) {', '.join(unknown)} for --job {options.job}:"
                        f" choose from {', '.join(known)}.")
    if options.trl_micro_batches is not None:
        _check_trl_micro_batches(options)
    if options.repeats < 1:
        raise UserError(f"--repeats must be at least 1, got {options.repeats}.")
    size = SIZES[options.size]
    if options.steps is not None:
        if options.steps < 1:
            raise UserError(f"--steps must be at least 1, got {options.steps}.")
        size = replace(size, steps=options.steps)
    return size


def _check_trl_micro_batches(options: BenchOptions) -> None:
    """UserError unless --trl-micro-batches lists distinct sizes >= 1 for an SFT bench that runs trl_best."""
    batches = options.trl_micro_batches
    if options.job != "sft":
        raise UserError("--trl-micro-batches sizes trl_best's packed micro-batches, an SFT bench's (--job sft);"
                        " DPOTrainer has no packing.")
    if not batches or any(m < 1 for m in batches) or len(set(batches)) != len(batches):
        raise UserError(f"--trl-micro-batches must list distinct sizes of at least 1, e.g. 1,2,4; got"
                        f" {','.join(map(str, batches))}.")
    if options.variants is not None and TRL_BEST not in options.variants:
        raise UserError(f"--trl-micro-batches sizes {TRL_BEST}, which --variants {','.join(options.variants)} leaves out.")


def bench_model(work: Path, size_name: str, size: BenchSize, log) -> Path:
    """The size's random-init model, its BPE trained on synthetic text; rebuilt only when its spec changes."""
    from cpuft.testing.tiny_model import build_tiny_model

    model_dir = work / f"model-{size_name}"
    spec_path = model_dir / "bench_spec.json"
    wanted = json.dumps(describe_model(size.model), sort_keys=True)
    if not (spec_path.is_file() and spec_path.read_text() == wanted):
        log(f"building the {size_name} model in {model_dir}...")
        texts = [m["content"] for row in synthetic_conversations(2000, 7, size.median_reply_words) for m in row["messages"]]
        if isinstance(size.model, PublishedShape):
            _build_published_shape(model_dir, texts, size.model)
        else:
            build_tiny_model(model_dir, texts=texts, spec=size.model)
        atomic_write_text(spec_path, wanted)
    return model_dir


def _build_published_shape(model_dir: Path, texts: list[str], shape: PublishedShape) -> None:
    """A released architecture with random weights and the bench's small BPE tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    from cpuft.artifacts import atomic_directory
    from cpuft.testing.tiny_model import train_tokenizer

    tokenizer = train_tokenizer(texts, shape.tokenizer_vocab)
    torch.manual_seed(shape.seed)
    model = AutoModelForCausalLM.from_config(shape.config(tokenizer))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    with atomic_directory(model_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
