"""The planner: (machine facts, user request) -> a frozen, printable Plan with a reason per choice.

`plan_for` is pure: no hardware probing, no I/O, no torch. Everything downstream (trainer,
summary, `cpuft env`) reads the Plan and never decides hardware questions again.

Rules (each is a measured fact, see README "Why the plan says what it says"):
- CPU with AMX or AVX-512-BF16: bf16 autocast, base weights loaded in bf16 (stock PyTorch sends
  bf16 matmuls to oneDNN's AMX kernels).
- CPU with AVX2 only: fp32. bf16 is emulated there and ran 2.5-3x slower.
- CUDA: bf16 where the GPU has it (Ampere+), else fp16; NF4 QLoRA when asked or when bf16 weights
  would not fit in GPU memory.
- Gradient checkpointing off unless memory requires it: it recomputes the forward pass (~1.5x
  slower measured here). `plan_for` does not see the memory estimate;
  `cpuft.planning.fit.fit_plan_to_memory` does, and turns checkpointing (or a smaller micro-batch,
  or NF4) on when the run would not fit otherwise.
- One compute thread per physical core: hyperthreads share the FMA/AMX units and only add
  contention. Under DDP (`ranks_per_node` x `nodes` processes, cpuft.planning.world) each rank
  takes its share of its node's cores, never all of them, and the optimizer step's batch is the
  per-rank batch x the world size.
- The model's own facts (cpuft.planning.architecture: class, task type, attention, adapter
  targets) come in the request, so the memory fit sizes the attention the run will use.

Raises PlanError for requests that cannot work (cuda without a GPU, fp16 on a CPU without
AMX-FP16, bf16 on a GPU without it); returns warnings for requests that work but are slow.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from cpuft.config.choices import DeviceRequest, DtypeRequest, QuantRequest
from cpuft.dtypes import DTYPE_BYTES
from cpuft.errors import PlanError
from cpuft.hardware.peaks import cpu_peak_flops, gpu_peak_flops
from cpuft.hardware.probe import Machine
from cpuft.planning.world import AllReduceEstimate, threads_per_rank

# Fraction of GPU memory bf16 weights may take before the planner switches to NF4: the rest is
# needed for activations, LoRA optimizer state and the CUDA context.
GPU_WEIGHTS_BUDGET = 0.6

# Attention implementations whose masks honour packed position_ids, so packed samples stay apart
# (why: the docstring of cpuft.data.packing; proof: tests/test_packing.py).
PACKING_SAFE_ATTENTION = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")
# torch.compile (inductor) on CPU: ~45 s of warm-up with fixed shapes (FACTS.md); with SFT's
# varying sequence lengths it recompiles per new shape: 20 tiny-model steps took 490 s compiled
# vs 41 s eager (shared machine), steady steps then ~12 % faster. It repays only very long runs,
# and step time is unknown before the run, so the rule counts steps.
COMPILE_WARMUP_SECONDS = 45.0
COMPILE_STEADY_GAIN = 0.11
COMPILE_MIN_STEPS_CPU = 5000
# cpuft.fastpaths.compiled_elementwise: inductor's first compile of its kernels (forward and
# backward) measured ~27 s on a 2-core EPYC, ~5 s once inductor's disk cache holds them (later
# runs on the machine), and the time plan counts it. From ~50M parameters a micro-batch takes
# seconds and the kernels save a share of each (docs/speed.md, "Round 2"); below, the compile
# would cost more than a short run saves.
ELEMENTWISE_COMPILE_WARMUP_SECONDS = 27.0
ELEMENTWISE_COMPILE_MIN_PARAMS = 50_000_000
ELEMENTWISE_COMPILE_MEASURED = (
    "at Qwen2.5-0.5B's shapes on an AVX-512-BF16 EPYC the head's log-softmax tiles ran 2x faster, hashed"
    " dropout masks 4x faster than drawn ones, and the step's time outside the frozen and lm_head GEMMs"
    " fell with short-row attention (docs/speed.md, Round 2)"
)


@dataclass(frozen=True)
class PlanRequest:
    """What the user asked for; 'auto' and None leave the choice to the planner."""

    device: DeviceRequest = "auto"
    dtype: DtypeRequest = "auto"
    quant: QuantRequest = "auto"
    threads: int | None = None
    per_device_batch_size: int | None = None
    gradient_accumulation_steps: int | None = None
    gradient_checkpointing: bool | None = None
    packing: bool = False
    attn_implementation: str | None = None
    max_steps: int | None = None  # sizes the torch.compile decision; None or -1: unknown
    torch_compile: bool | None = None
    compiled_elementwise: bool | None = None  # None: the planner decides (run length, model size, a compiler)
    model_params: int | None = None  # from the model's config, when known; sizes the NF4 decision
    ranks_per_node: int = 1  # DDP processes on each node (torchrun's --nproc-per-node)
    nodes: int = 1  # machines in the job (torchrun's --nnodes)
    architecture: Any = None  # cpuft.planning.architecture.ArchitectureFacts, when the config is read

    @classmethod
    def from_job(
        cls, job, model_params: int | None = None, ranks_per_node: int = 1, nodes: int = 1, architecture=None,
    ) -> PlanRequest:
        """The hardware request inside a job config (`cpuft.config.job.SFTJobConfig`), in a world of
        `ranks_per_node` x `nodes` processes, for the model `architecture` describes."""
        return cls(
            device=job.device,
            dtype=job.dtype,
            quant=job.quant,
            threads=job.threads,
            per_device_batch_size=job.per_device_batch_size,
            gradient_accumulation_steps=job.gradient_accumulation_steps,
            gradient_checkpointing=job.gradient_checkpointing,
            packing=job.packing,
            attn_implementation=job.attn_implementation,
            max_steps=job.max_steps,
            torch_compile=job.torch_compile,
            model_params=model_params,
            ranks_per_node=ranks_per_node,
            nodes=nodes,
            architecture=architecture,
        )


@dataclass(frozen=True)
class Plan:
    device: Literal["cpu", "cuda"]
    compute_dtype: Literal["fp32", "bf16", "fp16"]
    weights_dtype: Literal["fp32", "bf16", "fp16"]
    quantization: Literal["none", "nf4", "int8"]
    threads: int
    attn_implementation: str
    per_device_batch_size: int
    gradient_accumulation_steps: int
    gradient_checkpointing: bool
    packing: bool
    length_grouping: bool
    peak_flops: float | None
    reasons: dict[str, str] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    torch_compile: bool = False
    cpu_lm_head: bool = False  # cpuft.fastpaths.chunked_loss: lm_head + loss at labelled positions, heap-sized tiles
    fused_lora: bool = False  # cpuft.fastpaths.fused_lora: each LoRA linear's training pass as one autograd node
    compiled_elementwise: bool = False  # cpuft.fastpaths.compiled_elementwise: norms, rotary, SiLU, dropout compiled
    short_row_attention: bool = False  # cpuft.fastpaths.short_attention: short rows by batched GEMMs
    # The model's own facts (cpuft.planning.architecture); None when the request had none.
    model_class: str | None = None
    task_type: str | None = None
    target_modules: str | None = None
    # The world: DDP ranks per node x nodes (threads and per_device_batch_size are per rank).
    ranks_per_node: int = 1
    nodes: int = 1
    # DDP's gradient all-reduce per optimizer step; set by cpuft.planning.fit.plan_job once the
    # memory plan knows the gradient bytes; None in one process.
    allreduce: AllReduceEstimate | None = None
    # `cpuft dpo` (cpuft.planning.preference): a batch counts chosen/rejected pairs, and the
    # reference model's log-probs come from one pass before training or a forward every step.
    job: str = "sft"
    precompute_ref_log_probs: bool = False

    @property
    def effective_batch_size(self) -> int:
        """Samples per optimizer step on one rank: micro-batch x accumulation."""
        return self.per_device_batch_size * self.gradient_accumulation_steps

    @property
    def adapter_dtype(self) -> str | None:
        """The trainable adapter's dtype: fp32 on a CPU, whatever the compute dtype (with fp32
        compute on AVX2 bf16 would only be slower; under bf16 autocast the matmuls still run in
        bf16 and the fp32 master copy, a few MB, keeps small updates from rounding away). None on
        CUDA: the libraries' choice (TRL casts a quantised model's adapter to bf16)."""
        return "fp32" if self.device == "cpu" else None

    @property
    def world_size(self) -> int:
        return self.ranks_per_node * self.nodes

    @property
    def global_batch_size(self) -> int:
        """Samples per optimizer step over all ranks: DDP averages the ranks' gradients."""
        return self.effective_batch_size * self.world_size

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["dtype"] = self.compute_dtype  # the short name scripts look for
        data["warnings"] = list(self.warnings)
        data["effective_batch_size"] = self.effective_batch_size
        data["world_size"] = self.world_size
        data["global_batch_size"] = self.global_batch_size
        return data

    def rows(self) -> list[tuple[str, str, str]]:
        """(choice, value, why) rows for a table."""
        peak = f"{self.peak_flops / 1e12:.2f} TFLOP/s" if self.peak_flops else "unknown"
        values = {
            "device": self.device,
            "compute_dtype": self.compute_dtype,
            "weights_dtype": self.weights_dtype,
            "quantization": self.quantization,
            "world": self._world_value(),
            "threads": f"{self.threads} per rank" if self.world_size > 1 else str(self.threads),
            "attn_implementation": self.attn_implementation,
            "batch": f"{self.per_device_batch_size} x {self.gradient_accumulation_steps} accumulation"
            f" = {self.effective_batch_size}"
            + (f" per rank, {self.global_batch_size} global" if self.world_size > 1 else "")
            + (" pairs" if self.job == "dpo" else ""),
            "gradient_checkpointing": "on" if self.gradient_checkpointing else "off",
            "packing": "on" if self.packing else "off",
            "length_grouping": "on" if self.length_grouping else "off",
            "torch_compile": "on" if self.torch_compile else "off",
            "cpu_lm_head": "on" if self.cpu_lm_head else "off",
            "fused_lora": "on" if self.fused_lora else "off",
            "compiled_elementwise": "on" if self.compiled_elementwise else "off",
            "short_row_attention": "on" if self.short_row_attention else "off",
            "peak_flops": peak,
        }
        if self.job == "dpo":
            values["reference"] = "precomputed, one pass" if self.precompute_ref_log_probs else "forward each step"
        if self.allreduce is not None:
            values["allreduce"] = f"{self.allreduce.summary()} per step"
        for name in ("model_class", "task_type", "target_modules"):
            if getattr(self, name) is not None:
                values[name] = getattr(self, name)
        reasons = {**self.reasons, **({"allreduce": self.allreduce.assumption} if self.allreduce else {})}
        return [(name, value, reasons.get(name, "")) for name, value in values.items()]

    def _world_value(self) -> str:
        if self.world_size == 1:
            return "1 process"
        nodes = f" x {self.nodes} nodes" if self.nodes > 1 else " on 1 node"
        return f"{self.world_size} ranks = {self.ranks_per_node} per node{nodes}"


