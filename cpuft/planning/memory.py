"""The memory plan: bytes a fine-tuning run will need, from the model's config alone, before loading.

`model_shape(config)` reads a transformers config (no weights: the model is built on PyTorch's
meta device, which allocates nothing) into a `ModelShape`. `plan_memory(shape, settings,
capacity_bytes)` is pure arithmetic on it and returns a `MemoryPlan`: bytes for weights,
gradients, optimizer states, activations and the runtime, the total, whether it fits, and when it
does not, the single changes (or combination) that would make it fit.

The arithmetic, per parameter (see docs/memory-plan.md for the published figures it is tested on):
- full fine-tuning: fp32 master weights 4 + fp32 gradients 4 + AdamW's two fp32 moments 8
  = 16 bytes/parameter (mixed precision keeps an fp32 master copy whatever the compute dtype).
- LoRA: frozen base weights in the plan's weights dtype (fp32 4, bf16/fp16 2); only the adapter
  has gradients and optimizer state.
- QLoRA NF4: every linear layer but the output head as 4-bit codes + one 8-bit absmax per 64
  weights + one fp32 scale per 256 absmax (double quantisation) = 4.127 bits = 0.516 bytes;
  LLM.int8: 1 byte + a per-row fp32 scale. PEFT's prepare_model_for_kbit_training casts every
  remaining parameter (embeddings, output head, norms) to fp32.
- activations: what autograd keeps for the backward pass, per token per layer (see
  `_layer_activation_elements`), plus the logits (the loss upcasts them to fp32). Gradient
  checkpointing keeps only each layer's input and recomputes one layer at a time.
- runtime: the process before any tensor (Python, torch, transformers: ~1 GiB RSS on CPU) or the
  CUDA context (~0.5 GiB, outside PyTorch's allocator).
- DDP (more than one rank): each rank is a process holding all of the above (a full model copy),
  plus DDP's gradient buckets: the reducer keeps its own flat copy of every trainable gradient
  (torch DDP's default gradient_as_bucket_view=False), i.e. the gradient bytes once more. Small for
  LoRA: r=16 on every linear layer of Llama-2-7B is 40.0 M parameters, 153 MiB of fp32 gradients
  per rank next to 25.1 GiB of fp32 (12.6 GiB of bf16) weights, ~0.6 % (1.2 %); for full
  fine-tuning as much as the gradients. On a CPU the ranks of a node share its RAM: the node needs
  ranks_per_node x one rank; on CUDA each rank has its own GPU.

Limits: decoder-only and encoder-decoder transformers that transformers can build from a config;
attention is assumed to be SDPA/flash (no seq x seq score matrix) unless `attn_implementation` is
"eager" or the rows are short enough for cpuft's GEMM attention (`gemm_attention_max_tokens`);
allocator fragmentation and the optimizer's transient buffers are not modelled (a few %).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace
from typing import Literal

from cpuft.config.choices import OptimizerName, PeftMethod, Quantization
from cpuft.dtypes import DTYPE_BYTES

GIB = 2**30

Training = Literal["full", "adapter"]

# NF4 with double quantisation: 4-bit code + 8-bit absmax per 64-weight block + fp32 per 256 blocks.
NF4_BYTES_PER_PARAM = (4 + 8 / 64 + 32 / (64 * 256)) / 8
INT8_BYTES_PER_PARAM = 1.0
# Optimizer state bytes per trainable parameter, as a multiple of the parameter's own bytes
# (torch's AdamW keeps two moments in the parameter's dtype) or as fixed bytes (8-bit states).
OPTIMIZER_STATE = {
    "adamw_torch": ("per_param_bytes", 2.0),
    "adamw_torch_fused": ("per_param_bytes", 2.0),
    "paged_adamw_32bit": ("fixed", 8.0),
    # bitsandbytes' 8-bit AdamW: two uint8 moments, each with one fp32 absmax per 256-value block.
    "adamw_8bit": ("fixed", 2.0 + 2 * 4 / 256),
    "paged_adamw_8bit": ("fixed", 2.0 + 2 * 4 / 256),
    "sgd": ("fixed", 0.0),
}
CPU_RUNTIME_BYTES = GIB // 2  # python + torch + transformers + TRL imported: ~0.5 GiB RSS measured
CUDA_CONTEXT_BYTES = GIB // 2  # CUDA context + cuBLAS workspace, outside torch's allocator
# Leave room for the OS, the page cache the loader streams weights through, and the data loader.
CPU_USABLE_FRACTION = 0.9
GPU_USABLE_FRACTION = 0.95


@dataclass(frozen=True)
class LinearLayer:
    name: str  # leaf module name, as PEFT's target_modules matches it (q_proj, wi_0, ...)
    in_features: int
    out_features: int
    count: int  # how many layers of this name and shape the model has


@dataclass(frozen=True)
class ModelShape:
    """Parameter counts by role and the dimensions activations scale with; no weights."""

    model_type: str
    total_params: int
    linear_params: int  # nn.Linear weights of the transformer blocks: what QLoRA quantises
    output_head_params: int  # untied lm_head; 0 when tied to the input embedding
    other_params: int  # embeddings, norms, biases: kept in 16/32-bit
    linears: tuple[LinearLayer, ...]
    num_layers: int  # transformer blocks (encoder + decoder for encoder-decoder models)
    hidden_size: int
    intermediate_size: int
    num_heads: int
    kv_size: int  # num_key_value_heads * head_dim
    vocab_size: int
    encoder_decoder: bool = False

    @property
    def linear_names(self) -> list[str]:
        return sorted({layer.name for layer in self.linears})


@dataclass(frozen=True)
class RunSettings:
    """The run choices memory depends on. Defaults are cpuft's LoRA defaults."""

    training: Training = "adapter"
    peft_method: PeftMethod = "lora"
    quantization: Quantization = "none"
    weights_dtype: str = "fp32"
    compute_dtype: str = "fp32"
    batch_size: int = 4
    seq_len: int = 512
    gradient_checkpointing: bool = False
    optimizer: OptimizerName = "adamw_torch"
    lora_r: int = 16
    lora_dropout: float = 0.05
    target_modules: str = "all-linear"
    num_virtual_tokens: int = 20
    attn_implementation: str = "sdpa"
    # Rows up to this many tokens run cpuft's GEMM attention (cpuft.fastpaths.short_attention),
    # which keeps softmax weights for backward as eager attention does; 0: SDPA for every row.
    gemm_attention_max_tokens: int = 0
    device: Literal["cpu", "cuda"] = "cpu"
    ranks_per_node: int = 1  # DDP ranks sharing this node's RAM (each with its own model copy)
    world_size: int = 1  # all ranks; above 1, DDP's gradient buckets

    @property
    def method_label(self) -> str:
        if self.training == "full":
            return "full fine-tuning"
        quant = {"nf4": "QLoRA NF4 + ", "int8": "LLM.int8 + "}.get(self.quantization, "")
        return f"{quant}{self.peft_method}"


