"""TRL's `SFTConfig` (`cpuft sft`) and `DPOConfig` (`cpuft dpo`), passed through: the fields cpuft's
plan and pipeline own, and the others as keys.

Every field of the job kind's TRL config is also a cpuft config key and flag (`max_grad_norm:
0.5`, `--max-grad-norm 0.5`, `--beta 0.2` for dpo), typed by the class's own annotations
(`typed_trl_value`) and validated by building the config cpuft runs (`validate_trl_config`), so
a value TRL would refuse stops the job before anything is written or loaded.

cpuft's defaults for TRL's fields, with why, are `CpuftSFTConfig`'s own (cpuft.config.trl_config).
What this module adds is the list of fields cpuft sets itself; setting one is refused with the
cpuft key to use, so the plan is never contradicted in silence:
- `TRL_PER_RUN`: decided per run (the hardware plan's bf16, use_cpu, batch sizes, optim, ...; the
  run directory; the evaluation fields eval_steps implies);
- `TRL_PINNED`: fixed values cpuft's pipeline relies on (CpuftSFTConfig's defaults), with the
  cpuft key that decides each.
`trl_deviations` puts cpuft's defaults and TRL_PER_RUN (and DPO_PER_RUN) together for
`--help-trl` and the refusals. `trl_config_kwargs` gives the job's values as keyword arguments (the
run adds the plan's in cpuft.train.trainer_args).

The PEFT config is cpuft.config.peft_config's, report_to's integrations cpuft.config.reporting's.

Limits: TRL is imported on first use (seconds), not when cpuft starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any

from cpuft.config.library_fields import (
    AT_RUN_TIME,
    Deviation,
    LibraryField,
    build_library_config,
    fields_of,
    library_value,
    refuse_if_set_by_cpuft,
)
from cpuft.config.reporting import report_integration_names
from cpuft.errors import UserError

# ----------------------------------------------------------------------------- what cpuft sets

# TRL SFTConfig fields whose value cpuft decides for each run. `set_by`: the cpuft key (or flag)
# to use, setting the field itself is refused; None: setting the field overrides cpuft's value.
TRL_PER_RUN: dict[str, Deviation] = {
    "output_dir": Deviation(AT_RUN_TIME, "one directory per run", shown="runs/sft-<timestamp>"),
    "packing": Deviation(AT_RUN_TIME, "as asked, once the plan has checked that samples stay apart", shown="the plan"),
    "eval_strategy": Deviation(AT_RUN_TIME, "evaluations every eval_steps", None, "'steps' with eval_steps"),
    "load_best_model_at_end": Deviation(
        AT_RUN_TIME, "adapter/ is the checkpoint with the lowest eval_loss", None, "true with eval_steps"
    ),
    "metric_for_best_model": Deviation(AT_RUN_TIME, "the best checkpoint is the one with the lowest eval loss",
                                       None, "'eval_loss' with eval_steps"),
    "greater_is_better": Deviation(AT_RUN_TIME, "a lower eval loss is better", None, "false with eval_steps"),
    "data_seed": Deviation(AT_RUN_TIME, "one seed for the split, the order and accelerate's sampler", shown="seed"),
    # the hardware plan decides these (`cpuft env` shows why)
    "bf16": Deviation(AT_RUN_TIME, "TRL turns it on unless fp16; the plan only where the CPU has AMX/AVX512-BF16 or the GPU bf16", "dtype", "the plan"),
    "fp16": Deviation(AT_RUN_TIME, "the plan's compute dtype", "dtype", "the plan"),
    "use_cpu": Deviation(AT_RUN_TIME, "the plan's device", "device", "the plan"),
    "dataloader_pin_memory": Deviation(AT_RUN_TIME, "pinned memory only helps copies to a GPU", "device", "on CUDA only"),
    "gradient_checkpointing": Deviation(
        AT_RUN_TIME, "off unless the memory plan needs it: recompute costs ~1.5x time on a CPU",
        "gradient_checkpointing", "the plan",
    ),
    "activation_checkpointing": Deviation(
        AT_RUN_TIME, "transformers 5's name for gradient_checkpointing", "gradient_checkpointing", "the plan",
    ),
    "per_device_train_batch_size": Deviation(AT_RUN_TIME, "sized by the memory plan", "per_device_batch_size", "the plan"),
    "per_device_eval_batch_size": Deviation(AT_RUN_TIME, "the training micro-batch", "per_device_batch_size", "the plan"),
    "gradient_accumulation_steps": Deviation(
        AT_RUN_TIME, "the plan's effective batch", "gradient_accumulation_steps", "the plan"
    ),
    "optim": Deviation(
        AT_RUN_TIME, "the memory plan counts its state: adamw_torch_fused on CPU, paged_adamw_8bit for QLoRA on CUDA, else adamw_torch",
        "optimizer", "the plan",
    ),
    "torch_compile": Deviation(AT_RUN_TIME, "only runs of 5000+ steps repay inductor's warm-up", "torch_compile", "the plan"),
    "train_sampling_strategy": Deviation(
        AT_RUN_TIME, "rows come in cpuft's length-grouped order (cpuft.data.packing), or packed", "packing",
        "sequential when length-grouped",
    ),
    "resume_from_checkpoint": Deviation(AT_RUN_TIME, "the run directory's last checkpoint", "--resume", "with --resume"),
}

# TRL SFTConfig fields with a fixed value cpuft's pipeline relies on (CpuftSFTConfig's default,
# which says why): setting the field itself is refused; the cpuft key (or flag) that decides it.
TRL_PINNED: dict[str, str] = {
    "bf16_full_eval": "dtype",
    "fp16_full_eval": "dtype",
    "auto_find_batch_size": "per_device_batch_size",
    "padding_free": "packing",
    "packing_strategy": "packing",
    "disable_tqdm": "--no-progress",
    "dataset_text_field": "dataset_format",
    "assistant_only_loss": "loss_on",
    "completion_only_loss": "loss_on",
    "model_init_kwargs": "model, revision, trust_remote_code, dtype, quant, attn_implementation",
}


# DPOConfig fields cpuft decides per run as well (`cpuft dpo`).
DPO_PER_RUN: dict[str, Deviation] = {
    "precompute_ref_log_probs": Deviation(
        AT_RUN_TIME, "the plan: on when the run passes over its rows more than once (one reference"
        " pass instead of one per epoch)", None, "the plan",
    ),
}

# The job kinds: `cpuft sft` runs TRL's SFTTrainer with SFTConfig, `cpuft dpo` DPOTrainer with DPOConfig.
JOB_KINDS = ("sft", "dpo")


def _library_class(kind: str):
    from trl import DPOConfig, SFTConfig

    return {"sft": SFTConfig, "dpo": DPOConfig}[kind]


@functools.cache
def trl_deviations(kind: str = "sft") -> dict[str, Deviation]:
    """cpuft's value for every field of the job kind's TRL config that it sets, and why: cpuft's
    class's defaults (with the key to use for the pinned ones) and the per-run fields. Imports TRL."""
    from cpuft.config.trl_config import cpuft_defaults, reason

    defaults = {
        name: Deviation(f.default, reason(f), TRL_PINNED.get(name)) for name, f in cpuft_defaults(kind).items()
    }
    fields = trl_fields(kind)
    per_run = {**TRL_PER_RUN, **(DPO_PER_RUN if kind == "dpo" else {})}
    return {**defaults, **{name: d for name, d in per_run.items() if name in fields}}