def plan_for(machine: Machine, request: PlanRequest) -> Plan:
    """Choose how to run on `machine`. Pure: the same inputs always give the same Plan."""
    reasons: dict[str, str] = {}
    warnings: list[str] = []

    device = _choose_device(machine, request.device, reasons)
    if device == "cuda":
        gpu = machine.cuda_devices[0]
        compute_dtype = _choose_cuda_dtype(gpu, request.dtype, reasons)
        quantization = _choose_cuda_quant(gpu, request, reasons)
    else:
        compute_dtype = _choose_cpu_dtype(machine, request.dtype, reasons, warnings)
        quantization = _choose_cpu_quant(request.quant, reasons, warnings, machine, request, compute_dtype)
    weights_dtype = compute_dtype
    reasons["weights_dtype"] = weights_dtype_reason(quantization, compute_dtype)

    _choose_world(machine, request, device, reasons)
    threads = _choose_threads(machine, request.threads, request.ranks_per_node, reasons, warnings)

    reasons["attn_implementation"] = (
        "requested" if request.attn_implementation else
        "PyTorch SDPA: fused attention on CPU and CUDA without extra packages"
    )
    attn = request.attn_implementation or "sdpa"

    default_batch, default_accumulation = (8, 2) if device == "cuda" else (4, 4)
    batch = request.per_device_batch_size or default_batch
    accumulation = request.gradient_accumulation_steps or default_accumulation
    if batch < 1 or accumulation < 1:
        raise PlanError(
            f"per_device_batch_size ({batch}) and gradient_accumulation_steps ({accumulation})"
            " must be at least 1."
        )
    if request.per_device_batch_size and request.gradient_accumulation_steps:
        reasons["batch"] = "requested"
    elif request.per_device_batch_size or request.gradient_accumulation_steps:
        reasons["batch"] = f"requested {'micro-batch' if request.per_device_batch_size else 'accumulation'}; the other is {device}'s default"
    else:
        reasons["batch"] = (
            f"default for {device}: small micro-batches keep padding low, accumulation keeps"
            " the optimizer batch at 16"
        )
    if request.ranks_per_node * request.nodes > 1:
        world = request.ranks_per_node * request.nodes
        reasons["batch"] += (
            f"; all per rank: each of the {world} ranks trains its own micro-batches and DDP averages"
            f" their gradients, so an optimizer step sees {world} x as many samples (the global batch)"
        )

    if request.gradient_checkpointing is not None:
        checkpointing = request.gradient_checkpointing
        reasons["gradient_checkpointing"] = "requested"
        if checkpointing and device == "cpu":
            warnings.append(
                "gradient checkpointing recomputes the forward pass: about 1.5x slower on CPU;"
                " use it only when memory is short."
            )
    elif quantization == "nf4":
        checkpointing = True
        reasons["gradient_checkpointing"] = "QLoRA is chosen to save memory; checkpointing saves more"
    else:
        checkpointing = False
        reasons["gradient_checkpointing"] = (
            "off: it recomputes the forward pass (~1.5x slower measured); the memory check turns it"
            " on when the run would not fit without it"
        )

    if request.packing:
        if attn not in PACKING_SAFE_ATTENTION:
            raise PlanError(
                f"packing with attn_implementation {attn!r} could let attention cross sample"
                f" boundaries; use one of {', '.join(PACKING_SAFE_ATTENTION)} or turn packing off."
            )
        reasons["packing"] = (
            "requested: whole samples fill rows of max_length; position_ids restart per sample and"
            f" {attn}'s mask keeps samples apart (per-sample loss packed = unpacked, tests/test_packing.py)"
        )
        if request.per_device_batch_size is None:
            # TRL flattens a packed micro-batch into one sequence; attention work grows with its square.
            batch = 1
            reasons["batch"] = "packing: one packed row of max_length tokens per micro-batch, accumulated"
        elif batch > 1:
            warnings.append(
                f"packing with per_device_batch_size {batch}: TRL joins the {batch} packed rows into one"
                f" sequence of {batch} x max_length tokens and attention costs grow with its square;"
                " per_device_batch_size 1 with more accumulation is faster."
            )
        length_grouping = False
        reasons["length_grouping"] = "off: packed rows hold no padding"
    else:
        length_grouping = True
        reasons["packing"] = (
            "off (packing: true turns it on): length grouping keeps padding low and each optimizer"
            " step a fixed number of samples"
        )
        reasons["length_grouping"] = (
            "rows ordered so each micro-batch holds similar lengths: little compute spent on padding"
        )
    torch_compile = _choose_compile(request, device, reasons)
    cpu_lm_head = _choose_cpu_eager_path("cpu_lm_head", device, torch_compile, reasons)
    fused_lora = _choose_cpu_eager_path("fused_lora", device, torch_compile, reasons)
    compiled_elementwise = _choose_compiled_elementwise(request, device, torch_compile, reasons)
    short_row_attention = _choose_cpu_eager_path("short_row_attention", device, torch_compile, reasons)

    peak = _peak_flops(machine, device, compute_dtype, threads, reasons)
    plan = Plan(
        device=device,
        compute_dtype=compute_dtype,
        weights_dtype=weights_dtype,
        quantization=quantization,
        threads=threads,
        attn_implementation=attn,
        per_device_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        gradient_checkpointing=checkpointing,
        packing=request.packing,
        length_grouping=length_grouping,
        peak_flops=peak,
        reasons=reasons,
        warnings=tuple(warnings),
        torch_compile=torch_compile,
        cpu_lm_head=cpu_lm_head,
        fused_lora=fused_lora,
        compiled_elementwise=compiled_elementwise,
        short_row_attention=short_row_attention,
        ranks_per_node=request.ranks_per_node,
        nodes=request.nodes,
    )
    return plan if request.architecture is None else with_architecture(plan, request.architecture)