@dataclass(frozen=True)
class MemoryPlan:
    settings: RunSettings
    total_params: int
    trainable_params: int
    weights_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    runtime_bytes: int
    capacity_bytes: int | None  # usable RAM (CPU) or GPU memory; None when unknown
    capacity_label: str = ""
    suggestions: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    ddp_buckets_bytes: int = 0  # per rank; 0 in one process

    @property
    def rank_bytes(self) -> int:
        """One process's need (with DDP: one rank's)."""
        return (
            self.weights_bytes + self.gradients_bytes + self.optimizer_bytes
            + self.activations_bytes + self.runtime_bytes + self.ddp_buckets_bytes
        )

    @property
    def ranks_sharing_capacity(self) -> int:
        """Ranks whose memory comes out of `capacity_bytes`: a CPU node's, or one each per GPU."""
        return 1 if self.settings.device == "cuda" else self.settings.ranks_per_node

    @property
    def total_bytes(self) -> int:
        """What `capacity_bytes` must hold: every rank of the node on a CPU, one rank per GPU."""
        return self.rank_bytes * self.ranks_sharing_capacity

    @property
    def fits(self) -> bool | None:
        return None if self.capacity_bytes is None else self.total_bytes <= self.capacity_bytes

    def categories(self) -> dict[str, int]:
        """Bytes by category for one rank, then the total (in one process the two are the same)."""
        values = {
            "weights": self.weights_bytes,
            "gradients": self.gradients_bytes,
            "optimizer": self.optimizer_bytes,
            "activations": self.activations_bytes,
            "runtime": self.runtime_bytes,
        }
        if self.settings.world_size > 1:
            values["ddp_buckets"] = self.ddp_buckets_bytes
            values["per_rank"] = self.rank_bytes
        values["total"] = self.total_bytes
        return values

    def to_dict(self) -> dict:
        return {
            "settings": dataclasses.asdict(self.settings),
            "method": self.settings.method_label,
            "total_params": self.total_params,
            "trainable_params": self.trainable_params,
            "bytes": self.categories(),
            "capacity_bytes": self.capacity_bytes,
            "capacity": self.capacity_label,
            "fits": self.fits,
            "ranks_per_node": self.settings.ranks_per_node,
            "world_size": self.settings.world_size,
            "suggestions": list(self.suggestions),
            "notes": list(self.notes),
        }

    def format(self) -> str:
        s = self.settings
        lines = [
            f"Memory plan: {s.method_label}, {s.weights_dtype} weights, {s.compute_dtype} compute,"
            f" batch {s.batch_size} x {s.seq_len} tokens, {s.optimizer},"
            f" checkpointing {'on' if s.gradient_checkpointing else 'off'}",
            f"  parameters     {self.total_params / 1e6:,.1f} M total, {self.trainable_params / 1e6:,.2f} M trainable",
        ]
        ranks = self.ranks_sharing_capacity
        for name, value in self.categories().items():
            label = {"ddp_buckets": "ddp buckets", "per_rank": "per rank"}.get(name, name)
            why = ""
            if name == "ddp_buckets":
                why = "  (DDP's copy of the trainable gradients, for the all-reduce)"
            elif name == "total" and s.world_size > 1:
                why = f"  ({ranks} rank{'s' if ranks > 1 else ''} x {format_bytes(self.rank_bytes)}" + (
                    ", one rank per GPU)" if s.device == "cuda" else " on this node: each holds a full model copy)")
            lines.append(f"  {label:<14} {format_bytes(value)}{why}")
        if self.capacity_bytes is not None:
            verdict = "fits" if self.fits else "DOES NOT FIT"
            lines.append(f"  {'available':<14} {format_bytes(self.capacity_bytes)} ({self.capacity_label}): {verdict}")
        for suggestion in self.suggestions:
            lines.append(f"  would fit: {suggestion}")
        return "\n".join(lines)


