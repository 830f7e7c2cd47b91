"""The bench's worker protocol: one variant (or the GEMM measurement) per fresh process.

    python -m cpuft.bench.worker SPEC.json

The parent (`run_in_worker`) writes SPEC.json, which names the variant, its settings and a
`result_path`; the worker runs it and writes the result there as JSON; exit 0 means the result
is complete. A fresh process per variant keeps peak RSS, thread settings and imported state its
own. Variants: "gemm" (matmul FLOP/s, cpuft.hardware.gemm), "trl_defaults", "trl_tuned" and
"trl_best" (cpuft.bench.baselines; "trl_best_mbN" is trl_best with the spec's `trl_micro_batch`),
"cpuft", "cpuft_fp32" and "cpuft_bf16" (cpuft's own recipe, with the plan's dtype or the one named). A spec with
"job": "dpo" runs the DPO variants: plain TRL DPOTrainer (cpuft.bench.baselines) or `cpuft dpo`'s
stages (`cpuft_dpo_trainer`).

Limits: the worker's output goes to work/log-VARIANT.txt (or the --onednn-verbose file); a
failed worker raises RuntimeError in the parent with the log's last 30 lines.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from cpuft.artifacts import atomic_write_json


def run_in_worker(work: Path, variant: str, spec: dict, onednn_verbose: Path | None = None) -> dict:
    """Run `variant` with `spec` in a fresh Python process; its result."""
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
        proc = subprocess.run([sys.executable, "-m", "cpuft.bench.worker", str(spec_path)],
                              stdout=log_file, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0 or not result_path.is_file():
        tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-30:])
        raise RuntimeError(f"bench worker '{variant}' failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    return json.loads(result_path.read_text())


def run_variant(spec: dict) -> dict:
    """What the worker process computes for `spec` (in this process)."""
    variant = spec["variant"]
    if variant == "gemm":
        from cpuft.hardware.gemm import measure_gemm_flops

        return {d: measure_gemm_flops(spec["m"], spec["k"], spec["n"], d, spec["threads"]).to_dict()
                for d in spec["dtypes"]}
    from cpuft.bench.measure import train_and_measure
    from cpuft.bench.sizes import CPUFT_FORCED_DTYPES, TRL_BEST

    cpuft_variant = variant == "cpuft" or variant in CPUFT_FORCED_DTYPES
    dtype = CPUFT_FORCED_DTYPES.get(variant, "auto")
    if spec.get("job") == "dpo":
        if cpuft_variant:
            trainer, model_facts, plan_facts = cpuft_dpo_trainer(spec, dtype=dtype)
        else:
            from cpuft.bench.baselines import plain_trl_dpo_trainer

            trainer, model_facts, plan_facts = plain_trl_dpo_trainer(spec, variant)
    elif cpuft_variant:
        trainer, model_facts, plan_facts = cpuft_trainer(spec, dtype=dtype)
    else:
        from cpuft.bench.baselines import plain_trl_trainer

        # trl_best_mbN: trl_best at the spec's micro-batch, recorded under its own name.
        trainer, model_facts, plan_facts = plain_trl_trainer(spec, TRL_BEST if spec.get("trl_micro_batch") else variant)
    return train_and_measure(trainer, spec, model_facts, plan_facts)


def job_keys(spec: dict, dtype: str = "auto") -> dict:
    """The config keys every cpuft variant runs the bench's job with (SFT and DPO alike)."""
    return dict(
        model=spec["model"], dataset=spec["train"], eval_fraction=0.0,
        output_dir=spec["run_dir"], max_steps=spec["steps"], max_length=spec["max_length"],
        per_device_batch_size=spec["batch_size"], gradient_accumulation_steps=spec["accumulation"],
        learning_rate=spec["learning_rate"], lr_scheduler_type=spec["lr_scheduler_type"],
        warmup_steps=spec["warmup_steps"], weight_decay=spec["weight_decay"], seed=spec["seed"],
        lora_r=spec["lora_r"], lora_alpha=spec["lora_alpha"], lora_dropout=spec["lora_dropout"],
        lora_target_modules=spec["lora_target_modules"], save_steps=spec["steps"] + 1,
        device="cpu", dtype=dtype,
    )