def with_architecture(plan: Plan, facts) -> Plan:
    """`plan` with the model's class, task type, attention and adapter targets and their reasons
    (`facts`: cpuft.planning.architecture.ArchitectureFacts, which checked a requested attention).
    `plan_for` applies it when the request carries the facts; callers that plan without them
    may apply it afterwards (the memory fit then sized the default attention)."""
    reasons = dict(plan.reasons)
    for name, _value, why in facts.rows():
        reasons[name] = why
    return dataclasses.replace(
        plan, attn_implementation=facts.attention.value, model_class=facts.model_class,
        task_type=facts.task_type, target_modules=facts.target_modules.value, reasons=reasons,
    )


def weights_dtype_reason(quantization: str, compute_dtype: str) -> str:
    if quantization != "none":
        return f"{quantization} storage, dequantised to {compute_dtype} for compute"
    if compute_dtype != "fp32":
        return (
            "the base model is frozen under LoRA, so it needs no fp32 master copy: half the memory"
            " and no per-step cast"
        )
    return "fp32 end to end"


def _choose_compile(request: PlanRequest, device: str, reasons: dict) -> bool:
    if request.torch_compile is not None:
        reasons["torch_compile"] = "requested"
        return request.torch_compile
    if device == "cpu" and request.max_steps and request.max_steps >= COMPILE_MIN_STEPS_CPU:
        reasons["torch_compile"] = (
            f"auto: {request.max_steps} steps is long enough to repay inductor's warm-up"
            f" (~{COMPILE_WARMUP_SECONDS:.0f} s plus a recompile per new sequence length, then"
            f" ~{COMPILE_STEADY_GAIN:.0%} faster steps)"
        )
        return True
    reasons["torch_compile"] = (
        f"off: inductor's warm-up (~{COMPILE_WARMUP_SECONDS:.0f} s, more as sequence lengths vary) is repaid only by runs of"
        f" {COMPILE_MIN_STEPS_CPU}+ steps; ask with torch_compile: true"
    )
    return False


