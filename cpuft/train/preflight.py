"""Preflight: what a run will use and cost, printed and checked before any weights are loaded.

Owns: reading the model's config, planning the run for this machine fitted to its memory
(cpuft.planning.fit) with the model's own attention and adapter targets (cpuft.planning.architecture),
printing the plan table, the memory estimate (a UserError, with the options that would fit, when
the run cannot fit) and the time estimate (cpuft.planning.cloud.time_for_run: on this machine
from the step's parts timed at the run's own shapes, cpuft.hardware.step_cost, a few seconds and
cached; from declared peaks for --machine-type).

Limits: architectures the memory estimator cannot build from their config alone get neither a
memory check nor a time estimate (`model_shape` is None); the run still goes ahead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cpuft.errors import UserError
from cpuft.modeling import read_model_config
from cpuft.planning.architecture import architecture_facts
from cpuft.planning.plan import Plan
from cpuft.planning.report import format_env_table


@dataclass
class Preflight:
    model_config: Any  # transformers' PretrainedConfig of the base model
    model_shape: Any  # cpuft.planning.memory.ModelShape, or None for an unknown architecture
    plan: Plan
    run_settings: Any = None  # cpuft.planning.memory.RunSettings, with model_shape
    memory_plan: Any = None  # cpuft.planning.memory.MemoryPlan, with model_shape


def plan_and_check_memory(config, machine, log=print, world=None) -> Preflight:
    """Plan the job `config` (SFTJobConfig) on `machine`, fitted to its memory (checkpointing, a
    smaller micro-batch or NF4 turn on by themselves where the config leaves them to the planner);
    print the plan and its memory estimate; UserError before anything is loaded if it cannot fit."""
    from cpuft.planning.fit import plan_job

    model_config = read_model_config(config.model, revision=config.revision, trust_remote_code=config.trust_remote_code)
    shape = _model_shape_or_none(model_config)
    fitted = plan_job(
        machine, config, shape, ranks_per_node=world.local_size if world else 1, nodes=world.nodes if world else 1,
        architecture=architecture_facts(model_config, config.attn_implementation, config.lora_target_modules),
    )
    # The plan first, then what it costs in memory and time: read top to bottom before loading.
    log(format_env_table(machine, fitted.plan) + "\n")
    if fitted.memory is not None:
        _check_memory(fitted.memory, log)
    return Preflight(model_config, shape, fitted.plan, fitted.settings, fitted.memory)


def estimate_time(preflight: Preflight, config, train_rows, tokenizer, log=print, allreduce_seconds_per_step: float = 0.0):
    """Print the expected training time (and cost on --machine-type); None without a memory plan.

    On this machine it times the step's parts at the run's shapes (cpuft.hardware.step_cost, a
    few seconds, cached); `allreduce_seconds_per_step`: DDP's gradient exchange (default: the plan's `allreduce`, none in one process)."""
    from cpuft.planning.cloud import (
        MACHINE_TYPES,
        planned_epochs,
        time_for_run,
        tokens_per_epoch,
    )

    if preflight.memory_plan is None:
        return None
    plan = preflight.plan
    tokens, tokens_per_row = tokens_per_epoch(train_rows, tokenizer, config.max_length)
    tokens = round(tokens / plan.world_size)  # each rank trains its share, all in parallel
    epochs = planned_epochs(config.max_steps, plan.effective_batch_size, len(train_rows) / plan.world_size, config.num_train_epochs)
    machine_type = MACHINE_TYPES[config.machine_type] if config.machine_type else None
    estimate = time_for_run(
        preflight.model_shape, preflight.run_settings, preflight.memory_plan.trainable_params, tokens, epochs,
        tokens_per_row, machine_type, plan.threads, datasheet_flops=plan.peak_flops,
        model_config=preflight.model_config, gradient_accumulation_steps=plan.gradient_accumulation_steps,
        packed=plan.packing, cpu_lm_head=plan.cpu_lm_head, fused_lora=plan.fused_lora,
        allreduce_seconds_per_step=allreduce_seconds_per_step or (plan.allreduce.seconds if plan.allreduce else 0.0),
    )
    log(estimate.format())
    return estimate


def _check_memory(memory, log) -> None:
    """Print the memory plan; stop before loading weights if the run cannot fit."""
    log(memory.format())
    if memory.fits is False:
        options = "\n".join(f"  - {s}" for s in memory.suggestions)
        raise UserError(
            f"this run needs about {memory.total_bytes / 2**30:.1f} GiB but {memory.capacity_label}"
            f" is {memory.capacity_bytes / 2**30:.1f} GiB; nothing was loaded. Options that would"
            f" fit (`cpuft plan` with the same flags shows the whole estimate):\n{options}"
        )


def _model_shape_or_none(model_config):
    """The memory estimator's view of the model; None for architectures it cannot build."""
    from cpuft.planning.memory import model_shape

    try:
        return model_shape(model_config)
    except Exception:  # an architecture transformers cannot instantiate from its config alone
        return None