def cpuft_trainer(spec: dict, plan_overrides: dict | None = None, dtype: str = "auto"):
    """cpuft's own recipe through its public stages (cpuft.train.sft), as `cpuft sft` runs it, with the plan it picks here
    (`plan_overrides`, e.g. {"fused_lora": False}: that plan field replaced, to measure a candidate); `dtype`
    the job's dtype key ("auto", "bf16", "fp32")."""
    from dataclasses import asdict

    from cpuft.config.job import SFTJobConfig
    from cpuft.hardware.probe import probe_machine
    from cpuft.train.peft_methods import method_callbacks
    from cpuft.train.sft import build_trainer, prepare_run

    config = SFTJobConfig(
        **job_keys(spec, dtype), dataset_format="messages",
        loss_on="all",  # the TRL variants train every token: same tokens, same loss, comparable
    )
    run = prepare_run(config, probe_machine(), log=lambda *a, **k: None)
    if plan_overrides:
        run = run.with_plan(**plan_overrides)
    run.run_dir.write_header(run.job, run.machine, run.plan)
    # The bench times the steps with its own MetricsCallback (cpuft.bench.measure), as for TRL's variants.
    trainer = build_trainer(run, method_callbacks(run.job))
    plan = run.plan
    plan_facts = {"compute_dtype": plan.compute_dtype, "compute_dtype_reason": plan.reasons.get("compute_dtype"),
                  "gradient_checkpointing": plan.gradient_checkpointing,
                  "threads": plan.threads, "sampling": trainer.args.train_sampling_strategy,
                  "packing": plan.packing, "torch_compile": bool(trainer.args.torch_compile),
                  "optimizer": getattr(trainer.args.optim, "value", trainer.args.optim),
                  "cpu_lm_head": plan.cpu_lm_head, "fused_lora": plan.fused_lora,
                  "compiled_elementwise": plan.compiled_elementwise, "short_row_attention": plan.short_row_attention,
                  # The time plan `cpuft sft` printed, against which the bench's train_seconds is checked.
                  "planned_train_seconds": run.time_estimate.total_seconds if run.time_estimate else None,
                  "planned_parts_seconds": run.time_estimate.parts_seconds if run.time_estimate else None}
    # The base model as loaded, before SFTTrainer injected the LoRA layers.
    return trainer, asdict(run.model_facts), plan_facts


def cpuft_dpo_trainer(spec: dict, dtype: str = "auto"):
    """`cpuft dpo`'s recipe through its own stages (cpuft.train.dpo.prepare_dpo_run, then
    cpuft.train.sft.build_trainer, which assembles its DPOTrainer), with the plan it picks here."""
    from dataclasses import asdict

    from cpuft.config.job import DPOJobConfig
    from cpuft.hardware.probe import probe_machine
    from cpuft.train.dpo import prepare_dpo_run
    from cpuft.train.peft_methods import method_callbacks
    from cpuft.train.sft import build_trainer

    config = DPOJobConfig(**job_keys(spec, dtype))
    run = prepare_dpo_run(config, probe_machine(), log=lambda *a, **k: None)
    run.run_dir.write_header(run.job, run.machine, run.plan)
    # The bench times the steps with its own MetricsCallback (cpuft.bench.measure), as for TRL's variants.
    trainer = build_trainer(run, method_callbacks(run.job))
    plan, args = run.plan, trainer.args
    plan_facts = {"compute_dtype": plan.compute_dtype, "compute_dtype_reason": plan.reasons.get("compute_dtype"),
                  "gradient_checkpointing": plan.gradient_checkpointing,
                  "threads": plan.threads, "sampling": args.train_sampling_strategy,
                  "length_grouping": plan.length_grouping, "packing": False,
                  "weights_dtype": plan.weights_dtype, "batch_size": args.per_device_train_batch_size,
                  "accumulation": args.gradient_accumulation_steps,
                  "torch_compile": bool(args.torch_compile), "optimizer": getattr(args.optim, "value", args.optim),
                  "cpu_lm_head": plan.cpu_lm_head, "fused_lora": plan.fused_lora,
                  "precompute_ref_log_probs": bool(args.precompute_ref_log_probs), "beta": args.beta,
                  "loss_type": list(args.loss_type),
                  # The time plan `cpuft dpo` printed, against which the bench's train_seconds is checked.
                  "planned_train_seconds": run.time_estimate.total_seconds if run.time_estimate else None}
    return trainer, asdict(run.model_facts), plan_facts


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m cpuft.bench.worker SPEC.json (the parent is `cpuft bench`)", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    started = time.perf_counter()
    result = run_variant(spec)
    if "variant" in result:
        result["worker_wall_seconds"] = time.perf_counter() - started
    atomic_write_json(spec["result_path"], result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