# cpuft's eager CPU paths: why each is off on CUDA, why off under torch.compile, why on.
CPU_EAGER_PATHS = {
    "cpu_lm_head": (
        "TRL's fused head scores only labelled positions on CUDA already",
        "TRL's fixed tile shapes avoid a recompile per label count",
        "lm_head + loss only at labelled positions, in 4 MiB tiles; TRL's CPU path scores every"
        " position in 32768-wide tiles that glibc mmaps anew (Qwen2.5-0.5B shapes, 512 tokens: 1.3 M"
        " page faults and ~5 s system time vs 2 and 0.02 s; same loss and gradients, tests/test_chunked_loss.py)",
    ),
    "fused_lora": (
        "on CUDA PEFT's LoRA passes are cheap next to the GEMMs",
        "inductor fuses LoRA's elementwise passes itself",
        "each LoRA linear's forward and backward as one autograd node: the adapter's product added"
        " by the GEMM, dropout masks 16 bits a draw and 1 byte an element, or hashed in the pass that applies"
        " them with compiled_elementwise (torch's bernoulli_ was 14 % of the 100m step), bf16 adapter copies"
        " cast once per optimizer step; same loss and gradients as PEFT's, tests/test_fused_lora.py."
        " lora_dropout 0.05 (the default) costs 0-15 % of a layer at Qwen2.5-0.5B's shapes with hashed masks;"
        " lora_dropout: 0 skips it",
    ),
    "short_row_attention": (
        "PyTorch's CUDA attention kernels are fast at every length",
        "inductor plans the attention itself",
        "SDPA (attn_implementation sdpa) rows of <= 256 tokens as grouped batched GEMMs, keys and values"
        " never repeated: SDPA's CPU backward is slow on short rows (Qwen2.5-0.5B heads, bf16: 2.3x faster"
        " at 128 tokens, 1.2x at 256); with compiled_elementwise rows of <= 384 tokens in causal chunks of"
        " 128 queries with a compiled softmax (1.7x SDPA at 256 tokens, 2x at 384); longer rows keep SDPA,"
        " whose kernel keeps no scores for backward; same loss and gradients, tests/test_short_attention.py",
    ),
}