# ----------------------------------------------------------------------------- the fields


def trl_config_class(kind: str = "sft"):
    """The TRL config class cpuft builds for the job kind: TRL's, with cpuft's defaults
    (cpuft.config.trl_config)."""
    from cpuft.config.trl_config import TRL_CONFIG_CLASSES

    return TRL_CONFIG_CLASSES[kind]


def trl_fields(kind: str = "sft") -> dict[str, LibraryField]:
    """TRL's own config fields for the job kind (SFTConfig, DPOConfig): types, TRL's defaults, help."""
    return fields_of(_library_class(kind))


def typed_trl_value(name: str, value: Any, where: str, kind: str = "sft") -> Any:
    """The TRL config field `name`'s value, set at `where`, typed by its annotation; UserError when
    cpuft sets the field itself (trl_deviations) or the value does not fit."""
    refuse_if_set_by_cpuft(name, trl_deviations(kind).get(name), f"TRL's {_library_class(kind).__name__}", where)
    return trl_fields(kind)[name].typed(value, where)


# ----------------------------------------------------------------------------- building


def trl_config_kwargs(config) -> tuple[dict[str, Any], dict[str, str]]:
    """Keyword arguments of the TRL config of the job `config` (its `kind`): its values, without
    cpuft's defaults (its class's own) and the plan's fields (the run adds them).

    Returns (kwargs, source): `source[field]` is the config key a field's value came from.
    """
    fields = trl_fields(config.kind)
    kwargs: dict[str, Any] = {}
    source: dict[str, str] = {}
    for name in _direct_trl_keys(config):
        kwargs[name], source[name] = getattr(config, name), name
    kwargs["data_seed"], source["data_seed"] = config.seed, "seed"
    # transformers reads a text report_to as one integration's name: the comma list as a list.
    kwargs["report_to"] = report_integration_names(config.report_to)
    if config.eval_steps is not None:
        kwargs.update(eval_strategy="steps", load_best_model_at_end=True, metric_for_best_model="eval_loss",
                      greater_is_better=False)
        for name in ("eval_strategy", "load_best_model_at_end", "metric_for_best_model", "greater_is_better"):
            source[name] = "eval_steps"
    for name, value in config.trl_args.items():
        if name in fields:
            kwargs[name], source[name] = library_value(fields[name].hint, value), name
    return kwargs, source


