"""The trainer arguments: cpuft's Plan and job config turned into TRL's `SFTConfig`.

TRL's defaults assume a GPU (bf16 on, activation checkpointing on); here every hardware choice
comes from the Plan, which says why it made it. The job's own values, cpuft's deviations from
TRL's defaults and the pass-through fields come from cpuft.config.passthrough (`--help-trl` lists
them); this module adds what the plan and the run directory decide. The one place a job becomes
SFTConfig.
"""

from __future__ import annotations

import os
from pathlib import Path

from cpuft.config.passthrough import (
    build_library_config,
    sft_config_class,
    sft_config_kwargs,
)


def build_sft_config(config, plan, run_dir: Path):
    """SFTConfig for `config` (a cpuft.config.job.SFTJobConfig) run under `plan` into `run_dir`."""
    from cpuft.planning.memory import default_optimizer

    optimizer = default_optimizer(plan.device, plan.quantization) if config.optimizer == "auto" else config.optimizer
    # TensorBoard's writer reads its directory from the environment in transformers 5.
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(run_dir / "tensorboard")
    kwargs, source = sft_config_kwargs(config)
    kwargs.update(
        output_dir=str(run_dir),
        per_device_train_batch_size=plan.per_device_batch_size,
        per_device_eval_batch_size=plan.per_device_batch_size,
        gradient_accumulation_steps=plan.gradient_accumulation_steps,
        # TRL turns these on by default; the plan decides them (see cpuft.planning.plan for why).
        use_cpu=plan.device == "cpu",
        bf16=plan.compute_dtype == "bf16",
        fp16=plan.compute_dtype == "fp16",
        activation_checkpointing=plan.gradient_checkpointing,
        packing=plan.packing,  # TRL's "bfd": whole samples per row, padding-free batches
        torch_compile=plan.torch_compile,
        # Length grouping is cpuft's own order (cpuft.data.packing): transformers' sampler groups
        # too few batches on short runs to remove the padding.
        train_sampling_strategy="sequential" if plan.length_grouping else "random",
        dataloader_pin_memory=plan.device == "cuda",
        optim=optimizer,
    )
    return build_library_config(sft_config_class(), kwargs, source, config.origins)