def _choose_cpu_eager_path(name: str, device: str, torch_compile: bool, reasons: dict) -> bool:
    """One of CPU_EAGER_PATHS: on for CPU training without torch.compile, with the reason."""
    off_on_cuda, off_compiled, on = CPU_EAGER_PATHS[name]
    if device != "cpu":
        reasons[name] = f"off: {off_on_cuda}"
        return False
    if torch_compile:
        reasons[name] = f"off under torch.compile: {off_compiled}"
        return False
    reasons[name] = f"on: {on}"
    return True


def _choose_compiled_elementwise(request: PlanRequest, device: str, torch_compile: bool, reasons: dict) -> bool:
    """cpuft.fastpaths.compiled_elementwise: on where its one-time compile is repaid (see the constants)."""
    name = "compiled_elementwise"
    if device != "cpu":
        reasons[name] = "off: on CUDA the elementwise passes are cheap next to the GEMMs"
        return False
    if torch_compile:
        reasons[name] = "off under torch.compile: inductor compiles the whole model"
        return False
    if request.compiled_elementwise is not None:
        reasons[name] = "requested"
        return request.compiled_elementwise
    from cpuft.fastpaths.compiled_elementwise import why_not_compiled

    why_not = why_not_compiled()
    if why_not:
        reasons[name] = f"off: {why_not}"
        return False
    params = request.model_params
    if params is not None and params < ELEMENTWISE_COMPILE_MIN_PARAMS:
        reasons[name] = (
            f"off: a {params / 1e6:.0f}M-parameter model's elementwise passes take too little time to repay"
            f" the kernels' one-time compile (~{ELEMENTWISE_COMPILE_WARMUP_SECONDS:.0f} s); on from"
            f" {ELEMENTWISE_COMPILE_MIN_PARAMS / 1e6:.0f}M parameters"
        )
        return False
    reasons[name] = (
        "on: RMSNorm, rotary, SiLU-and-multiply and LoRA dropout as compiled kernels, one pass each"
        " way for every sequence length; " + ELEMENTWISE_COMPILE_MEASURED
    )
    return True