def _direct_trl_keys(config) -> list[str]:
    """cpuft keys passed to the SFTConfig field of the same name as they are (`trl=True` in
    cpuft.config.sections); the plan's keys reach SFTConfig through cpuft.train.trainer_args."""
    return [f.name for f in dataclasses.fields(config) if f.metadata.get("trl")]


# ----------------------------------------------------------------------------- validation


def validate_trl_config(config, origins: dict[str, str]) -> None:
    """Build the TRL config (SFTConfig, DPOConfig) for `config` now, so TRL's and transformers' own checks run before
    anything is written or loaded. The plan's fields get neutral values here (CPU, fp32, no
    checkpointing): the plan is checked by the planner, and bf16 on a CPU without it would make
    TRL refuse a config the plan may well accept."""
    _check_combinations(config, origins)
    kwargs, source = trl_config_kwargs(config)
    neutral = dict(
        output_dir="cpuft-validation-never-written", use_cpu=True, bf16=False, fp16=False,
        activation_checkpointing=False, torch_compile=False,
    )
    if config.kind == "sft":
        neutral["packing"] = config.packing
    with _accelerate_state_restored():
        build_library_config(trl_config_class(config.kind), {**kwargs, **neutral}, source, origins)


def _check_combinations(config, origins: dict[str, str]) -> None:
    trl = config.trl_args
    for name in ("torch_compile_backend", "torch_compile_mode"):
        if trl.get(name) is not None and config.torch_compile is not True:
            raise UserError(
                f"{origins.get(name, name)}: '{name}' turns torch.compile on, which the plan decides"
                " (only for runs of 5000+ steps); set torch_compile: true as well."
            )
    # Checks the libraries make only once the trainer starts, after the run directory is written.
    backend = trl.get("torch_compile_backend")
    if backend is not None:
        from accelerate.utils import DynamoBackend

        if backend.upper() not in {b.value for b in DynamoBackend}:
            known = ", ".join(b.value.lower() for b in DynamoBackend)
            raise UserError(f"{origins.get('torch_compile_backend')}: torch_compile_backend {backend!r} is not one"
                            f" accelerate knows: {known}.")
    if trl.get("use_liger_kernel"):
        from transformers.utils import is_liger_kernel_available

        if not is_liger_kernel_available():
            raise UserError(f"{origins.get('use_liger_kernel')}: use_liger_kernel needs the liger-kernel package"
                            " (Triton kernels for GPUs), which is not installed.")
    if trl.get("eval_strategy", "no") != "no" and config.eval_fraction == 0:
        raise UserError(
            f"{origins.get('eval_strategy', 'eval_strategy')}: eval_strategy {trl['eval_strategy']!r} needs"
            " held-out rows: set eval_fraction above 0."
        )


@contextlib.contextmanager
def _accelerate_state_restored():
    """TrainingArguments sets up accelerate's process-wide PartialState (with use_cpu) as it is
    built. The validation copy must not decide the device of the real run, which may be CUDA:
    put the state back as it was."""
    from accelerate.state import PartialState

    saved = dict(PartialState._shared_state)
    try:
        yield
    finally:
        PartialState._shared_state.clear()
        PartialState._shared_state.update(saved)


def loads_best_checkpoint(config) -> bool:
    """Whether the run ends by loading its best checkpoint (lowest eval_loss) into adapter/: with
    eval_steps, unless load_best_model_at_end is set false."""
    return bool(config.trl_args.get("load_best_model_at_end", config.eval_steps is not None))
