"""The trainer arguments: cpuft's Plan and job config turned into TRL's `SFTConfig`.

TRL's defaults assume a GPU (bf16 on, activation checkpointing on); here every hardware choice
comes from the Plan, which says why it made it. This is the one place a job becomes SFTConfig.
"""

from __future__ import annotations

import os
from pathlib import Path


def build_sft_config(config, plan, run_dir: Path):
    """SFTConfig for `config` (a cpuft.config.job.SFTJobConfig) run under `plan` into `run_dir`."""
    from trl import SFTConfig

    from cpuft.planning.memory import default_optimizer

    optimizer = default_optimizer(plan.device, plan.quantization) if config.optimizer == "auto" else config.optimizer
    # TensorBoard's writer reads its directory from the environment in transformers 5.
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(run_dir / "tensorboard")
    return SFTConfig(
        output_dir=str(run_dir),
        max_steps=config.max_steps,
        num_train_epochs=config.num_train_epochs,
        per_device_train_batch_size=plan.per_device_batch_size,
        per_device_eval_batch_size=plan.per_device_batch_size,
        gradient_accumulation_steps=plan.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler_type,
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        seed=config.seed,
        data_seed=config.seed,
        logging_steps=config.logging_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        report_to=["tensorboard"],
        # TRL turns these on by default; the plan decides them (see plan.py for why).
        use_cpu=plan.device == "cpu",
        bf16=plan.compute_dtype == "bf16",
        fp16=plan.compute_dtype == "fp16",
        activation_checkpointing=plan.gradient_checkpointing,
        packing=plan.packing,  # TRL's "bfd": whole samples per row, padding-free batches
        torch_compile=plan.torch_compile,
        # Length grouping is cpuft's own order (cpuft.data.packing): transformers' sampler groups
        # too few batches on short runs to remove the padding.
        train_sampling_strategy="sequential" if plan.length_grouping else "random",
        max_length=config.max_length,
        assistant_only_loss=config.assistant_only_loss,
        eval_strategy="no",
        dataloader_pin_memory=plan.device == "cuda",
        disable_tqdm=True,  # MetricsCallback draws the bar, with tokens/s
        optim=optimizer,
    )