def _choose_device(machine: Machine, requested: str, reasons: dict) -> str:
    if requested == "cuda":
        if not machine.cuda_devices:
            raise PlanError(
                "--device cuda was requested but this machine has no CUDA GPU visible to PyTorch"
                " (torch.cuda.is_available() is False). Use --device auto or --device cpu."
            )
        reasons["device"] = f"requested; {machine.cuda_devices[0].name}"
        return "cuda"
    if requested == "cpu":
        reasons["device"] = "requested"
        return "cpu"
    if requested != "auto":
        raise PlanError(f"unknown device {requested!r}: choose auto, cpu or cuda.")
    if machine.cuda_devices:
        reasons["device"] = f"auto: found CUDA GPU {machine.cuda_devices[0].name}"
        return "cuda"
    reasons["device"] = f"auto: no CUDA GPU; CPU is {machine.cpu_summary}"
    return "cpu"


def _choose_cpu_dtype(machine: Machine, requested: str, reasons: dict, warnings: list) -> str:
    if requested == "auto":
        if machine.has("amx_bf16"):
            reasons["compute_dtype"] = "auto: CPU has AMX-BF16, PyTorch runs bf16 matmuls on AMX tiles"
            return "bf16"
        if machine.has("avx512_bf16"):
            reasons["compute_dtype"] = "auto: CPU has AVX-512-BF16, bf16 runs natively"
            return "bf16"
        reasons["compute_dtype"] = (
            "auto: CPU has no AMX or AVX512-BF16, so bf16 would be emulated (~3x slower); fp32"
        )
        return "fp32"
    if requested == "fp32":
        reasons["compute_dtype"] = "requested"
        return "fp32"
    if requested == "bf16":
        reasons["compute_dtype"] = "requested"
        if not machine.native_bf16:
            warnings.append(
                "bf16 was requested but this CPU has no AMX or AVX512-BF16: PyTorch emulates bf16"
                " here, measured 2.5-3x slower than fp32. Use --dtype auto for fp32."
            )
        return "bf16"
    if requested == "fp16":
        if not machine.has("amx_fp16"):
            raise PlanError(
                "--dtype fp16 on CPU needs AMX-FP16 (Granite Rapids); this CPU lacks it."
                " Use --dtype auto (bf16 on AMX/AVX512-BF16 CPUs, fp32 otherwise)."
            )
        reasons["compute_dtype"] = "requested; CPU has AMX-FP16"
        return "fp16"
    raise PlanError(f"unknown dtype {requested!r}: choose auto, fp32, bf16 or fp16.")


