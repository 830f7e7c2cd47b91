"""Preflight: what a run will use and cost, decided before any weight is loaded.

One stage, used by `cpuft sft` (and `cpuft dpo`'s planning alike), `cpuft plan` and `cpuft bench`:
- `preflight(job, machine, ...)`: read the model's config (no weights), find its architecture
  facts (cpuft.planning.architecture), plan the run for `machine` fitted to its memory
  (cpuft.planning.fit: checkpointing, a smaller micro-batch or NF4 turn on by themselves where the
  job leaves them to the planner) -> a `Preflight` value holding the plan and the memory plan.
  With `dtype: auto` on this machine's CPU with native bf16, a small model's dtype is the faster
  of one micro-batch timed in fp32 and in bf16 (cpuft.planning.dtype_choice), decided on the
  plan's micro-batch and then fitted to memory;
- `check_fits(preflight)`: a UserError, with the options that would fit, when the run cannot fit;
- `estimate_time(preflight, tokens, mean_seq_len)`: the time (and cost with a declared
  machine_type) for `tokens` per epoch, on this machine from the step's parts timed at the run's
  own shapes (cpuft.planning.step_cost, a few seconds and cached), from declared peaks otherwise.
  The run's length is one rule for every caller: max_steps when set, else num_train_epochs, over
  tokens / mean_seq_len rows, each DDP rank training its share.

Inputs are narrow: the job's model, adapter and hardware keys (an SFTJobConfig, read for those
only), the machine, and the world (ranks per node x nodes). Nothing here prints; step
measurements are cached on disk (cpuft.planning.step_cost).

Limits: architectures the memory estimator cannot build from their config alone get neither a
memory check nor a time estimate (`model_shape` is None); `cpuft sft` still goes ahead.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from cpuft.errors import UserError
from cpuft.hardware.probe import Machine
from cpuft.modeling import read_model_config
from cpuft.planning.architecture import architecture_facts
from cpuft.planning.plan import Plan
from cpuft.planning.report import format_env_table


@dataclass(frozen=True)
class Preflight:
    machine: Machine
    model_config: Any  # transformers' PretrainedConfig of the base model
    plan: Plan  # the model's architecture facts are in it (model_class, task_type, attention, targets)
    max_steps: int  # the run's length, as the job asked (-1: num_train_epochs)
    num_train_epochs: float
    model_shape: Any = None  # cpuft.planning.memory.ModelShape; None for an architecture it cannot build
    run_settings: Any = None  # cpuft.planning.memory.RunSettings, with model_shape
    memory_plan: Any = None  # cpuft.planning.memory.MemoryPlan, with model_shape
    machine_type: Any = None  # cpuft.planning.cloud.MachineType the job prices time on (machine_type)

    def describe(self) -> str:
        """The plan table, then what it costs in memory: read top to bottom before loading."""
        text = format_env_table(self.machine, self.plan)
        if self.memory_plan is not None:
            text += "\n\n" + self.memory_plan.format()
        return text


def preflight(job, machine: Machine, ranks_per_node: int = 1, nodes: int = 1, training: str = "adapter",
              where: str | None = None) -> Preflight:
    """Plan `job` (its model, adapter and hardware keys) on `machine` for `ranks_per_node` x
    `nodes` processes; `training` "adapter" or "full"; `where` names a declared machine type
    planned for instead of this machine (`cpuft plan --machine-type`)."""
    from cpuft.planning.cloud import declared_machine_type
    from cpuft.planning.fit import plan_job

    model_config = read_model_config(job.model, revision=job.revision, trust_remote_code=job.trust_remote_code)
    shape = model_shape_or_none(model_config)
    architecture = architecture_facts(model_config, job.attn_implementation, job.lora_target_modules)
    fitted = plan_job(machine, job, shape, training=training, where=where, ranks_per_node=ranks_per_node,
                      nodes=nodes, architecture=architecture)
    fitted = _with_dtype_by_measurement(fitted, job, machine, model_config, shape, where, training=training,
                                        ranks_per_node=ranks_per_node, nodes=nodes, architecture=architecture)
    return Preflight(
        machine=machine, model_config=model_config, plan=fitted.plan,
        max_steps=job.max_steps, num_train_epochs=job.num_train_epochs, model_shape=shape,
        run_settings=fitted.settings, memory_plan=fitted.memory, machine_type=declared_machine_type(job),
    )


def _with_dtype_by_measurement(fitted, job, machine: Machine, model_config, shape, where: str | None, **plan_keys):
    """`fitted` (planned by the fixed rule: bf16 wherever it is native) or the job replanned in
    fp32, where `dtype: auto` on this CPU and one micro-batch measured in each dtype says fp32 is
    faster (cpuft.planning.dtype_choice); the compute_dtype reason says which and by how much.
    The dtype is decided on the plan's micro-batch, then the plan is fitted to memory with it: a
    fp32 plan that would need a smaller micro-batch, checkpointing or NF4 to fit is not taken."""
    from cpuft.planning.dtype_choice import (
        faster_dtype,
        measure_both_dtypes,
        unbelievable_gap,
        why_dtype_not_measured,
    )
    from cpuft.planning.fit import plan_job

    plan = fitted.plan
    why_not = why_dtype_not_measured(job.dtype, machine, plan, shape, fitted.settings, where)
    if why_not is None:
        try:
            fp32, bf16 = measure_both_dtypes(model_config, fitted.settings, plan)
            why_not = unbelievable_gap(fp32, bf16, plan.gradient_checkpointing)
        except Exception as exc:  # a layer the measurement cannot build: the fixed rule stands
            why_not = f"measuring both failed ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:120]})"
    if why_not is not None:
        if not why_not:
            return fitted
        return replace(fitted, plan=_with_dtype_reason(plan, f"{plan.reasons['compute_dtype']}; no measured choice: {why_not}"))
    cpu = f"this CPU ({machine.cpu_summary}, {plan.threads} threads)"
    dtype, why = faster_dtype(fp32, bf16, plan.gradient_checkpointing, cpu)
    if dtype == plan.compute_dtype:
        return replace(fitted, plan=_with_dtype_reason(plan, why))
    replanned = plan_job(machine, replace(job, dtype=dtype), shape, where=where, **plan_keys)
    shape_kept = all(getattr(replanned.plan, name) == getattr(plan, name)
                     for name in ("per_device_batch_size", "gradient_checkpointing", "quantization"))
    if not shape_kept or replanned.memory.fits is False:
        return replace(fitted, plan=_with_dtype_reason(
            plan, f"{why}; but kept {plan.compute_dtype}: {dtype} would not fit memory at the same micro-batch"))
    return replace(replanned, plan=_with_dtype_reason(replanned.plan, why))


def _with_dtype_reason(plan: Plan, why: str) -> Plan:
    return replace(plan, reasons={**plan.reasons, "compute_dtype": why})


def check_fits(preflight: Preflight) -> None:
    """UserError, before anything is loaded, when the run cannot fit, with the options that would."""
    memory = preflight.memory_plan
    if memory is None or memory.fits is not False:
        return
    options = "\n".join(f"  - {s}" for s in memory.suggestions)
    raise UserError(
        f"this run needs about {memory.total_bytes / 2**30:.1f} GiB but {memory.capacity_label}"
        f" is {memory.capacity_bytes / 2**30:.1f} GiB; nothing was loaded. Options that would"
        f" fit (`cpuft plan` with the same flags shows the whole estimate):\n{options}"
    )


def estimate_time(preflight: Preflight, tokens: int, mean_seq_len: float, utilization: float | None = None):
    """The run's time for `tokens` trained tokens per epoch of `mean_seq_len` tokens per row
    (cpuft.planning.cloud.TimeEstimate); None without a memory plan."""
    from cpuft.planning.cloud import planned_epochs, time_for_run

    if preflight.memory_plan is None:
        return None
    plan = preflight.plan
    rank_tokens = tokens / plan.world_size  # each rank trains its share, all in parallel
    epochs = planned_epochs(preflight.max_steps, plan.effective_batch_size, rank_tokens / max(1.0, mean_seq_len),
                            preflight.num_train_epochs)
    return time_for_run(
        plan, preflight.model_shape, preflight.run_settings, preflight.memory_plan.trainable_params,
        round(rank_tokens), epochs, mean_seq_len, preflight.machine_type, utilization, preflight.model_config,
    )


def model_shape_or_none(model_config):
    """The memory estimator's view of the model; None for architectures it cannot build."""
    from cpuft.planning.memory import model_shape

    try:
        return model_shape(model_config)
    except Exception:  # an architecture transformers cannot instantiate from its config alone
        return None
