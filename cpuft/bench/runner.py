"""`cpuft bench`: the same LoRA SFT job run three ways, each in its own process, side by side.

Variants (same model, LoRA settings, data, max_length, optimizer hyperparameters, steps, seed
and batch; only what the variant's name says differs):
- trl_defaults: plain TRL SFTTrainer + PEFT as a newcomer runs it on a CPU. TRL's SFTConfig
  turns bf16 autocast and gradient checkpointing on by default; bf16 is emulated on CPUs
  without AMX/AVX512-BF16, and checkpointing recomputes the forward pass.
- trl_tuned: plain TRL tuned by hand for this CPU: fp32 where bf16 is not native, gradient
  checkpointing off, one thread per physical core.
- cpuft: `cpuft sft`'s own recipe (SFTRecipe) with the plan it chooses for this machine.
- cpuft_fp32: only on CPUs with native bf16 (AMX/AVX512-BF16): cpuft forced to fp32, so the
  report shows bf16 against fp32 on that machine.

Each variant runs in a fresh `python -m cpuft.bench.runner --worker SPEC` process, so peak RSS and
thread settings are its own. The parent also measures this machine's matmul FLOP/s (fp32, and
bf16 where native) at the model's MLP shape, in a process of its own, and reports each run's
MFU against that measured peak (not a datasheet number).

Measured per variant: non-padding tokens/s (TRL's `num_tokens`: the attention-mask sum),
median optimizer-step time (first step excluded: warm-up), peak RSS, the padding fraction of
the batches, final train loss (mean of the last quarter of steps) and held-out loss (the same
fp32 evaluation, sample by sample, for every variant). Ratios against cpuft are top-level
numbers in bench.json; bench.png charts them.

Data: synthetic conversations with LIMA-like lengths (log-normal, long tail), generated from a
fixed seed, so the bench runs offline and is reproducible; `--dataset FILE` uses your own.
Timings on a shared machine are noisy: use `--repeats` (variants interleaved A B C A B C,
medians reported) and rerun on a quiet machine before quoting a number.
"""

from __future__ import annotations

import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from cpuft.artifacts import atomic_write_json, atomic_write_text, save_figure
from cpuft.errors import UserError
from cpuft.testing.tiny_model import TinyModelSpec

VARIANTS = ("trl_defaults", "trl_tuned", "cpuft")
# Shared by every variant: the bench compares execution, not optimisation recipes.
OPTIMIZER_SETTINGS = dict(learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=0.1, weight_decay=0.0)
LORA_SETTINGS = dict(lora_r=16, lora_alpha=32, lora_dropout=0.05, lora_target_modules="all-linear")


@dataclass(frozen=True)
class BenchSize:
    model: TinyModelSpec
    steps: int
    batch_size: int
    accumulation: int
    max_length: int
    median_reply_words: int  # the synthetic data's median assistant reply
    eval_samples: int


SIZES = {
    # CI smoke test: seconds per variant; its timings mean little.
    "tiny": BenchSize(
        model=TinyModelSpec(vocab_size=1024, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                            intermediate_size=172),
        steps=3, batch_size=4, accumulation=1, max_length=128, median_reply_words=30, eval_samples=8,
    ),
    # The headline: ~95M parameters (12 x 768, GQA 12/4 heads, MLP 2560; the BPE trained on the
    # synthetic text stops at ~6.4k of the 8192 vocabulary asked for).
    "100m": BenchSize(
        model=TinyModelSpec(vocab_size=8192, hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=4,
                            intermediate_size=2560),
        steps=8, batch_size=8, accumulation=1, max_length=512, median_reply_words=110, eval_samples=16,
    ),
}


# ============================================================================ data


def synthetic_conversations(count: int, seed: int, median_reply_words: int) -> list[dict]:
    """`count` user/assistant conversations in TRL's messages format, reproducible from `seed`.

    Words follow a fixed random bigram chain over a pseudo-word lexicon (so there is something
    to learn); lengths are log-normal like instruction data (most replies short, a long tail),
    which is what makes padding expensive for naive batching.
    """
    rng = random.Random(seed)
    lexicon = _lexicon(random.Random(1234), 3000)
    successors = [[rng.randrange(len(lexicon)) for _ in range(6)] for _ in lexicon]
    rows = []
    for _ in range(count):
        prompt_words = _lognormal_words(rng, median_reply_words / 4, 0.6)
        reply_words = _lognormal_words(rng, median_reply_words, 0.9)
        rows.append({
            "messages": [
                {"role": "user", "content": _bigram_text(rng, lexicon, successors, prompt_words) + "?"},
                {"role": "assistant", "content": _bigram_text(rng, lexicon, successors, reply_words) + "."},
            ]
        })
    return rows