def _choose_cuda_dtype(gpu, requested: str, reasons: dict) -> str:
    if requested == "auto":
        if gpu.bf16_supported:
            reasons["compute_dtype"] = f"auto: {gpu.name} computes bf16 natively"
            return "bf16"
        reasons["compute_dtype"] = f"auto: {gpu.name} lacks bf16 (pre-Ampere); fp16"
        return "fp16"
    if requested == "bf16" and not gpu.bf16_supported:
        raise PlanError(f"--dtype bf16 was requested but {gpu.name} has no bf16; use fp16 or auto.")
    if requested not in ("fp32", "bf16", "fp16"):
        raise PlanError(f"unknown dtype {requested!r}: choose auto, fp32, bf16 or fp16.")
    reasons["compute_dtype"] = "requested"
    return requested


def _choose_cuda_quant(gpu, request: PlanRequest, reasons: dict) -> str:
    if request.quant in ("none", "nf4", "int8"):
        reasons["quantization"] = "requested"
        return request.quant
    if request.quant != "auto":
        raise PlanError(f"unknown quant {request.quant!r}: choose auto, none, nf4 or int8.")
    if request.model_params:
        weights_bytes = 2 * request.model_params
        budget = GPU_WEIGHTS_BUDGET * gpu.total_memory_bytes
        if weights_bytes > budget:
            reasons["quantization"] = (
                f"auto: bf16 weights ({weights_bytes / 2**30:.1f} GiB) exceed"
                f" {GPU_WEIGHTS_BUDGET:.0%} of {gpu.name}'s {gpu.total_memory_bytes / 2**30:.0f} GiB;"
                " NF4 QLoRA stores them in ~0.5 bytes/parameter"
            )
            return "nf4"
        reasons["quantization"] = "auto: bf16 weights fit in GPU memory; plain LoRA is faster than QLoRA"
        return "none"
    reasons["quantization"] = "auto: model size unknown; plain LoRA (ask for --quant nf4 to save memory)"
    return "none"


