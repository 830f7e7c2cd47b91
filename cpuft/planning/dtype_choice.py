"""`--dtype auto` on a CPU with native bf16: bf16 or fp32, whichever one micro-batch runs faster.

Native bf16 (AMX, AVX-512-BF16) halves the bytes every matmul moves and, on AMX, raises its
peak, so on models of real size it wins: a 95M Llama trained 1.54x faster in bf16 than in fp32 on
an AVX-512-BF16 EPYC (docs/speed.md). On small models the step is not in big GEMMs, and autocast's
casts around every op cost more than the matmuls save: `cpuft bench --size tiny` (0.2M
parameters) ran bf16 at 0.56x fp32 on AMX and 0.77x on AVX-512-BF16, and the 4M demo model was
equal. So where the answer is in doubt the plan times one micro-batch in both dtypes at the run's
own shapes, with the time plan's own measurement (cpuft.planning.step_cost: a few seconds,
cached on disk), and keeps the faster, saying both figures.

- `faster_dtype(fp32, bf16, gradient_checkpointing)`: pure: two measured StepCosts -> (dtype, reason);
- `why_dtype_not_measured(...)`: why a run gets the planner's fixed rule instead (None: measure);
  a short note to append to that rule's reason, or "" where there is nothing to explain;
- `unbelievable_gap(fp32, bf16)`: why a measured pair is noise (None: it is not);
- `measure_both_dtypes(model_config, settings, plan)`: the two measurements (I/O: timing, cache),
  not cached when unbelievable, so a busy moment is not remembered.

Limits: measured only for `dtype: auto` on this machine's own CPU, unquantised LoRA on a
decoder-only model in one process, below MEASURED_DTYPE_MAX_LINEAR_PARAMS. The micro-batch is
timed at max_length tokens a row (the data's real lengths are not read yet): packed rows are
exactly that, length-grouped rows are shorter.
"""

from __future__ import annotations

# Above this many linear (transformer-block nn.Linear) parameters bf16 is kept without measuring:
# at ~90M linear parameters (the 95M bench model) bf16 already ran 1.54x fp32 on AVX-512-BF16, and
# AMX widens that gap as GEMMs grow, so no CPU measured has fp32 ahead beyond the 4M crossover;
# 300M leaves 3x headroom over the last measured point while the measurement of a layer stays a
# few seconds on 2 cores (a 1B model's layer would take tens of seconds in each dtype).
MEASURED_DTYPE_MAX_LINEAR_PARAMS = 300_000_000
# A gap between the dtypes wider than this is the machine, not the dtype: measured cases span 0.56x
# (tiny, AMX) to 1.54x (95M, AVX-512-BF16), and AMX's larger GEMMs might reach ~3x below the
# ceiling, but on the shared 2-core machine a busy moment made one dtype's 5 ms layer ~50x slower
# (an OpenMP barrier waiting on a descheduled thread). Such a pair is neither believed nor cached.
MAX_BELIEVABLE_GAP = 5.0


def micro_batch_seconds(costs, gradient_checkpointing: bool = False) -> float:
    """One micro-batch's forward and backward from measured parts (cpuft.planning.step_cost.StepCosts):
    layers x (forward + backward) + lm_head/loss over every position + the rest; the optimizer step,
    the same fp32 AdamW over the fp32 adapter in either dtype, is left out."""
    from cpuft.planning.cloud import run_seconds_from_parts

    seconds, _ = run_seconds_from_parts(costs, micro_batches=1, optimizer_steps=0,
                                        gradient_checkpointing=gradient_checkpointing,
                                        head_tokens=costs.rows * costs.seq_len)
    return seconds


