"""Fit the plan to memory: the planner's choices, checked against the memory estimate and changed
by themselves when the run would not fit.

`plan_for` decides from the machine and the request alone; it cannot know whether the run fits.
`fit_plan_to_memory` sizes plans with `cpuft.planning.memory` and keeps the first that fits,
changing only what the request left to the planner ("auto"/unset), in this order:
- quantisation: unquantised weights first (faster, exact), NF4 QLoRA only when nothing
  unquantised fits; this also undoes `plan_for`'s NF4 guess (weights > 60 % of memory) when the
  estimate shows the unquantised run fits. Never for full fine-tuning.
- then, for each: the planned micro-batch, then smaller ones with proportionally more
  accumulation (same optimizer batch), largest first; each without and then with gradient
  checkpointing (it keeps only each block's input, shrinking activations by about the number of
  layers, and changes no result; it costs one more forward pass, ~1.5x measured). Checkpointing
  at the planned micro-batch is so tried before a smaller micro-batch.
Each changed or kept choice's reason gives the numbers: what the run needs with and without it
and the headroom left. When nothing the planner may change fits, the plan stays as it was and the
MemoryPlan's suggestions list what the user could change (shorter sequences, an 8-bit optimizer,
LoRA instead of full fine-tuning, ...).

Under DDP the capacity is the node's: a CPU node's ranks each hold a full model copy (plus DDP's
gradient buckets), so the fit sizes ranks_per_node x one rank against the node's RAM
(cpuft.planning.memory); a CUDA rank has its own GPU.

`plan_job` is the one call for a `cpuft sft` job (and `cpuft plan`): request (with the world and
the model's architecture facts) -> plan -> memory -> fitted plan, with the gradient all-reduce
per optimizer step (cpuft.planning.world) once the memory plan knows the gradient bytes. Both
functions are pure: no probing, no I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from cpuft.planning.memory import (
    MemoryPlan,
    ModelShape,
    RunSettings,
    format_bytes,
    plan_memory,
    settings_for_job,
    usable_capacity,
)
from cpuft.planning.plan import Plan, PlanRequest, plan_for, weights_dtype_reason
from cpuft.planning.world import allreduce_estimate

CHECKPOINTING_COST = "it recomputes the forward pass (~1.5x slower measured)"


@dataclass(frozen=True)
class JobPlan:
    """The fitted plan, its memory estimate and the RunSettings it was sized with."""

    plan: Plan
    memory: MemoryPlan | None  # None when the model's shape is unknown
    settings: RunSettings | None


def plan_job(
    machine, job, shape: ModelShape | None, training: str = "adapter", where: str | None = None,
    ranks_per_node: int = 1, nodes: int = 1, architecture=None,
) -> JobPlan:
    """Plan a `cpuft sft` job (an SFTJobConfig) on `machine`, fitted to its memory.

    `training="full"` sizes full fine-tuning instead of the adapter; `where` (a machine type's
    name) is added to the capacity's label; `ranks_per_node` x `nodes` is the DDP world (each
    node like `machine`); `architecture` (cpuft.planning.architecture.ArchitectureFacts) the
    model's class, attention and adapter targets. Without a shape the plan is not fitted.
    """
    request = PlanRequest.from_job(job, shape.total_params if shape else None, ranks_per_node, nodes, architecture)
    plan = plan_for(machine, request)
    if shape is None:
        return JobPlan(plan, None, None)
    capacity, label = usable_capacity(machine, plan.device)
    if where:
        label = f"{label} of {where}"

    def settings_for(candidate: Plan) -> RunSettings:
        settings = settings_for_job(candidate, job)
        return replace(settings, training="full") if training == "full" else settings

    plan, memory = fit_plan_to_memory(plan, request, shape, settings_for, capacity, label)
    plan = replace(plan, allreduce=allreduce_estimate(memory.gradients_bytes, plan.world_size, plan.nodes, plan.device))
    return JobPlan(plan, memory, memory.settings)


def fit_plan_to_memory(
    plan: Plan,
    request: PlanRequest,
    shape: ModelShape,
    settings_for: Callable[[Plan], RunSettings],
    capacity_bytes: int | None,
    capacity_label: str = "",
) -> tuple[Plan, MemoryPlan]:
    """(the plan, changed where the request allows so the run fits; its memory plan).

    `settings_for(plan)` gives the RunSettings a plan runs with (the job's sequence length,
    adapter, optimizer, ...), e.g. `lambda p: settings_for_job(p, job)`.
    """
    memory = plan_memory(shape, settings_for(plan), capacity_bytes, capacity_label)
    auto_checkpointing = request.gradient_checkpointing is None
    if memory.fits is None:
        if auto_checkpointing and not plan.gradient_checkpointing:
            plan = _with_reason(plan, "gradient_checkpointing", f"off: {CHECKPOINTING_COST}; this machine's memory is"
                                " unknown, so the planner cannot tell whether the run needs it")
        return plan, memory

    def total(candidate: Plan) -> int:
        return plan_memory(shape, settings_for(candidate), capacity_bytes, suggest=False).total_bytes

    for candidate in _candidates(plan, request, settings_for(plan).training):
        if total(candidate) <= capacity_bytes:
            fitted = plan_memory(shape, settings_for(candidate), capacity_bytes, capacity_label)
            return _explain(candidate, plan, request, memory, fitted, total), fitted
    if auto_checkpointing and not plan.gradient_checkpointing:
        plan = _with_reason(
            plan, "gradient_checkpointing",
            f"off: the run needs {format_bytes(memory.total_bytes)} but {capacity_label} is"
            f" {format_bytes(capacity_bytes)}, and no change the planner may make (checkpointing,"
            " micro-batch, NF4) fits; see the memory plan's options",
        )
    return plan, memory


def _candidates(plan: Plan, request: PlanRequest, training: str):
    """Plans to try, in order: per quantisation (unquantised first), per micro-batch (as planned,
    then smaller), without and then with checkpointing."""
    auto_checkpointing = request.gradient_checkpointing is None
    starts = [plan]
    if request.quant == "auto" and training != "full":
        unquantised = replace(
            plan, quantization="none", weights_dtype=plan.compute_dtype,
            gradient_checkpointing=bool(request.gradient_checkpointing),
        )
        quantized = replace(
            plan, quantization="nf4", weights_dtype=plan.compute_dtype,
            gradient_checkpointing=True if auto_checkpointing else request.gradient_checkpointing,
        )
        starts = [unquantised, quantized]
    batches_allowed = request.per_device_batch_size is None
    for start in starts:
        batches = _smaller_micro_batches(start.per_device_batch_size) if batches_allowed else []
        for batch in [start.per_device_batch_size, *batches]:
            sized = _with_micro_batch(start, batch)
            yield sized
            if auto_checkpointing and not sized.gradient_checkpointing:
                yield replace(sized, gradient_checkpointing=True)


def _smaller_micro_batches(batch: int) -> list[int]:
    """Divisors of `batch` below it, largest first: accumulation grows by a whole factor."""
    return [b for b in range(batch - 1, 0, -1) if batch % b == 0]


def _with_micro_batch(plan: Plan, batch: int) -> Plan:
    if batch == plan.per_device_batch_size:
        return plan
    accumulation = plan.gradient_accumulation_steps * plan.per_device_batch_size // batch
    return replace(plan, per_device_batch_size=batch, gradient_accumulation_steps=accumulation)


def _with_reason(plan: Plan, name: str, why: str) -> Plan:
    return replace(plan, reasons={**plan.reasons, name: why})


def _explain(
    candidate: Plan, planned: Plan, request: PlanRequest, before: MemoryPlan, after: MemoryPlan,
    total: Callable[[Plan], int],
) -> Plan:
    """The candidate, with the reasons of the memory-driven choices giving the numbers."""
    capacity, label = after.capacity_bytes, after.capacity_label
    need = after.total_bytes
    headroom = f"{format_bytes(capacity - need)} headroom"
    of_capacity = f"{format_bytes(need)} of {format_bytes(capacity)} ({label})"
    reasons = dict(candidate.reasons)

    if candidate.quantization != planned.quantization:
        if candidate.quantization == "none":
            reasons["quantization"] = (
                f"auto: the memory estimate shows unquantised weights fit (the run needs {of_capacity});"
                " LoRA on unquantised weights is faster than QLoRA and keeps them exact"
            )
        else:
            reasons["quantization"] = (
                f"auto, to fit memory: unquantised, the run needs {format_bytes(before.total_bytes)} as planned and"
                " fits with no checkpointing or micro-batch the request allows; NF4 QLoRA stores linear weights in"
                f" ~0.5 bytes/parameter: the run needs {of_capacity} (slower: every matmul dequantises)"
            )
        reasons["weights_dtype"] = weights_dtype_reason(candidate.quantization, candidate.compute_dtype)

    if request.gradient_checkpointing is None:
        if candidate.gradient_checkpointing:
            without = total(replace(candidate, gradient_checkpointing=False))
            if without > capacity:
                reasons["gradient_checkpointing"] = (
                    f"on, to fit memory: without it the run needs {format_bytes(without)} but {label} is"
                    f" {format_bytes(capacity)}; with it {format_bytes(need)} ({headroom}). {CHECKPOINTING_COST}"
                )
            else:
                reasons["gradient_checkpointing"] = (
                    f"on: QLoRA is chosen to save memory and checkpointing saves more; the run needs"
                    f" {of_capacity}, {format_bytes(without)} without it"
                )
        else:
            reasons["gradient_checkpointing"] = (
                f"off: the run needs {of_capacity}, {headroom}; checkpointing would only cost time ({CHECKPOINTING_COST})"
            )

    if candidate.per_device_batch_size != planned.per_device_batch_size:
        at_planned = total(_with_micro_batch(candidate, planned.per_device_batch_size))
        reasons["batch"] = (
            f"auto, to fit memory: micro-batch {candidate.per_device_batch_size} x"
            f" {candidate.gradient_accumulation_steps} accumulation keeps the optimizer batch at"
            f" {candidate.effective_batch_size}; at micro-batch {planned.per_device_batch_size} the run would need"
            f" {format_bytes(at_planned)}, at {candidate.per_device_batch_size} {format_bytes(need)} ({headroom})"
        )
    return replace(candidate, reasons=reasons)