def _choose_cpu_quant(
    requested: str, reasons: dict, warnings: list, machine: Machine, request: PlanRequest, compute_dtype: str
) -> str:
    if requested == "auto" and request.model_params and machine.ram_bytes:
        # Same budget as on a GPU: the rest of RAM is for activations, adapter state and the runtime.
        weights_bytes = DTYPE_BYTES[compute_dtype] * request.model_params
        budget = GPU_WEIGHTS_BUDGET * machine.ram_bytes
        if weights_bytes > budget:
            reasons["quantization"] = (
                f"auto: {compute_dtype} weights ({weights_bytes / 2**30:.1f} GiB) exceed"
                f" {GPU_WEIGHTS_BUDGET:.0%} of {machine.ram_bytes / 2**30:.0f} GiB RAM; NF4 QLoRA"
                " stores them in ~0.5 bytes/parameter (slower: every matmul dequantises)"
            )
            return "nf4"
    if requested in ("auto", "none"):
        reasons["quantization"] = "none: LoRA on unquantised weights is the fastest CPU path"
        return "none"
    if requested in ("nf4", "int8"):
        reasons["quantization"] = "requested; bitsandbytes' x86 backend quantises on CPU"
        warnings.append(
            f"{requested} on CPU saves memory but dequantises every matmul: expect it to be slower"
            " than LoRA on unquantised weights."
        )
        return requested
    raise PlanError(f"unknown quant {requested!r}: choose auto, none, nf4 or int8.")


def _choose_world(machine: Machine, request: PlanRequest, device: str, reasons: dict) -> None:
    per_node, nodes = request.ranks_per_node, request.nodes
    if per_node < 1 or nodes < 1:
        raise PlanError(f"--nproc-per-node ({per_node}) and --nnodes ({nodes}) must be at least 1.")
    if per_node * nodes == 1:
        reasons["world"] = "one process (`cpuft sft --nproc-per-node N` runs N DDP ranks)"
        return
    backend = "NCCL" if device == "cuda" else "gloo"
    why = (
        f"one rank per NUMA node ({machine.numa_nodes}), each on its node's cores and memory"
        if per_node == machine.numa_nodes > 1 else f"{per_node} rank(s) per node as requested"
    )
    reasons["world"] = (
        f"{why}; DDP over {backend}: every rank holds a full model copy, trains its shard of the"
        " length-grouped order and all-reduces the trainable gradients each optimizer step"
    )


def _choose_threads(machine: Machine, requested: int | None, ranks_per_node: int, reasons: dict, warnings: list) -> int:
    available = max(1, min(machine.physical_cores, machine.usable_cpus))
    if requested is not None:
        if requested < 1:
            raise PlanError(f"threads must be at least 1 (got {requested}).")
        reasons["threads"] = "requested" + (" (per rank)" if ranks_per_node > 1 else "")
        if requested * ranks_per_node > machine.physical_cores:
            ranks = f" x {ranks_per_node} ranks" if ranks_per_node > 1 else ""
            warnings.append(
                f"{requested} threads{ranks} on {machine.physical_cores} physical cores: hyperthreads share"
                " the vector units and usually slow training down."
            )
        return requested
    if ranks_per_node > 1:
        threads = threads_per_rank(available, ranks_per_node)
        reasons["threads"] = (
            f"{available} physical cores shared by the {ranks_per_node} ranks on this node: {threads} each"
            " (all cores per rank would oversubscribe them)"
        )
        if threads * ranks_per_node < available:
            reasons["threads"] += f"; {available - threads * ranks_per_node} core(s) left idle"
        return threads
    reasons["threads"] = (
        f"one per physical core ({machine.physical_cores} physical, {machine.logical_cores} logical,"
        f" {machine.usable_cpus} usable): hyperthreads share the FMA/AMX units"
    )
    if machine.numa_nodes > 1:
        warnings.append(
            f"{machine.numa_nodes} NUMA nodes: one process spanning sockets pays remote-memory"
            " latency; for full speed run one rank per node, each bound to its node's cores:"
            " `cpuft sft --nproc-per-node auto ...`."
        )
    return available


def _peak_flops(machine: Machine, device: str, dtype: str, threads: int, reasons: dict) -> float | None:
    if device == "cuda":
        peak, source = gpu_peak_flops(machine.cuda_devices[0].name, dtype)
        reasons["peak_flops"] = f"datasheet {source}" if peak else source
        return peak
    peak, how = cpu_peak_flops(threads, machine.cpu_max_mhz, machine.cpu_flags, dtype, machine.vendor, machine.cpu_family)
    reasons["peak_flops"] = f"{how}; theoretical, real GEMMs reach less"
    return peak