def _lexicon(rng: random.Random, size: int) -> list[str]:
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    words: set[str] = set()
    while len(words) < size:
        words.add("".join(rng.choice(syllables) for _ in range(rng.choice((1, 2, 2, 3)))))
    return sorted(words)


def _lognormal_words(rng: random.Random, median: float, sigma: float) -> int:
    return max(3, int(rng.lognormvariate(math.log(max(median, 1.0)), sigma)))


def _bigram_text(rng: random.Random, lexicon: list[str], successors: list[list[int]], words: int) -> str:
    current = rng.randrange(len(lexicon))
    out = []
    for _ in range(words):
        out.append(lexicon[current])
        current = rng.choice(successors[current]) if rng.random() < 0.85 else rng.randrange(len(lexicon))
    return " ".join(out)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def _read_jsonl(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ============================================================================ parent: orchestrate


@dataclass
class BenchOptions:
    size: str = "tiny"
    out_dir: Path = Path("bench-results")
    steps: int | None = None
    variants: tuple[str, ...] = VARIANTS
    repeats: int = 1
    dataset: str | None = None  # a messages-format .jsonl; default: synthetic
    onednn_verbose: Path | None = None
    seed: int = 42


def run_bench(options: BenchOptions, log=print) -> dict:
    """Run every variant (interleaved, `repeats` times), measure GEMM peak, write bench.json/png."""
    from cpuft.hardware.probe import probe_machine
    from cpuft.planning.plan import PlanRequest, plan_for

    if options.size not in SIZES:
        raise UserError(f"unknown bench size {options.size!r}: choose {', '.join(SIZES)}.")
    unknown = [v for v in options.variants if v not in (*VARIANTS, "cpuft_fp32")]
    if unknown:
        raise UserError(f"unknown bench variant(s) {', '.join(unknown)}: choose from {', '.join(VARIANTS)}.")
    if options.repeats < 1:
        raise UserError(f"--repeats must be at least 1, got {options.repeats}.")
    size = SIZES[options.size]
    if options.steps is not None:
        if options.steps < 1:
            raise UserError(f"--steps must be at least 1, got {options.steps}.")
        size = replace(size, steps=options.steps)

    machine = probe_machine()
    threads = plan_for(machine, PlanRequest(device="cpu")).threads
    variants = list(options.variants)
    if machine.native_bf16 and "cpuft" in variants and "cpuft_fp32" not in variants:
        variants.append("cpuft_fp32")  # bf16 against fp32 where bf16 is real

    out_dir = Path(options.out_dir)
    work = out_dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    model_dir, train_path, eval_path, data_note = _prepare_inputs(work, size, options, log)

    log(f"measuring GEMM peak ({threads} threads)...")
    tokens_per_microbatch = size.batch_size * size.max_length // 2
    gemm = _run_worker(work, "gemm", {
        "m": tokens_per_microbatch, "k": size.model.hidden_size, "n": size.model.intermediate_size,
        "threads": threads, "dtypes": ["fp32", "bf16"] if machine.native_bf16 else ["fp32"],
    }, log)

    common = {
        "model": str(model_dir), "train": str(train_path), "eval": str(eval_path),
        "steps": size.steps, "batch_size": size.batch_size, "accumulation": size.accumulation,
        "max_length": size.max_length, "seed": options.seed, "threads": threads,
        "native_bf16": machine.native_bf16, **OPTIMIZER_SETTINGS, **LORA_SETTINGS,
    }
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for repeat in range(options.repeats):
        for variant in variants:
            log(f"[{repeat + 1}/{options.repeats}] {variant}: {size.steps} steps...")
            verbose = options.onednn_verbose if variant == "cpuft" and repeat == 0 else None
            result = _run_worker(work, variant, {**common, "run_dir": str(work / f"run-{variant}-{repeat}")},
                                 log, onednn_verbose=verbose)
            runs[variant].append(result)
            log(f"    {result['tokens_per_second']:.0f} tok/s, step {result['median_step_seconds']:.2f} s,"
                f" peak RSS {result['peak_rss_bytes'] / 2**20:.0f} MiB, eval loss {result['eval_loss']:.4f}")

    report = _report(options, size, machine, gemm, runs, data_note)
    atomic_write_json(out_dir / "bench.json", report)
    write_bench_chart(report, out_dir / "bench.png")
    return report


def _prepare_inputs(work: Path, size: BenchSize, options: BenchOptions, log) -> tuple[Path, Path, Path, str]:
    from cpuft.testing.tiny_model import build_tiny_model

    train_count = size.steps * size.batch_size * size.accumulation
    if options.dataset:
        path = Path(options.dataset)
        if not path.is_file():
            raise UserError(f"--dataset {path} does not exist (a messages-format .jsonl file).")
        rows = _read_jsonl(path)
        if not rows or "messages" not in rows[0]:
            raise UserError(f"--dataset {path}: expected rows like {{\"messages\": [...]}} (TRL's messages format).")
        needed = train_count + size.eval_samples
        if len(rows) < needed:
            raise UserError(f"--dataset {path} has {len(rows)} rows; this bench needs {needed}.")
        note = f"{path}: first {train_count} rows train, next {size.eval_samples} evaluate"
    else:
        rows = synthetic_conversations(train_count + size.eval_samples, options.seed, size.median_reply_words)
        note = (f"synthetic: {train_count} train / {size.eval_samples} eval conversations, log-normal lengths,"
                f" median reply {size.median_reply_words} words (seed {options.seed})")
    train_path, eval_path = work / "train.jsonl", work / "eval.jsonl"
    # Exactly one epoch: every variant trains on the same rows, only their order differs.
    _write_jsonl(train_path, rows[:train_count])
    _write_jsonl(eval_path, rows[train_count:train_count + size.eval_samples])

    model_dir = work / f"model-{options.size}"
    spec_path = model_dir / "bench_spec.json"
    wanted = json.dumps(asdict(size.model), sort_keys=True)
    if not (spec_path.is_file() and spec_path.read_text() == wanted):
        log(f"building the {options.size} model in {model_dir}...")
        texts = [m["content"] for row in synthetic_conversations(2000, 7, size.median_reply_words) for m in row["messages"]]
        build_tiny_model(model_dir, texts=texts, spec=size.model)
        atomic_write_text(spec_path, wanted)
    return model_dir, train_path, eval_path, note


def _run_worker(work: Path, variant: str, spec: dict, log, onednn_verbose: Path | None = None) -> dict:
    spec_path = work / f"spec-{variant}.json"
    result_path = work / f"result-{variant}.json"
    result_path.unlink(missing_ok=True)
    atomic_write_json(spec_path, {**spec, "variant": variant, "result_path": str(result_path)})
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1")
    log_path = Path(onednn_verbose) if onednn_verbose else work / f"log-{variant}.txt"
    if onednn_verbose:
        env["ONEDNN_VERBOSE"] = "1"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log_file:
        proc = subprocess.run([sys.executable, "-m", "cpuft.bench.runner", "--worker", str(spec_path)],
                              stdout=log_file, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0 or not result_path.is_file():
        tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-30:])
        raise RuntimeError(f"bench worker '{variant}' failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    return json.loads(result_path.read_text())


def _median_run(results: list[dict]) -> dict:
    """The variant's numbers: medians over repeats, plus every repeat's tokens/s."""
    keys = ("tokens_per_second", "median_step_seconds", "train_seconds", "peak_rss_bytes", "final_loss",
            "eval_loss", "padding_fraction", "achieved_flops_per_second")
    merged = dict(results[0])
    for key in keys:
        values = [r[key] for r in results if r.get(key) is not None]
        merged[key] = statistics.median(values) if values else None
    merged["repeats"] = len(results)
    merged["tokens_per_second_each_repeat"] = [r["tokens_per_second"] for r in results]
    return merged


def _report(options: BenchOptions, size: BenchSize, machine, gemm: dict, runs: dict, data_note: str) -> dict:
    variants = {name: _median_run(results) for name, results in runs.items() if results}
    for name, run in variants.items():
        peak = gemm["bf16" if run.get("compute_dtype") == "bf16" and "bf16" in gemm else "fp32"]["flops_per_second"]
        run["gemm_peak_flops_per_second"] = peak
        run["mfu_vs_measured_gemm"] = run["achieved_flops_per_second"] / peak if peak else None

    def ratio(a: str, b: str, key: str) -> float | None:
        if a in variants and b in variants and variants[b].get(key):
            return variants[a][key] / variants[b][key]
        return None

    def loss_gap(a: str, b: str) -> float | None:
        if a in variants and b in variants:
            return (variants[a]["eval_loss"] - variants[b]["eval_loss"]) / variants[b]["eval_loss"]
        return None

    command = f"cpuft bench --size {options.size} --steps {size.steps} --repeats {options.repeats}" + (
        f" --dataset {options.dataset}" if options.dataset else "")
    return {
        "command": command,
        "size": options.size,
        "model": {**asdict(size.model), "total_params": next(iter(variants.values()))["total_params"]},
        "steps": size.steps, "batch_size": size.batch_size, "accumulation": size.accumulation,
        "max_length": size.max_length, "data": data_note,
        "optimizer": OPTIMIZER_SETTINGS, "lora": LORA_SETTINGS,
        "machine": machine.to_dict(),
        "load_average_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "gemm": gemm,
        # The headline ratios, as plain top-level numbers.
        "speedup_vs_trl_tuned": ratio("cpuft", "trl_tuned", "tokens_per_second"),
        "speedup_vs_trl_defaults": ratio("cpuft", "trl_defaults", "tokens_per_second"),
        "trl_tuned_speedup_vs_trl_defaults": ratio("trl_tuned", "trl_defaults", "tokens_per_second"),
        "eval_loss_rel_diff_vs_trl_tuned": loss_gap("cpuft", "trl_tuned"),
        "eval_loss_rel_diff_vs_trl_defaults": loss_gap("cpuft", "trl_defaults"),
        "peak_rss_ratio_vs_trl_tuned": ratio("cpuft", "trl_tuned", "peak_rss_bytes"),
        "peak_rss_ratio_vs_trl_defaults": ratio("cpuft", "trl_defaults", "peak_rss_bytes"),
        "bf16_speedup_vs_fp32": ratio("cpuft", "cpuft_fp32", "tokens_per_second"),
        "cpuft_mfu_vs_measured_gemm": variants.get("cpuft", {}).get("mfu_vs_measured_gemm"),
        "variants": variants,
    }


def write_bench_chart(report: dict, path: Path) -> None:
    """Two panels: non-padding tokens/s (with the ratio to cpuft and MFU) and peak RSS."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["variants"])
    runs = [report["variants"][n] for n in names]
    colors = ["#2a7ab9" if n.startswith("cpuft") else "#999999" for n in names]
    fig, (speed_ax, rss_ax) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=100)
    speeds = [r["tokens_per_second"] for r in runs]
    bars = speed_ax.bar(names, speeds, color=colors)
    cpuft_speed = report["variants"].get("cpuft", {}).get("tokens_per_second")
    for bar, run in zip(bars, runs):
        label = f"{run['tokens_per_second']:.0f}"
        if cpuft_speed:
            label += f"\ncpuft {cpuft_speed / run['tokens_per_second']:.2f}x"
        if run.get("mfu_vs_measured_gemm") is not None:
            label += f"\nMFU {run['mfu_vs_measured_gemm']:.0%}"
        speed_ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                          ha="center", va="bottom", fontsize=8)
    speed_ax.set_ylabel("non-padding tokens / s")
    speed_ax.set_ylim(0, max(speeds) * 1.35)
    speed_ax.set_title(f"{report['size']}: {report['model']['total_params'] / 1e6:.1f}M params, {report['steps']} steps")
    rss = [r["peak_rss_bytes"] / 2**20 for r in runs]
    rss_ax.bar(names, rss, color=colors)
    for x, value in enumerate(rss):
        rss_ax.annotate(f"{value:.0f}", (x, value), ha="center", va="bottom", fontsize=8)
    rss_ax.set_ylabel("peak RSS (MiB)")
    rss_ax.set_ylim(0, max(rss) * 1.2)
    for ax in (speed_ax, rss_ax):
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    save_figure(fig, path)


# ============================================================================ worker: one variant


def run_worker(spec: dict) -> dict:
    variant = spec["variant"]
    if variant == "gemm":
        from cpuft.hardware.gemm import measure_gemm_flops

        return {d: measure_gemm_flops(spec["m"], spec["k"], spec["n"], d, spec["threads"]).to_dict()
                for d in spec["dtypes"]}
    if variant in ("cpuft", "cpuft_fp32"):
        trainer, model_facts, plan_facts = _cpuft_trainer(spec, force_fp32=variant == "cpuft_fp32")
    else:
        trainer, model_facts, plan_facts = _plain_trl_trainer(spec, tuned=variant == "trl_tuned")
    return _train_and_measure(trainer, spec, model_facts, plan_facts)


def _plain_trl_trainer(spec: dict, tuned: bool):
    """Plain TRL + PEFT: what a user writes from TRL's docs, with or without CPU tuning."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from cpuft.planning.flops import linear_parameter_count

    if tuned:
        torch.set_num_threads(spec["threads"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"])
    facts = _model_facts(model, linear_parameter_count(model))
    kwargs: dict[str, Any] = dict(
        output_dir=spec["run_dir"], max_steps=spec["steps"], per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=spec["accumulation"], learning_rate=spec["learning_rate"],
        lr_scheduler_type=spec["lr_scheduler_type"], warmup_steps=spec["warmup_steps"],
        weight_decay=spec["weight_decay"], seed=spec["seed"], max_length=spec["max_length"],
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
    )
    if tuned:
        native = spec["native_bf16"]
        kwargs.update(bf16=native, gradient_checkpointing=False)
    args = SFTConfig(**kwargs)
    lora = LoraConfig(r=spec["lora_r"], lora_alpha=spec["lora_alpha"], lora_dropout=spec["lora_dropout"],
                      target_modules=spec["lora_target_modules"], task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(_read_jsonl(spec["train"])),
                         processing_class=tokenizer, peft_config=lora)
    plan = {"compute_dtype": "bf16" if args.bf16 else "fp32", "gradient_checkpointing": bool(args.gradient_checkpointing),
            "threads": torch.get_num_threads(), "sampling": args.train_sampling_strategy, "packing": bool(args.packing)}
    return trainer, facts, plan


def _cpuft_trainer(spec: dict, force_fp32: bool):
    """cpuft's own recipe, exactly as `cpuft sft` runs it, with the plan it picks here."""
    from cpuft.config.job import SFTJobConfig
    from cpuft.hardware.probe import probe_machine
    from cpuft.train.recipe import SFTRecipe

    config = SFTJobConfig(
        model=spec["model"], dataset=spec["train"], dataset_format="messages", eval_fraction=0.0,
        output_dir=spec["run_dir"], max_steps=spec["steps"], max_length=spec["max_length"],
        per_device_batch_size=spec["batch_size"], gradient_accumulation_steps=spec["accumulation"],
        learning_rate=spec["learning_rate"], lr_scheduler_type=spec["lr_scheduler_type"],
        warmup_steps=spec["warmup_steps"], weight_decay=spec["weight_decay"], seed=spec["seed"],
        lora_r=spec["lora_r"], lora_alpha=spec["lora_alpha"], lora_dropout=spec["lora_dropout"],
        lora_target_modules=spec["lora_target_modules"], save_steps=spec["steps"] + 1,
        device="cpu", dtype="fp32" if force_fp32 else "auto",
    )
    recipe = SFTRecipe(config, probe_machine(), show_progress=False, log=lambda *a, **k: None)
    recipe.setup()
    recipe._write_run_header()
    trainer = recipe.build_trainer()
    # SFTTrainer injected the LoRA layers into recipe.model; count the base model as loaded.
    facts = {**_model_facts(recipe.model, recipe.linear_params), "total_params": recipe.total_params}
    plan = recipe.plan
    facts_plan = {"compute_dtype": plan.compute_dtype, "gradient_checkpointing": plan.gradient_checkpointing,
                  "threads": plan.threads, "sampling": trainer.args.train_sampling_strategy,
                  "packing": plan.packing, "torch_compile": bool(trainer.args.torch_compile)}
    return trainer, facts, facts_plan


def _model_facts(model, linear_params: int) -> dict:
    config = model.config
    return {"linear_params": linear_params, "total_params": sum(p.numel() for p in model.parameters()),
            "num_layers": config.num_hidden_layers, "hidden_size": config.hidden_size}


class _CountingCollator:
    """Wraps the trainer's collator to count padded and real tokens in every training batch."""

    def __init__(self, inner):
        self.inner = inner
        self.slots = 0
        self.real = 0

    def __call__(self, examples):
        batch = self.inner(examples)
        labels = batch["input_ids"]
        self.slots += labels.numel()
        if "attention_mask" in batch:
            self.real += int(batch["attention_mask"].sum())
        else:  # padding-free: one flattened row, padded only to pad_to_multiple_of
            self.real += int(sum(len(e["input_ids"]) for e in examples))
        return batch


def _train_and_measure(trainer, spec: dict, model_facts: dict, plan_facts: dict) -> dict:
    import torch

    from cpuft.hardware.usage import peak_rss_bytes
    from cpuft.planning.flops import training_flops_per_token
    from cpuft.train.callbacks import MetricsCallback

    run_dir = Path(spec["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics = MetricsCallback(run_dir / "bench_metrics.jsonl", show_progress=False)
    trainer.add_callback(metrics)
    counter = _CountingCollator(trainer.data_collator)
    trainer.data_collator = counter
    trainer.train()

    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    logs = [r for r in metrics.records if "loss" in r]
    step_times = [b["elapsed_seconds"] - a["elapsed_seconds"] for a, b in zip(logs, logs[1:])]
    tokens = metrics.train_tokens
    seconds = metrics.train_seconds
    samples = spec["steps"] * spec["batch_size"] * spec["accumulation"]
    flops_per_token = training_flops_per_token(
        model_facts["linear_params"], trainable, model_facts["num_layers"], model_facts["hidden_size"],
        tokens / samples, full_finetune=False, gradient_checkpointing=False,
    )
    tail = [r["loss"] for r in logs[-max(1, len(logs) // 4):]]
    return {
        "variant": spec["variant"], **plan_facts, **model_facts, "trainable_params": trainable,
        "steps": trainer.state.global_step, "train_tokens": tokens, "train_seconds": seconds,
        "tokens_per_second": tokens / seconds,
        "median_step_seconds": statistics.median(step_times) if step_times else seconds,
        "first_step_seconds": logs[0]["elapsed_seconds"] if logs else None,
        "padding_fraction": 1.0 - counter.real / counter.slots if counter.slots else None,
        "first_loss": logs[0]["loss"] if logs else None,
        "final_loss": statistics.fmean(tail) if tail else None,
        "eval_loss": heldout_loss(trainer.model, trainer.processing_class, _read_jsonl(spec["eval"]), spec["max_length"]),
        "flops_per_token": flops_per_token,
        "achieved_flops_per_second": flops_per_token * tokens / seconds,
        "peak_rss_bytes": peak_rss_bytes(),
        "torch_threads": torch.get_num_threads(),
    }


def heldout_loss(model, tokenizer, rows: list[dict], max_length: int) -> float:
    """Token-weighted next-token loss over `rows`, one sample at a time in fp32: no padding, no
    autocast, identical for every variant."""
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        for row in rows:
            ids = tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True)["input_ids"]
            ids = torch.tensor([list(ids)[:max_length]])
            out = model(input_ids=ids, labels=ids, use_cache=False)
            n = ids.shape[1] - 1
            total += float(out.loss) * n
            count += n
    return total / count


def _worker_main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    started = time.perf_counter()
    result = run_worker(spec)
    result_wall = time.perf_counter() - started
    if isinstance(result, dict) and "variant" in result:
        result["worker_wall_seconds"] = result_wall
    atomic_write_json(spec["result_path"], result)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        raise SystemExit(_worker_main(sys.argv[2]))
    print("usage: cpuft bench ... (this module's entry point is the bench's worker)", file=sys.stderr)
    raise SystemExit(2)
