"""The trainer arguments: cpuft's Plan and job config turned into TRL's `SFTConfig` (causal LMs)
or transformers' `Seq2SeqTrainingArguments` (encoder-decoders: cpuft.train.seq2seq).

TRL's defaults assume a GPU (bf16 on, activation checkpointing on); here every hardware choice
comes from the Plan, which says why it made it. The job's own values and the pass-through fields
come from cpuft.config.passthrough, cpuft's deviations from TRL's defaults are the defaults of
cpuft.config.trl_config's `CpuftSFTConfig` (the class built here; `--help-trl` lists them);
`plan_training_kwargs` adds what the plan and the run directory decide, the same for both
argument classes. The one place a job becomes SFTConfig or Seq2SeqTrainingArguments.

Seq2SeqTrainingArguments lacks SFTConfig's data fields (max_length, packing, dataset_text_field,
...): cpuft's own values for them are dropped (cpuft.train.seq2seq tokenises with max_length
itself); one set as a pass-through key is refused (`seq2seq_refusal`).
"""

from __future__ import annotations

import os
from pathlib import Path

from cpuft.config.library_fields import build_library_config, fields_of
from cpuft.config.passthrough import trl_config_class, trl_config_kwargs
from cpuft.errors import UserError
from cpuft.run_dir import RunDir


def plan_training_kwargs(config, plan, run_dir: Path) -> dict:
    """The TrainingArguments fields the plan and the run directory decide (SFTConfig and
    Seq2SeqTrainingArguments alike)."""
    from cpuft.planning.memory import default_optimizer

    optimizer = default_optimizer(plan.device, plan.quantization) if config.optimizer == "auto" else config.optimizer
    # TensorBoard's writer reads its directory from the environment in transformers 5.
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(RunDir(run_dir).tensorboard_dir)
    set_reporting_environment(config.report_to, run_dir)
    return dict(
        output_dir=str(run_dir),
        per_device_train_batch_size=plan.per_device_batch_size,
        per_device_eval_batch_size=plan.per_device_batch_size,
        gradient_accumulation_steps=plan.gradient_accumulation_steps,
        # TRL turns these on by default; the plan decides them (see cpuft.planning.plan for why).
        use_cpu=plan.device == "cpu",
        bf16=plan.compute_dtype == "bf16",
        fp16=plan.compute_dtype == "fp16",
        activation_checkpointing=plan.gradient_checkpointing,
        torch_compile=plan.torch_compile,
        # Length grouping is cpuft's own order (cpuft.data.packing): transformers' sampler groups
        # too few batches on short runs to remove the padding.
        train_sampling_strategy="sequential" if plan.length_grouping else "random",
        dataloader_pin_memory=plan.device == "cuda",
        optim=optimizer,
        # DDP only: every trainable parameter (LoRA's and the other PEFT methods') gets a gradient each
        # step, so the Trainer's default search for unused ones is a wasted autograd traversal.
        ddp_find_unused_parameters=config.trl_args.get("ddp_find_unused_parameters", False),
    )


def build_sft_config(config, plan, run_dir: Path):
    """CpuftSFTConfig (TRL's SFTConfig with cpuft's defaults) for `config` (a
    cpuft.config.job.SFTJobConfig) run under `plan` into `run_dir`."""
    kwargs, source = trl_config_kwargs(config)
    kwargs.update(plan_training_kwargs(config, plan, run_dir))
    kwargs.update(packing=plan.packing)  # TRL's "bfd": whole samples per row, padding-free batches
    return build_library_config(trl_config_class(), kwargs, source, config.origins)


def build_dpo_config(config, plan, run_dir: Path):
    """CpuftDPOConfig (TRL's DPOConfig with cpuft's defaults) for the `cpuft dpo` job `config` run
    under `plan` into `run_dir`; the reference log-probs are precomputed when the plan says so."""
    kwargs, source = trl_config_kwargs(config)
    kwargs.update(plan_training_kwargs(config, plan, run_dir))
    if "precompute_ref_log_probs" not in config.trl_args:
        kwargs["precompute_ref_log_probs"] = plan.precompute_ref_log_probs
    return build_library_config(trl_config_class("dpo"), kwargs, source, config.origins)