def format_bytes(value: float) -> str:
    if value >= GIB:
        return f"{value / GIB:,.2f} GiB"
    return f"{value / 2**20:,.1f} MiB"


# ----------------------------------------------------------------------------- model shape


def model_shape(config) -> ModelShape:
    """Count parameters by role from a transformers config; builds the model on the meta device.

    The meta device records shapes without allocating storage: a 65B Llama takes ~1 s and no RAM.
    Raises ValueError when transformers cannot build the architecture from the config.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    auto = AutoModelForSeq2SeqLM if encoder_decoder else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config)
    return _shape_of(model, config, encoder_decoder)


def _shape_of(model, config, encoder_decoder: bool) -> ModelShape:
    import torch

    output_head = model.get_output_embeddings()
    input_embedding = model.get_input_embeddings()
    tied = output_head is not None and output_head.weight is input_embedding.weight
    seen: set[int] = set()
    total = 0
    for param in model.parameters():  # parameters() already skips tied duplicates
        if id(param) not in seen:
            seen.add(id(param))
            total += param.numel()
    groups: dict[tuple[str, int, int], int] = {}
    linear_params = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not output_head:
            key = (name.rsplit(".", 1)[-1], module.in_features, module.out_features)
            groups[key] = groups.get(key, 0) + 1
            linear_params += module.in_features * module.out_features
    output_head_params = 0 if (output_head is None or tied) else output_head.weight.numel()
    if tied and (config.model_type == "mt5" or getattr(config, "scale_decoder_outputs", True) is False):
        # T5 v1.1 / Flan-T5 and every mT5 ship a separate lm_head (tie_word_embeddings: false),
        # but transformers 5 builds them tied: T5Config turns the flag into
        # scale_decoder_outputs=False, MT5Config drops it; the checkpoint's head is loaded over
        # the tie, so count it.
        output_head_params = output_head.weight.numel()
        total += output_head_params
    hidden = _first_attr(config, "hidden_size", "d_model", "n_embd")
    heads = _first_attr(config, "num_attention_heads", "num_heads", "n_head")
    head_dim = getattr(config, "head_dim", None) or getattr(config, "d_kv", None) or hidden // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    layers = _first_attr(config, "num_hidden_layers", "num_layers", "n_layer")
    if encoder_decoder:
        layers += getattr(config, "num_decoder_layers", None) or layers
    intermediate = (
        getattr(config, "intermediate_size", None) or getattr(config, "d_ff", None)
        or getattr(config, "n_inner", None) or 4 * hidden
    )
    return ModelShape(
        model_type=getattr(config, "model_type", "unknown"),
        total_params=total,
        linear_params=linear_params,
        output_head_params=output_head_params,
        other_params=total - linear_params - output_head_params,
        linears=tuple(LinearLayer(n, i, o, c) for (n, i, o), c in sorted(groups.items())),
        num_layers=int(layers),
        hidden_size=int(hidden),
        intermediate_size=int(intermediate),
        num_heads=int(heads),
        kv_size=int(kv_heads * head_dim),
        vocab_size=int(config.vocab_size),
        encoder_decoder=encoder_decoder,
    )


def _first_attr(config, *names):
    for name in names:
        value = getattr(config, name, None)
        if value:
            return value
    raise ValueError(f"model config ({getattr(config, 'model_type', '?')}) has none of {', '.join(names)}")


# ----------------------------------------------------------------------------- the estimate


def targeted_linears(shape: ModelShape, target_modules: str) -> list[LinearLayer]:
    """The linear layers PEFT would wrap: 'all-linear' is every one but the output head."""
    if target_modules == "all-linear":
        return list(shape.linears)
    names = {t.strip() for t in target_modules.split(",") if t.strip()}
    return [layer for layer in shape.linears if layer.name in names]


def trainable_parameter_count(shape: ModelShape, settings: RunSettings) -> int:
    """Trainable parameters of the run: everything for full fine-tuning, the adapter otherwise."""
    if settings.training == "full":
        return shape.total_params
    method, r = settings.peft_method, settings.lora_r
    targets = targeted_linears(shape, settings.target_modules)
    if method in ("prompt_tuning", "p_tuning"):
        # A virtual-token embedding table (p-tuning adds a small MLP encoder of hidden width).
        encoder = 0 if method == "prompt_tuning" else 3 * shape.hidden_size * shape.hidden_size
        return settings.num_virtual_tokens * shape.hidden_size + encoder
    if method == "prefix_tuning":
        return settings.num_virtual_tokens * shape.num_layers * 2 * shape.kv_size
    if method == "ia3":
        return sum(layer.count * layer.out_features for layer in targets)
    per_layer = {
        "lora": lambda i, o: r * (i + o),
        "adalora": lambda i, o: r * (i + o) + r,  # + the singular values
        "loha": lambda i, o: 2 * r * (i + o),  # two Hadamard-multiplied low-rank pairs
        "lokr": lambda i, o: r * (i + o) // 2,  # Kronecker factors: at most half a LoRA's size
    }[method]
    return sum(layer.count * per_layer(layer.in_features, layer.out_features) for layer in targets)


def plan_memory(
    shape: ModelShape,
    settings: RunSettings,
    capacity_bytes: int | None = None,
    capacity_label: str = "",
    suggest: bool = True,
) -> MemoryPlan:
    """Bytes by category for `settings` on `shape`; pure. `capacity_bytes` is what the run may use."""
    trainable = trainable_parameter_count(shape, settings)
    weights_bytes, trainable_bytes = _weight_bytes(shape, settings, trainable)
    gradients = trainable * trainable_bytes
    kind, amount = OPTIMIZER_STATE[settings.optimizer]
    optimizer = trainable * (amount * trainable_bytes if kind == "per_param_bytes" else amount)
    activations = activation_bytes(shape, settings)
    runtime = CUDA_CONTEXT_BYTES if settings.device == "cuda" else CPU_RUNTIME_BYTES
    buckets = gradients if settings.world_size > 1 else 0
    notes = []
    if settings.optimizer.startswith("paged_") and settings.device == "cuda":
        notes.append("paged optimizer states can spill to CPU RAM when GPU memory runs short")
    if settings.quantization != "none" and settings.device == "cpu":
        notes.append("QLoRA on CPU dequantises every matmul: it saves memory, not time")
    plan = MemoryPlan(
        settings=settings,
        total_params=shape.total_params,
        trainable_params=trainable,
        weights_bytes=int(weights_bytes),
        gradients_bytes=int(gradients),
        optimizer_bytes=int(optimizer),
        activations_bytes=int(activations),
        runtime_bytes=int(runtime),
        capacity_bytes=capacity_bytes,
        capacity_label=capacity_label,
        notes=tuple(notes),
        ddp_buckets_bytes=int(buckets),
    )
    if suggest and plan.fits is False:
        plan = replace(plan, suggestions=tuple(options_that_fit(shape, settings, capacity_bytes)))
    return plan


def _weight_bytes(shape: ModelShape, settings: RunSettings, trainable: int) -> tuple[float, int]:
    """(bytes of all weights incl. the adapter, bytes per trainable parameter)."""
    if settings.training == "full":
        return shape.total_params * 4.0, 4
    base_dtype_bytes = DTYPE_BYTES[settings.weights_dtype]
    if settings.quantization == "none":
        base = shape.total_params * base_dtype_bytes
        adapter_bytes = 4  # PEFT keeps adapters in fp32 (autocast_adapter_dtype=True)
    else:
        per_param = NF4_BYTES_PER_PARAM if settings.quantization == "nf4" else INT8_BYTES_PER_PARAM
        # prepare_model_for_kbit_training casts every non-quantised parameter to fp32.
        base = shape.linear_params * per_param + (shape.output_head_params + shape.other_params) * 4.0
        # TRL casts a quantised model's adapter to bf16 (QLoRA paper); cpuft casts it back to
        # fp32 where compute is fp32 (AVX2 CPUs emulate bf16).
        adapter_bytes = 4 if settings.compute_dtype == "fp32" else 2
    return base + trainable * adapter_bytes, adapter_bytes


def _layer_activation_elements(shape: ModelShape, settings: RunSettings) -> tuple[float, float]:
    """(elements in the activation dtype, 1-byte mask elements) kept per token per layer.

    Counted for a pre-norm block with SDPA attention and a gated MLP (Llama family); other
    families differ by a few hidden-widths. Kept for backward:
      norms: input + normalised output, twice (4h); q, k, v after RoPE (h + 2 kv); attention
      output and the o_proj input (2h); MLP: each up-projection's output and its activation or
      product (gated, Llama/T5 v1.1: gate, up, act(gate), product = 4i; plain GELU MLP: 2i).
    LoRA with dropout keeps one dropped copy of the input per targeted layer (+ its mask).
    """
    h, i, kv = shape.hidden_size, shape.intermediate_size, shape.kv_size
    elements = 4 * h + (h + 2 * kv) + 2 * h + 2 * _up_projections_per_layer(shape) * i
    masks = 0.0
    if settings.attn_implementation == "eager" or settings.seq_len <= settings.gemm_attention_max_tokens:
        elements += 2 * shape.num_heads * settings.seq_len  # scores and softmax, per query token
    if settings.training == "adapter" and settings.peft_method in ("lora", "adalora", "loha", "lokr") and settings.lora_dropout > 0:
        per_layer_targets = targeted_linears(shape, settings.target_modules)
        copies = sum(layer.in_features * layer.count for layer in per_layer_targets) / max(1, shape.num_layers)
        elements += copies
        masks += copies
    return elements, masks


def _up_projections_per_layer(shape: ModelShape) -> int:
    """2 for a gated MLP (gate + up), 1 for a plain one: linears that widen to the MLP size."""
    widening = sum(
        layer.count for layer in shape.linears
        if layer.out_features == shape.intermediate_size and layer.in_features == shape.hidden_size
    )
    return max(1, round(widening / max(1, shape.num_layers)))


def activation_bytes(shape: ModelShape, settings: RunSettings) -> float:
    act = DTYPE_BYTES[settings.compute_dtype]
    tokens = settings.batch_size * settings.seq_len
    per_layer_elements, per_layer_masks = _layer_activation_elements(shape, settings)
    one_layer = tokens * (per_layer_elements * act + per_layer_masks)
    if settings.gradient_checkpointing:
        # Each block's input is kept; one block's activations exist at a time during recompute.
        blocks = shape.num_layers * tokens * shape.hidden_size * act + one_layer
    else:
        blocks = shape.num_layers * one_layer
    # Logits in the compute dtype, their fp32 upcast for the loss (free when already fp32), the
    # log-softmax the loss keeps, and the gradient flowing back into them.
    logits = tokens * shape.vocab_size * (act + (4 if act < 4 else 0) + 4 + 4)
    return blocks + logits


# ----------------------------------------------------------------------------- what would fit


def options_that_fit(shape: ModelShape, settings: RunSettings, capacity_bytes: int) -> list[str]:
    """Single changes that make the run fit, cheapest in speed first; else the combination."""
    candidates: list[tuple[str, RunSettings]] = []
    if settings.ranks_per_node > 1 and settings.device == "cpu":
        nodes = settings.world_size // settings.ranks_per_node
        candidates.append(("--nproc-per-node 1 (one model copy on this node)",
                           replace(settings, ranks_per_node=1, world_size=nodes)))
    if not settings.gradient_checkpointing:
        candidates.append(("--gradient-checkpointing (about 1.3-1.5x slower)", replace(settings, gradient_checkpointing=True)))
    if settings.training == "full":
        candidates.append(("LoRA instead of full fine-tuning", replace(settings, training="adapter")))
    if settings.quantization == "none":
        candidates.append(("--quant nf4 (QLoRA: ~0.5 bytes per weight)", replace(settings, training="adapter", quantization="nf4")))
    if settings.optimizer in ("adamw_torch", "adamw_torch_fused", "paged_adamw_32bit"):
        candidates.append(("--optimizer adamw_8bit", replace(settings, optimizer="adamw_8bit")))
    batch = settings.batch_size // 2
    while batch >= 1:
        candidates.append((f"--per-device-batch-size {batch} (raise --gradient-accumulation-steps to keep the batch)", replace(settings, batch_size=batch)))
        batch //= 2
    seq = settings.seq_len // 2
    while seq >= 128:
        candidates.append((f"--max-length {seq}", replace(settings, seq_len=seq)))
        seq //= 2
    fitting = []
    for label, candidate in candidates:
        total = plan_memory(shape, candidate, capacity_bytes, suggest=False).total_bytes
        if total <= capacity_bytes:
            fitting.append(f"{label}: {format_bytes(total)}")
    if fitting:
        return fitting
    smallest = replace(
        settings, training="adapter", quantization="nf4", gradient_checkpointing=True,
        optimizer="paged_adamw_8bit" if settings.device == "cuda" else "adamw_8bit", batch_size=1,
        seq_len=min(settings.seq_len, 512),
    )
    total = plan_memory(shape, smallest, capacity_bytes, suggest=False).total_bytes
    if total <= capacity_bytes:
        return [
            "all together: --quant nf4 --gradient-checkpointing --per-device-batch-size 1"
            f" --max-length {smallest.seq_len} --optimizer {smallest.optimizer}: {format_bytes(total)}"
        ]
    return [f"nothing: even QLoRA at batch 1 needs {format_bytes(total)}; use a machine with more memory"]


def usable_capacity(machine, device: str) -> tuple[int | None, str]:
    """(bytes a run may use, label) on a probed Machine: most of its RAM (capped by the cgroup
    memory limit, as the probe reports it), or of its first GPU."""
    if device == "cuda" and machine.cuda_devices:
        gpu = machine.cuda_devices[0]
        return int(gpu.total_memory_bytes * GPU_USABLE_FRACTION), f"{GPU_USABLE_FRACTION:.0%} of {gpu.name}"
    if machine.ram_bytes:
        limited = machine.cgroup_memory_limit_bytes is not None and machine.cgroup_memory_limit_bytes <= machine.ram_bytes
        what = "the cgroup memory limit" if limited else "RAM"
        return int(machine.ram_bytes * CPU_USABLE_FRACTION), f"{CPU_USABLE_FRACTION:.0%} of {machine.ram_bytes / GIB:.0f} GiB {what}"
    return None, "unknown"


def settings_for_plan(plan, **overrides) -> RunSettings:
    """RunSettings from a cpuft Plan (device, dtypes, quantisation, batch, checkpointing, world,
    attention)."""
    from cpuft.fastpaths.short_attention import CHUNKED_MAX_TOKENS, SHORT_ROW_MAX_TOKENS

    gemm_attention = 0
    if plan.short_row_attention:
        gemm_attention = CHUNKED_MAX_TOKENS if plan.compiled_elementwise else SHORT_ROW_MAX_TOKENS
    values = dict(
        gemm_attention_max_tokens=gemm_attention,
        ranks_per_node=plan.ranks_per_node,
        world_size=plan.world_size,
        quantization=plan.quantization,
        weights_dtype=plan.weights_dtype,
        compute_dtype=plan.compute_dtype,
        batch_size=plan.per_device_batch_size,
        gradient_checkpointing=plan.gradient_checkpointing,
        attn_implementation=plan.attn_implementation,
        device=plan.device,
        optimizer=default_optimizer(plan.device, plan.quantization),
    )
    values.update({k: v for k, v in overrides.items() if v is not None})
    return RunSettings(**values)


def settings_for_job(plan, job) -> RunSettings:
    """RunSettings for a `cpuft sft` job: the Plan plus the job-config fields memory depends on."""
    return settings_for_plan(
        plan,
        peft_method=job.peft_method,
        seq_len=job.max_length,
        lora_r=job.lora_r,
        lora_dropout=job.lora_dropout,
        target_modules=job.lora_target_modules,
        num_virtual_tokens=job.num_virtual_tokens,
        optimizer=None if job.optimizer == "auto" else job.optimizer,
    )


def default_optimizer(device: str, quantization: str) -> OptimizerName:
    """QLoRA on CUDA uses paged 8-bit AdamW (the QLoRA recipe); the CPU without quantisation torch's
    fused AdamW (one kernel over all LoRA tensors: 1.0 s against 5.9 s per step for 336 tensors on
    an AVX2 EPYC, the same parameters to 7.5e-9, docs/speed.md); everything else torch's AdamW."""
    if device == "cuda" and quantization == "nf4":
        return "paged_adamw_8bit"
    return "adamw_torch_fused" if device == "cpu" and quantization == "none" else "adamw_torch"
