"""How long a run takes and what it costs: declared cloud machine types, time, dollars.

Machine types are GCP's. Their hardware (vCPUs, RAM, CPU and its flags, all-core turbo clock,
the GPU) is declared here; their peak dense FLOP/s per dtype come from `cpuft.hardware.peaks`
(cores x all-core turbo x FLOP/cycle, or the GPU datasheet); their hourly us-central1 prices
(on-demand and spot) come from `gcp_prices.csv` beside this module, the same file Terraform
reads for `infra/` (`price_table_csv`). Peaks are theoretical; real training reaches a fraction
of them, which is why every estimate carries an explicit utilisation.

Prices move. The c3-standard-22/44 figures are from early-2025 us-central1 price data; the rows
marked approximate in the CSV are derived or estimated, and the time estimate says so.
Every declared machine type must have a row in the CSV (import fails otherwise); the CSV may
price more types than are declared here (Terraform can provision them).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from importlib import resources

from cpuft.errors import UserError
from cpuft.hardware.peaks import cpu_peak_flops, gpu_peak_flops
from cpuft.hardware.probe import CudaDevice, Machine
from cpuft.planning.flops import training_flops_per_token

GB = 10**9
GIB = 2**30
PRICE_TABLE = "gcp_prices.csv"

SAPPHIRE_RAPIDS_FLAGS = ("amx_bf16", "amx_int8", "amx_tile", "avx512_bf16", "avx512_f", "avx512_vnni", "avx2", "fma3")
ICE_LAKE_FLAGS = ("avx512_f", "avx512_vnni", "avx2", "fma3")
CASCADE_LAKE_FLAGS = ("avx512_f", "avx512_vnni", "avx2", "fma3")


@dataclass(frozen=True)
class Price:
    on_demand_usd_per_hour: float
    spot_usd_per_hour: float
    approximate: bool
    note: str = ""


def read_price_table(text: str | None = None) -> dict[str, Price]:
    """{machine type: Price} from the CSV text (default: the packaged gcp_prices.csv)."""
    if text is None:
        text = resources.files("cpuft.planning").joinpath(PRICE_TABLE).read_text()
    prices = {}
    for row in csv.DictReader(io.StringIO(text)):
        prices[row["machine_type"]] = Price(
            on_demand_usd_per_hour=float(row["on_demand_usd_per_hour"]),
            spot_usd_per_hour=float(row["spot_usd_per_hour"]),
            approximate=row.get("approximate", "yes").strip().lower() != "no",
            note=row.get("note", ""),
        )
    return prices


@dataclass(frozen=True)
class MachineType:
    name: str
    vcpus: int
    ram_bytes: int
    cpu_name: str
    cpu_flags: tuple[str, ...]
    cpu_ghz: float  # all-core turbo
    on_demand_usd_per_hour: float
    spot_usd_per_hour: float
    prices_approximate: bool = True
    gpu: CudaDevice | None = None
    price_note: str = ""  # where the price comes from (the CSV's note column)

    @property
    def physical_cores(self) -> int:
        return self.vcpus // 2  # GCP x86 vCPUs are hyperthreads, 2 per core

    def as_machine(self) -> Machine:
        """A synthetic Machine, so the planner plans for this type as if cpuft had probed it."""
        return Machine(
            cpu_name=self.cpu_name,
            cpu_flags=frozenset(self.cpu_flags),
            physical_cores=self.physical_cores,
            logical_cores=self.vcpus,
            usable_cpus=self.vcpus,
            ram_bytes=self.ram_bytes,
            cpu_max_mhz=self.cpu_ghz * 1000,
            torch_cpu_isa="AVX512",
            cuda_devices=(self.gpu,) if self.gpu else (),
        )

    @property
    def peak_flops(self) -> dict[str, float]:
        """dtype -> dense peak FLOP/s of the device that trains (the GPU if there is one)."""
        if self.gpu is not None:
            peaks = {dtype: gpu_peak_flops(self.gpu.name, dtype)[0] for dtype in ("bf16", "fp16", "fp32")}
            return {dtype: peak for dtype, peak in peaks.items() if peak}
        machine = self.as_machine()
        dtypes = ["fp32"]
        if machine.native_bf16:
            dtypes.append("bf16")
        if machine.has("amx_fp16"):
            dtypes.append("fp16")
        return {
            dtype: cpu_peak_flops(self.physical_cores, machine.cpu_max_mhz, machine.cpu_flags, dtype,
                                  machine.vendor, machine.cpu_family)[0]
            for dtype in dtypes
        }

    def peak_for(self, dtype: str) -> float | None:
        return self.peak_flops.get(dtype)


def _declared_machine_types(prices: dict[str, Price]) -> dict[str, MachineType]:
    def priced(name: str, **spec) -> MachineType:
        if name not in prices:
            raise RuntimeError(f"cpuft/planning/{PRICE_TABLE} has no row for declared machine type {name}")
        price = prices[name]
        return MachineType(
            name=name, on_demand_usd_per_hour=price.on_demand_usd_per_hour,
            spot_usd_per_hour=price.spot_usd_per_hour, prices_approximate=price.approximate,
            price_note=price.note, **spec,
        )

    def c3(vcpus: int) -> MachineType:
        return priced(f"c3-standard-{vcpus}", vcpus=vcpus, ram_bytes=4 * vcpus * GB,
                      cpu_name="Intel Xeon Platinum 8481C (Sapphire Rapids)", cpu_flags=SAPPHIRE_RAPIDS_FLAGS, cpu_ghz=3.0)

    def c4(vcpus: int) -> MachineType:
        # Emerald Rapids, 3.1 GHz all-core.
        return priced(f"c4-standard-{vcpus}", vcpus=vcpus, ram_bytes=int(3.75 * vcpus * GB),
                      cpu_name="Intel Xeon Platinum 8581C (Emerald Rapids)", cpu_flags=SAPPHIRE_RAPIDS_FLAGS, cpu_ghz=3.1)

    def n2(vcpus: int) -> MachineType:
        # Ice Lake (AVX-512, no bf16 instructions), 3.1 GHz all-core.
        return priced(f"n2-standard-{vcpus}", vcpus=vcpus, ram_bytes=4 * vcpus * GB,
                      cpu_name="Intel Xeon (Ice Lake)", cpu_flags=ICE_LAKE_FLAGS, cpu_ghz=3.1)

    types = [
        *(c3(n) for n in (4, 8, 22, 44, 88)),
        *(c4(n) for n in (8, 16, 32, 48, 96, 192)),
        *(n2(n) for n in (8, 16, 32, 64, 128)),
        priced(
            "g2-standard-8", vcpus=8, ram_bytes=32 * GB, cpu_name="Intel Xeon (Cascade Lake)",
            cpu_flags=CASCADE_LAKE_FLAGS, cpu_ghz=3.1,
            gpu=CudaDevice(name="NVIDIA L4", total_memory_bytes=24 * GB, bf16_supported=True, compute_capability="8.9"),
        ),
        priced(
            "a2-highgpu-1g", vcpus=12, ram_bytes=85 * GB, cpu_name="Intel Xeon (Cascade Lake)",
            cpu_flags=CASCADE_LAKE_FLAGS, cpu_ghz=3.1,
            gpu=CudaDevice(name="NVIDIA A100-SXM4-40GB", total_memory_bytes=40 * GIB, bf16_supported=True, compute_capability="8.0"),
        ),
        priced(
            "a3-highgpu-1g", vcpus=26, ram_bytes=234 * GB, cpu_name="Intel Xeon Platinum 8481C (Sapphire Rapids)",
            cpu_flags=SAPPHIRE_RAPIDS_FLAGS, cpu_ghz=3.0,
            gpu=CudaDevice(name="NVIDIA H100 80GB HBM3", total_memory_bytes=80 * GIB, bf16_supported=True, compute_capability="9.0"),
        ),
    ]
    return {m.name: m for m in types}


MACHINE_TYPES: dict[str, MachineType] = _declared_machine_types(read_price_table())


def machine_type(name: str) -> MachineType:
    """Look up a declared machine type; raises KeyError with the known names."""
    try:
        return MACHINE_TYPES[name]
    except KeyError:
        raise KeyError(f"unknown machine type {name!r}; known: {', '.join(MACHINE_TYPES)}") from None


def declared_machine_type(job) -> MachineType | None:
    """The declared machine type `job.machine_type` names (None when unset); UserError naming
    where it was set when cpuft does not know it. Checked before anything is written."""
    if job.machine_type is None:
        return None
    try:
        return machine_type(job.machine_type)
    except KeyError as exc:
        where = job.origins.get("machine_type", "machine_type")
        raise UserError(f"{where}: {exc.args[0]}; `cpuft plan --list-machine-types` describes them.") from None


# ----------------------------------------------------------------------------- time and cost


@dataclass(frozen=True)
class TimeEstimate:
    tokens: int  # trained tokens per epoch (non-padding, truncated to max_length)
    epochs: float
    flops_per_token: float
    flops_per_second: float  # the figure the estimate divides by, before utilisation
    flops_source: str  # "measured matmul" or "declared peak (c3-standard-44, bf16)"
    utilization: float | None  # None when the time comes from measured step parts
    seconds_per_epoch: float
    usd_per_hour_on_demand: float | None = None
    usd_per_hour_spot: float | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)
    # From measured step parts (cpuft.planning.step_cost), None on the FLOP-count path:
    step_costs: dict | None = None  # StepCosts.to_dict(): one micro-batch's parts as measured
    parts_seconds: dict[str, float] | None = None  # the whole run's seconds by part
    micro_batches: float | None = None  # over the whole run
    optimizer_steps: float | None = None

    @property
    def total_seconds(self) -> float:
        return self.seconds_per_epoch * self.epochs

    @property
    def cost_on_demand(self) -> float | None:
        return None if self.usd_per_hour_on_demand is None else self.total_seconds / 3600 * self.usd_per_hour_on_demand

    @property
    def cost_spot(self) -> float | None:
        return None if self.usd_per_hour_spot is None else self.total_seconds / 3600 * self.usd_per_hour_spot

    def to_dict(self) -> dict:
        return {
            "tokens_per_epoch": self.tokens,
            "epochs": self.epochs,
            "flops_per_token": self.flops_per_token,
            "flops_per_second": self.flops_per_second,
            "flops_source": self.flops_source,
            "utilization": self.utilization,
            "seconds_per_epoch": self.seconds_per_epoch,
            "total_seconds": self.total_seconds,
            "usd_per_hour_on_demand": self.usd_per_hour_on_demand,
            "usd_per_hour_spot": self.usd_per_hour_spot,
            "cost_usd_on_demand": self.cost_on_demand,
            "cost_usd_spot": self.cost_spot,
            "step_costs": self.step_costs,
            "parts_seconds": self.parts_seconds,
            "micro_batches": self.micro_batches,
            "optimizer_steps": self.optimizer_steps,
            "notes": list(self.notes),
        }

    def format(self) -> str:
        lines = [
            f"Time plan: {self.tokens:,} tokens/epoch x {self.epochs:.3g} epoch(s),"
            f" {self.flops_per_token / 1e9:,.2f} GFLOP/token",
        ]
        if self.step_costs is None:
            lines.append(
                f"  FLOP/s         {self.flops_per_second / 1e12:,.3f} TFLOP/s ({self.flops_source})"
                f" at {self.utilization:.0%} utilisation"
            )
        else:
            c = self.step_costs
            layer = c["layer_forward_seconds"] + c["layer_backward_seconds"]
            lines += [
                f"  measured       {c['source']} ({c['measure_seconds']:.1f} s, cached per shape)",
                f"  micro-batch    {c['rows']} x {c['seq_len']} tokens: {c['num_layers']} layers x {layer:.3f} s"
                f" (forward {c['layer_forward_seconds']:.3f} + backward {c['layer_backward_seconds']:.3f})"
                f" + lm_head/loss {c['head_seconds_per_token'] * 1000:.2f} ms/token + other {c['other_seconds']:.2f} s",
                f"  optimizer step AdamW {c['optimizer_seconds'] * 1000:.0f} ms"
                + (f" + all-reduce {self.parts_seconds['all-reduce'] / max(1.0, self.optimizer_steps):.2f} s"
                   if self.parts_seconds.get("all-reduce") else ""),
                f"  run            {self.micro_batches:,.0f} micro-batches, {self.optimizer_steps:,.0f} optimizer steps; "
                + ", ".join(f"{name} {format_duration(sec)}" for name, sec in self.parts_seconds.items() if sec),
                f"  achieved       {self.flops_per_second / 1e9:,.1f} GFLOP/s of useful matmul work",
            ]
        lines += [
            f"  per epoch      {format_duration(self.seconds_per_epoch)}",
            f"  total          {format_duration(self.total_seconds)}",
        ]
        if self.cost_on_demand is not None:
            lines.append(
                f"  cost           ${self.cost_on_demand:,.2f} on demand (${self.usd_per_hour_on_demand:.2f}/h),"
                f" ${self.cost_spot:,.2f} spot (${self.usd_per_hour_spot:.2f}/h)"
            )
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)


def estimate_run_time(
    tokens: int, epochs: float, flops_per_token: float, flops_per_second: float, flops_source: str,
    utilization: float, machine: MachineType | None = None, notes: tuple[str, ...] = (),
) -> TimeEstimate:
    seconds = tokens * flops_per_token / (flops_per_second * utilization)
    all_notes = list(notes)
    if machine is not None and machine.prices_approximate:
        all_notes.append(
            f"{machine.name} prices are approximate us-central1 figures ({machine.price_note});"
            " check current prices"
        )
    return TimeEstimate(
        tokens=tokens, epochs=epochs, flops_per_token=flops_per_token, flops_per_second=flops_per_second,
        flops_source=flops_source, utilization=utilization, seconds_per_epoch=seconds,
        usd_per_hour_on_demand=machine.on_demand_usd_per_hour if machine else None,
        usd_per_hour_spot=machine.spot_usd_per_hour if machine else None,
        notes=tuple(all_notes),
    )


def format_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def planned_epochs(max_steps: int, effective_batch_size: int, rows_per_epoch: float, num_train_epochs: float) -> float:
    """Epochs the run will cover: max_steps (when set, > 0) wins over num_train_epochs, as in the Trainer."""
    if max_steps > 0:
        return max_steps * effective_batch_size / max(1.0, rows_per_epoch)
    return num_train_epochs


# Share of the FLOP/s figure training reaches, on the FLOP-count path (declared machine types,
# CUDA, QLoRA, architectures step_cost cannot build, or an explicit --utilization). A large
# square GEMM is the best case; training adds skinny matmuls, attention, norms, the optimizer and
# data handling. On this machine's own CPU the plan measures the step's parts instead: the fixed
# 50 % of the measured matmul was 3-10x optimistic there (docs/speed.md).
UTILIZATION_OF_MEASURED_MATMUL = 0.5
UTILIZATION_OF_DECLARED_PEAK = {"cpu": 0.25, "cuda": 0.35}
# Padding left in cpuft's length-grouped micro-batches (cpuft.data.packing), as measured by
# `cpuft bench` on LIMA-shaped data: 11.3 %, 11.4 %, 16.1 % (docs/speed.md). Packed rows hold none.
LENGTH_GROUPED_PADDING = 0.12
# Measured sequence lengths are rounded up to this multiple so similar datasets share a cached
# measurement; the time is scaled back to the planned length.
SEQ_LEN_BUCKET = 32


def micro_batch_shape(settings, mean_seq_len: float, packed: bool) -> tuple[int, float]:
    """(rows, padded tokens per row) of an average micro-batch: packed rows are full; length-grouped
    rows carry the mean length plus the padding grouping leaves."""
    if packed:
        return settings.batch_size, float(settings.seq_len)
    return settings.batch_size, min(float(settings.seq_len), mean_seq_len / (1 - LENGTH_GROUPED_PADDING))


def run_seconds_from_parts(
    costs, micro_batches: float, optimizer_steps: float, gradient_checkpointing: bool, head_tokens: float,
    allreduce_seconds_per_step: float = 0.0, length_scale: float = 1.0,
) -> tuple[float, dict[str, float]]:
    """(seconds, seconds by part) for a run of `micro_batches` forward+backward passes and
    `optimizer_steps` optimizer steps, from one micro-batch's measured parts `costs`
    (cpuft.planning.step_cost.StepCosts). `length_scale`: planned / measured tokens per row
    (costs are linear in it at these lengths). `head_tokens`: positions the lm_head scores per
    micro-batch (the labelled ones with the compact CPU head, every one with TRL's). `allreduce_seconds_per_step`: DDP's gradient
    exchange per optimizer step, 0 in one process."""
    layer_forward = costs.layer_forward_seconds * (2 if gradient_checkpointing else 1)
    parts = {
        "decoder layers": micro_batches * costs.num_layers * (layer_forward + costs.layer_backward_seconds) * length_scale,
        "lm_head + loss": micro_batches * costs.head_seconds_per_token * head_tokens,
        "other": micro_batches * costs.other_seconds * length_scale,
        "optimizer": optimizer_steps * costs.optimizer_seconds,
        "all-reduce": optimizer_steps * allreduce_seconds_per_step,
    }
    return sum(parts.values()), parts


def time_for_run(
    plan, shape, settings, trainable_params: int, tokens: int, epochs: float, mean_seq_len: float,
    machine: MachineType | None = None, utilization: float | None = None, model_config=None,
) -> TimeEstimate:
    """Time (and cost on a declared machine type) for one run of `plan` (threads, accumulation,
    packing, fast paths, DDP all-reduce). `shape` is a memory.ModelShape, `settings` a
    memory.RunSettings.

    On this machine's CPU, with `model_config` (the transformers config) given and no explicit
    `utilization`, from the step's parts measured at the run's shapes (cpuft.planning.step_cost);
    otherwise from the FLOP count at a utilisation of the declared peak or a measured matmul."""
    output_head_matmul = shape.vocab_size * shape.hidden_size  # tied or not, the head is a matmul
    flops_per_token = training_flops_per_token(
        shape.linear_params + output_head_matmul, trainable_params, shape.num_layers, shape.hidden_size,
        mean_seq_len, full_finetune=settings.training == "full",
        gradient_checkpointing=settings.gradient_checkpointing,
    )
    device = settings.device
    notes = []
    if settings.quantization != "none" and device == "cpu":
        notes.append("QLoRA on CPU dequantises weights every matmul; expect it slower than this FLOP count says")
    if machine is None and device == "cpu" and utilization is None and model_config is not None:
        why_not = _why_not_measured(shape, settings)
        if why_not is None:
            try:
                return _measured_time(plan, settings, tokens, epochs, mean_seq_len, model_config, flops_per_token)
            except Exception as exc:  # an architecture the measurement cannot build: plan from FLOPs
                why_not = f"measuring the step failed ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
        notes.append(f"{why_not}: estimated from the FLOP count at a fixed utilisation, often 3-10x optimistic on CPU")
    if machine is not None:
        peak = machine.peak_for(settings.compute_dtype) or machine.peak_for("fp32")
        source = f"declared peak, {machine.name} {settings.compute_dtype}"
        default_utilization = UTILIZATION_OF_DECLARED_PEAK[device]
    elif device == "cuda" and plan.peak_flops:
        peak, source = plan.peak_flops, "GPU datasheet peak"
        default_utilization = UTILIZATION_OF_DECLARED_PEAK["cuda"]
    else:
        from cpuft.hardware.gemm import measure_gemm_flops

        peak = measure_gemm_flops(1024, 1024, 1024, settings.compute_dtype, plan.threads).flops_per_second
        source = f"measured {settings.compute_dtype} 1024^3 matmul on this machine, {plan.threads} threads"
        default_utilization = UTILIZATION_OF_MEASURED_MATMUL
    return estimate_run_time(
        tokens, epochs, flops_per_token, peak, source, utilization or default_utilization, machine, tuple(notes),
    )


def _why_not_measured(shape, settings) -> str | None:
    """Why step_cost cannot measure this run (None when it can)."""
    if settings.quantization != "none":
        return "step parts are measured for unquantised weights only"
    if settings.training != "adapter" or settings.peft_method != "lora":
        return f"step parts are measured for LoRA only, not {settings.method_label}"
    if shape.encoder_decoder:
        return "step parts are measured for decoder-only models only"
    return None


def _measured_time(plan, settings, tokens, epochs, mean_seq_len, model_config, flops_per_token) -> TimeEstimate:
    import math

    from cpuft.planning.step_cost import step_costs

    packed, cpu_lm_head = plan.packing, plan.cpu_lm_head
    rows, row_tokens = micro_batch_shape(settings, mean_seq_len, packed)
    measured_len = min(settings.seq_len, SEQ_LEN_BUCKET * math.ceil(row_tokens / SEQ_LEN_BUCKET))
    costs = step_costs(model_config, settings, plan, rows, measured_len)
    # Rows the run trains (each micro-batch holds `rows` of them), then micro-batches and steps.
    tokens_per_micro_batch = rows * (row_tokens if packed else mean_seq_len)
    micro_batches = tokens * epochs / max(1.0, tokens_per_micro_batch)
    optimizer_steps = micro_batches / max(1, plan.gradient_accumulation_steps)
    # The compact CPU head scores the trained (non-padding) positions only; TRL's every slot.
    head_tokens = tokens_per_micro_batch if cpu_lm_head else rows * row_tokens
    seconds, parts = run_seconds_from_parts(
        costs, micro_batches, optimizer_steps, settings.gradient_checkpointing, head_tokens,
        plan.allreduce.seconds if plan.allreduce else 0.0, length_scale=row_tokens / measured_len,
    )
    if plan.compiled_elementwise:
        from cpuft.fastpaths.compiled_elementwise import compiled_in_this_process
        from cpuft.planning.plan import ELEMENTWISE_COMPILE_WARMUP_SECONDS

        # Compiled while the step was measured (this process): already paid. Otherwise the
        # first run on a machine pays it whole (inductor's disk cache shortens later ones).
        parts["compile warm-up"] = 0.0 if compiled_in_this_process() else ELEMENTWISE_COMPILE_WARMUP_SECONDS
        seconds += parts["compile warm-up"]
    seconds_per_epoch = seconds / epochs if epochs else 0.0
    return TimeEstimate(
        tokens=tokens, epochs=epochs, flops_per_token=flops_per_token,
        flops_per_second=tokens * epochs * flops_per_token / seconds if seconds else 0.0,
        flops_source="implied by the measured step parts", utilization=None,
        seconds_per_epoch=seconds_per_epoch, step_costs=costs.to_dict(), parts_seconds=parts,
        micro_batches=micro_batches, optimizer_steps=optimizer_steps,
        notes=(f"rows padded to ~{row_tokens:.0f} tokens ({'packed' if packed else f'length-grouped, {LENGTH_GROUPED_PADDING:.0%} padding assumed'});"
               " eval, saving and data loading not counted",),
    )