def seq2seq_refusal(config) -> str | None:
    """Why `config` cannot run as an encoder-decoder job: pass-through keys that
    Seq2SeqTrainingArguments has no field for (SFTConfig's own); None when it can."""
    from transformers import Seq2SeqTrainingArguments

    refused = [name for name in config.trl_args if name not in fields_of(Seq2SeqTrainingArguments)]
    if not refused:
        return None
    where = "; ".join(f"'{name}' at {config.origins.get(name, name)}" for name in refused)
    return (
        f"{where}: TRL SFTConfig field(s) that an encoder-decoder (seq2seq) run does not use: it trains"
        " with transformers' Seq2SeqTrainer, whose Seq2SeqTrainingArguments have no such field. Remove them."
    )


def build_seq2seq_args(config, plan, run_dir: Path):
    """Seq2SeqTrainingArguments for an encoder-decoder `config` run under `plan` into `run_dir`:
    the same job values, cpuft's defaults (CpuftSFTConfig's) and plan fields as
    build_sft_config, SFTConfig-only fields left out."""
    from transformers import Seq2SeqTrainingArguments

    from cpuft.config.trl_config import cpuft_default_values

    refusal = seq2seq_refusal(config)
    if refusal:  # cpuft.train.seq2seq checks this in setup, before anything is written
        raise UserError(refusal)
    kwargs, source = trl_config_kwargs(config)
    kwargs = {**cpuft_default_values(), **kwargs}
    fields = fields_of(Seq2SeqTrainingArguments)
    kwargs = {name: value for name, value in kwargs.items() if name in fields}
    kwargs.update(plan_training_kwargs(config, plan, run_dir))
    return build_library_config(Seq2SeqTrainingArguments, kwargs, source, config.origins)


def reporting_environment(report_to, run_dir: Path, environ, offline: bool, reachable) -> tuple[dict[str, str], list[str]]:
    """The environment variables that keep report_to's integrations from waiting on a network
    they cannot reach, and a note for each choice made: ({name: value}, notes).

    Offline is `offline` (HF_HUB_OFFLINE=1) or an unreachable server (`reachable(url)`, asked
    only when a variable is unset). What the user set stays as set. wandb runs offline into the run directory
    (`wandb sync` uploads it later); mlflow without MLFLOW_TRACKING_URI writes a file store in the
    run directory, as it would in the working directory; trackio logs to its local database unless
    a Space is named (cpuft.config.reporting refuses a Space offline); tensorboard is local.
    Each integration's callback reports from rank 0 only.
    """
    from cpuft.config.reporting import report_integration_names

    names = report_integration_names(report_to)
    env: dict[str, str] = {}
    notes: list[str] = []
    if "wandb" in names and "WANDB_MODE" not in environ:
        server = environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
        why = "HF_HUB_OFFLINE is set" if offline else None if reachable(server) else f"{server} is unreachable"
        if why:
            env.update(WANDB_MODE="offline", WANDB_DIR=environ.get("WANDB_DIR", str(run_dir)))
            notes.append(f"report_to wandb: offline ({why}): the run is saved in {env['WANDB_DIR']}/wandb;"
                         " `wandb sync` uploads it later.")
    if "mlflow" in names and "MLFLOW_TRACKING_URI" not in environ:
        env["MLFLOW_TRACKING_URI"] = f"file:{Path(run_dir).resolve() / 'mlruns'}"
        notes.append(f"report_to mlflow: MLFLOW_TRACKING_URI is unset, so the run goes to {env['MLFLOW_TRACKING_URI']}.")
    return env, notes


def set_reporting_environment(report_to, run_dir: Path) -> None:
    """Apply `reporting_environment` to this process and print its notes (rank 0)."""
    import sys

    from huggingface_hub import is_offline_mode

    env, notes = reporting_environment(report_to, run_dir, os.environ, is_offline_mode(), reachable)
    os.environ.update(env)
    if os.environ.get("RANK", "0") == "0":
        for note in notes:
            print(f"cpuft: {note}", file=sys.stderr, flush=True)


def reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to `url`'s host opens within `timeout` seconds."""
    import socket
    from urllib.parse import urlparse

    parsed = urlparse(url)
    try:
        port = parsed.port or (80 if parsed.scheme == "http" else 443)
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return True
    except (OSError, ValueError, TypeError):
        return False