def faster_dtype(fp32, bf16, gradient_checkpointing: bool = False, cpu: str = "this CPU") -> tuple[str, str]:
    """(dtype, reason) from one micro-batch measured in each dtype (StepCosts at the same shape):
    the faster; bf16 on a tie (its weights take half the memory). Pure."""
    if (fp32.rows, fp32.seq_len) != (bf16.rows, bf16.seq_len):
        raise ValueError(f"measured at different shapes: fp32 {fp32.rows} x {fp32.seq_len},"
                         f" bf16 {bf16.rows} x {bf16.seq_len}")
    seconds = {"fp32": micro_batch_seconds(fp32, gradient_checkpointing),
               "bf16": micro_batch_seconds(bf16, gradient_checkpointing)}
    chosen = "fp32" if seconds["fp32"] < seconds["bf16"] else "bf16"
    other = "bf16" if chosen == "fp32" else "fp32"
    measured = (f"auto: measured at {fp32.rows} x {fp32.seq_len} on {cpu}: {chosen} {seconds[chosen]:.3g} s"
                f" vs {other} {seconds[other]:.3g} s per micro-batch")
    if chosen == "fp32":
        return "fp32", (f"{measured}; fp32, {_times(seconds['bf16'], seconds['fp32'])} faster: at this size"
                        " autocast's casts cost more than bf16's matmuls save (bf16 pays on larger models)")
    return "bf16", f"{measured}; bf16, {_times(seconds['fp32'], seconds['bf16'])} faster, native on this CPU"


def unbelievable_gap(fp32, bf16, gradient_checkpointing: bool = False) -> str | None:
    """Why the pair of measurements is the machine's noise rather than the dtypes' difference
    (their micro-batches further apart than MAX_BELIEVABLE_GAP); None when it can be believed."""
    seconds = sorted([micro_batch_seconds(fp32, gradient_checkpointing), micro_batch_seconds(bf16, gradient_checkpointing)])
    if seconds[0] > 0 and seconds[1] / seconds[0] <= MAX_BELIEVABLE_GAP:
        return None
    return (f"the two timings ({seconds[0]:.3g} s and {seconds[1]:.3g} s per micro-batch) differ more than"
            f" {MAX_BELIEVABLE_GAP:.0f}x, so the machine was busy; measured again next run")


def _times(slower: float, faster: float) -> str:
    return f"{slower / faster:.2f}x" if faster > 0 else "infinitely"


def why_dtype_not_measured(requested: str, machine, plan, shape, settings, where: str | None) -> str | None:
    """Why the run's dtype is not chosen by measurement (None: measure it). "" where the fixed
    rule is not in doubt and needs no note (a dtype was asked for, CUDA, a CPU without native
    bf16, another machine planned for); a note for the reason otherwise."""
    from cpuft.planning.cloud import _why_not_measured

    if requested != "auto" or where is not None or plan.device != "cpu" or not machine.native_bf16:
        return ""
    if shape is None:
        return "the model's shape is unknown, so its step cannot be built to time"
    if shape.linear_params > MEASURED_DTYPE_MAX_LINEAR_PARAMS:
        return (f"{shape.linear_params / 1e6:.0f}M linear parameters, past the"
                f" {MEASURED_DTYPE_MAX_LINEAR_PARAMS / 1e6:.0f}M below which fp32 can be the faster")
    if plan.world_size > 1:
        return "under DDP every rank must pick the same dtype, and timing on shared cores would not agree"
    return _why_not_measured(shape, settings)


def measure_both_dtypes(model_config, settings, plan):
    """(fp32 StepCosts, bf16 StepCosts): one micro-batch of the plan's rows x max_length, timed
    in each dtype, interleaved, with everything else as planned (cached, cpuft.planning.step_cost)."""
    from cpuft.planning.step_cost import step_costs_by_dtype

    measured = step_costs_by_dtype(
        model_config, settings, plan, settings.batch_size, settings.seq_len,
        cache_if=lambda pair: unbelievable_gap(pair["fp32"], pair["bf16"], plan.gradient_checkpointing) is None)
    return measured["fp32"], measured["bf16"]
