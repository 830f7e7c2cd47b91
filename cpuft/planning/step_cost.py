"""What one training micro-batch costs on this machine, measured at the model's own shapes.

The time plan (cpuft.planning.cloud.time_for_run) multiplies these parts out; a FLOP count at a
fixed utilisation was 3-10x optimistic, because most of a CPU step is not in the big GEMMs
(docs/speed.md, "Where the step's time goes"). Measured here, in this process, a few seconds:

- one decoder layer's forward and backward: the model's own config class with 2 layers and
  random weights, LoRA on the planned target modules (cpuft.fastpaths.fused_lora when the plan fuses
  it), in the planned weights/compute dtype, at the planned micro-batch rows x sequence length
  (fewer rows when that would take long: cost is linear in rows at a fixed length). The layer's share is the 2-layer time minus the 1-layer
  time, so the frozen-weight GEMMs, LoRA's matmuls, attention and the elementwise work are
  measured together, as the step runs them;
- lm_head + loss: TRL's chunked log-prob kernel (what SFTTrainer's loss runs) on one vocabulary
  slice of 32768 columns and HEAD_TOKENS tokens, in the tiles the run will use (TRL's own, or
  cpuft's compact CPU head: cpuft.fastpaths.chunked_loss), scaled to the full vocabulary, per token;
- the rest of a micro-batch (embedding, final norm, the autograd and Trainer bookkeeping): the
  1-layer time minus one layer and its small head;
- one AdamW step over LoRA tensors of the run's shapes and count.

`step_costs_by_dtype` measures one micro-batch in fp32 and bf16 alike, interleaved, for the
plan's dtype choice (cpuft.planning.dtype_choice).

`step_costs` caches each measurement in ~/.cache/cpuft/step-costs/ (CPUFT_CACHE_DIR overrides
the root) keyed by the config, the shape, the dtypes, the adapter, the threads, the CPU and the
torch version, so `cpuft plan` stays quick the second time.

Limits: LoRA-family adapters on decoder-only models on CPU, unquantised; other runs keep the
FLOP-count estimate. The measurement runs while other work may share the CPU: a busy machine
plans slow, which is what it will then train at.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

# Tokens one measurement pass may use: enough for the GEMMs to run at the micro-batch's speed,
# few enough that the whole measurement stays a few seconds.
MEASURE_TOKENS = 512
# The layer model's vocabulary: the head is measured on its own, so this one only has to exist.
LAYER_MODEL_VOCAB = 256
# The head is timed on one vocabulary chunk of this width (TRL's own chunk width) and HEAD_TOKENS
# tokens, then scaled: its cost is linear in the vocabulary and in tokens.
HEAD_VOCAB_CHUNK = 32768
HEAD_TOKENS = 256
# Raised when what is measured changes (2: the compact head's own backward; 3: dropout masks hashed in
# int32 lanes), so older entries are re-measured.
CACHE_VERSION = 3
# Rounds of an interleaved comparison (step_costs_by_dtype): each dtype keeps its fastest round.
# Three: tiny models' steps are ms-long, and on a shared machine an OpenMP barrier waiting on a
# descheduled thread stretched whole 2-round measurements 10-40x (cpuft.planning.dtype_choice).
COMPARE_ROUNDS = 3


@dataclass(frozen=True)
class StepCosts:
    """Seconds per micro-batch of `rows` x `seq_len` (and per optimizer step), measured here."""

    rows: int
    seq_len: int
    num_layers: int
    layer_forward_seconds: float  # one decoder layer, forward
    layer_backward_seconds: float  # one decoder layer, backward
    head_seconds_per_token: float  # lm_head + loss over the whole vocabulary, forward and backward
    other_seconds: float  # embedding, final norm, bookkeeping
    optimizer_seconds: float  # one AdamW step over every trainable tensor
    measured_rows: int
    measure_seconds: float
    source: str

    cpu_lm_head: bool = False  # the head was timed as cpuft's compact CPU head
    fused_lora: bool = False  # the layers were timed with cpuft.fastpaths.fused_lora

    def to_dict(self) -> dict:
        return asdict(self)


def cache_dir() -> Path:
    return Path(os.environ.get("CPUFT_CACHE_DIR") or Path.home() / ".cache" / "cpuft") / "step-costs"


def step_costs(model_config, settings, plan, rows: int, seq_len: int) -> StepCosts:
    """The cached measurement of a micro-batch of `rows` x `seq_len` for the run `settings`
    (cpuft.planning.memory.RunSettings: dtypes, adapter, attention, optimizer) under `plan`
    (threads, adapter dtype, the fast paths it turns on), or a fresh one (a few seconds)."""
    key, path = _cache_entry(model_config, settings, plan, rows, seq_len)
    costs = _read_cached(path)
    if costs is None:
        costs = measure_step_costs(model_config, settings, plan, rows, seq_len)
        _write_cached(path, key, costs)
    return costs


def step_costs_by_dtype(model_config, settings, plan, rows: int, seq_len: int,
                        dtypes: tuple[str, ...] = ("fp32", "bf16"), cache_if=None) -> dict[str, StepCosts]:
    """{dtype: StepCosts} of one micro-batch run in each of `dtypes` (weights and compute), all
    else as `settings` and `plan`; cached as `step_costs` caches them, unless `cache_if(measured)`
    says not to (a result the caller deems too noisy is measured afresh next time). Measured
    interleaved (A B A B ...), each dtype's fastest of COMPARE_ROUNDS kept: a machine busy for a
    moment slows one round, not one dtype, so the comparison stays fair on a shared CPU."""
    runs = {dtype: (replace(settings, weights_dtype=dtype, compute_dtype=dtype),
                    replace(plan, weights_dtype=dtype, compute_dtype=dtype)) for dtype in dtypes}
    entries = {dtype: _cache_entry(model_config, *runs[dtype], rows, seq_len) for dtype in dtypes}
    cached = {dtype: _read_cached(path) for dtype, (_, path) in entries.items()}
    if all(cached.values()):
        return cached
    rounds = {dtype: [] for dtype in dtypes}
    for _ in range(COMPARE_ROUNDS):
        for dtype, (settings_in, plan_in) in runs.items():
            rounds[dtype].append(measure_step_costs(model_config, settings_in, plan_in, rows, seq_len))
    # Each dtype's round least slowed by other work, whole: the parts are differences of one round's timings.
    best = {dtype: replace(min(measured, key=_forward_backward_seconds),
                           measure_seconds=sum(c.measure_seconds for c in measured))
            for dtype, measured in rounds.items()}
    if cache_if is None or cache_if(best):
        for dtype, (key, path) in entries.items():
            _write_cached(path, key, best[dtype])
    return best


def _forward_backward_seconds(costs: StepCosts) -> float:
    """A micro-batch's measured forward and backward, every part summed (no optimizer step)."""
    layers = costs.num_layers * (costs.layer_forward_seconds + costs.layer_backward_seconds)
    return layers + costs.head_seconds_per_token * costs.rows * costs.seq_len + costs.other_seconds


def _cache_entry(model_config, settings, plan, rows: int, seq_len: int) -> tuple[dict, Path]:
    """(the key a measurement is cached under, its file): everything the timing depends on."""
    import torch

    key = {
        "version": CACHE_VERSION, "config": model_config.to_dict(), "rows": rows, "seq_len": seq_len,
        "weights_dtype": settings.weights_dtype, "compute_dtype": settings.compute_dtype, "lora_r": settings.lora_r,
        "lora_dropout": settings.lora_dropout, "target_modules": _target_modules(settings),
        "attn": settings.attn_implementation, "threads": plan.threads, "optimizer": settings.optimizer,
        "cpu_lm_head": plan.cpu_lm_head, "fused_lora": plan.fused_lora, "adapter_dtype": plan.adapter_dtype,
        "compiled_elementwise": plan.compiled_elementwise, "short_row_attention": plan.short_row_attention,
        "torch": torch.__version__,
        "cpu": torch.cpu.get_capabilities().get("cpu_name", "") if hasattr(torch.cpu, "get_capabilities") else "",
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
    return key, cache_dir() / f"{digest}.json"


def _read_cached(path: Path) -> StepCosts | None:
    if path.is_file():
        try:
            return StepCosts(**json.loads(path.read_text())["costs"])
        except (ValueError, TypeError, KeyError):
            pass  # an unreadable or older entry: measure again and overwrite it
    return None


def _write_cached(path: Path, key: dict, costs: StepCosts) -> None:
    from cpuft.artifacts import atomic_write_json

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"key": key, "costs": costs.to_dict()})
    except OSError:
        pass  # a read-only home: the plan still has its numbers, it just measures next time too


def measure_step_costs(model_config, settings, plan, rows: int, seq_len: int) -> StepCosts:
    """Time the parts of one micro-batch (see the module docstring and `step_costs`); restores
    the thread count."""
    import torch

    weights_dtype, compute_dtype, threads = settings.weights_dtype, settings.compute_dtype, plan.threads
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    started = time.perf_counter()
    try:
        measured_rows = max(1, min(rows, MEASURE_TOKENS // max(1, seq_len)))
        model, lora_params = _two_layer_model(model_config, settings, plan)
        forward1, backward1, forward2, backward2 = _time_layers(model, measured_rows, seq_len, compute_dtype)
        num_layers = int(model_config.num_hidden_layers)
        scale = rows / measured_rows
        layer_forward = max(0.0, forward2 - forward1) * scale
        layer_backward = max(0.0, backward2 - backward1) * scale
        small_head = _head_seconds(model_config.hidden_size, min(LAYER_MODEL_VOCAB, model_config.vocab_size),
                                   measured_rows * seq_len, weights_dtype, compute_dtype, HEAD_VOCAB_CHUNK)
        other = max(0.0, forward1 + backward1 - (forward2 - forward1) - (backward2 - backward1) - small_head) * scale
        head = _head_seconds_per_token(model_config, weights_dtype, compute_dtype, plan.cpu_lm_head)
        optimizer_seconds = _optimizer_seconds(lora_params, num_layers, settings.optimizer)
    finally:
        torch.set_num_threads(previous_threads)
    return StepCosts(
        rows=rows, seq_len=seq_len, num_layers=num_layers, layer_forward_seconds=layer_forward,
        layer_backward_seconds=layer_backward, head_seconds_per_token=head, other_seconds=other,
        optimizer_seconds=optimizer_seconds, measured_rows=measured_rows,
        measure_seconds=time.perf_counter() - started,
        source=f"measured on this machine: {model_config.model_type} layer at {measured_rows} x {seq_len},"
               f" {compute_dtype}, {threads} threads",
        cpu_lm_head=plan.cpu_lm_head,
        fused_lora=plan.fused_lora,
    )


def _target_modules(settings):
    """PEFT's target_modules from the settings' string: 'all-linear' as is, a comma list as a list."""
    target = settings.target_modules
    return target.split(",") if "," in target else target


def _two_layer_model(model_config, settings, plan):
    """The config's own model class with 2 layers, a tiny vocabulary and random weights, LoRA'd
    as the run will be; (model, the trainable LoRA tensors of one layer)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from cpuft.dtypes import torch_dtype

    config = copy.deepcopy(model_config)
    config.num_hidden_layers = 2
    if getattr(config, "layer_types", None):
        config.layer_types = list(config.layer_types[:2])
    config.vocab_size = min(LAYER_MODEL_VOCAB, config.vocab_size)
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if isinstance(getattr(config, name, None), int) and getattr(config, name) >= config.vocab_size:
            setattr(config, name, None)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(settings.weights_dtype),
                                             attn_implementation=settings.attn_implementation)
    model = get_peft_model(model, LoraConfig(r=settings.lora_r, lora_alpha=2 * settings.lora_r,
                                             lora_dropout=settings.lora_dropout,
                                             target_modules=_target_modules(settings), task_type="CAUSAL_LM"))
    if plan.adapter_dtype is not None:  # the run's rule (cpuft.planning.plan.Plan.adapter_dtype)
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.to(torch_dtype(plan.adapter_dtype))
    from cpuft.fastpaths import apply_fast_paths

    apply_fast_paths(model, plan)
    model.train()
    first_block = f".{_layers_path(model.get_base_model())}.0."
    first_layer = [p for n, p in model.named_parameters() if p.requires_grad and first_block in n]
    return model, first_layer


def _layers_path(base) -> str:
    """Where `base` keeps its decoder blocks (cpuft.planning.architecture.decoder_layers_path)."""
    from cpuft.planning.architecture import decoder_layers_path

    path = decoder_layers_path(base)
    if path is None:
        raise ValueError(f"{type(base).__name__}: no ModuleList of its {base.config.num_hidden_layers} decoder layers")
    return path


def _autocast(compute_dtype: str):
    import contextlib

    import torch

    from cpuft.dtypes import torch_dtype

    if compute_dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=torch_dtype(compute_dtype))


def _time_layers(model, rows: int, seq_len: int, compute_dtype: str) -> tuple[float, float, float, float]:
    """(forward, backward) seconds with 1 layer and with 2 layers: best of two each, interleaved."""
    import torch

    base = model.get_base_model()
    owner_path, _, attribute = _layers_path(base).rpartition(".")
    owner = base.get_submodule(owner_path) if owner_path else base
    layers = getattr(owner, attribute)
    ids = torch.randint(0, base.config.vocab_size, (rows, seq_len), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)

    def once(n_layers: int) -> tuple[float, float]:
        setattr(owner, attribute, layers[:n_layers])
        base.config.num_hidden_layers = n_layers
        start = time.perf_counter()
        with _autocast(compute_dtype):
            loss = model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False).loss
        middle = time.perf_counter()
        loss.backward()
        end = time.perf_counter()
        model.zero_grad(set_to_none=True)
        return middle - start, end - middle

    once(2)  # warm-up: oneDNN primitive creation, allocator growth
    samples = {1: [], 2: []}
    for n_layers in (1, 2, 1, 2):
        samples[n_layers].append(once(n_layers))
    setattr(owner, attribute, layers)
    base.config.num_hidden_layers = 2
    f1 = min(s[0] for s in samples[1])
    b1 = min(s[1] for s in samples[1])
    f2 = min(s[0] for s in samples[2])
    b2 = min(s[1] for s in samples[2])
    return f1, b1, f2, b2


def _head_seconds(hidden: int, vocab: int, tokens: int, weights_dtype: str, compute_dtype: str, cpu_lm_head: bool) -> float:
    """lm_head + cross-entropy forward and backward through TRL's chunked log-prob kernel, as
    SFTTrainer's loss runs it (entropy and top-1 for its logs included), or through cpuft's compact
    head (cpuft.fastpaths.chunked_loss) where the run uses it; best of two."""
    import torch
    from trl.kernels import ChunkedLogProbFunction

    from cpuft.fastpaths.chunked_loss import head_log_probs

    from cpuft.dtypes import torch_dtype

    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(vocab, hidden, generator=generator) * 0.02).to(torch_dtype(weights_dtype))
    hidden_states = torch.randn(tokens, hidden, generator=generator).requires_grad_(True)
    targets = torch.randint(0, vocab, (tokens,), generator=generator)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        with _autocast(compute_dtype):
            if cpu_lm_head:
                log_probs, _, _ = head_log_probs(hidden_states, weight, None, targets)
            else:
                log_probs, _, _, _, _ = ChunkedLogProbFunction.apply(
                    hidden_states, weight, None, targets, 1.0, HEAD_VOCAB_CHUNK, None, 1.0,
                    ("log_probs", "entropy", "is_top1"))
        (-log_probs.sum()).backward()
        hidden_states.grad = None
        best = min(best, time.perf_counter() - start)
    return best


def _head_seconds_per_token(model_config, weights_dtype: str, compute_dtype: str, cpu_lm_head: bool) -> float:
    """The head over the full vocabulary per token, from a 32768-column slice at HEAD_TOKENS tokens
    (linear in both), in the tiles the run's head uses."""
    vocab = int(model_config.vocab_size)
    width = min(vocab, HEAD_VOCAB_CHUNK)
    seconds = _head_seconds(model_config.hidden_size, width, HEAD_TOKENS, weights_dtype, compute_dtype, cpu_lm_head)
    return seconds * (vocab / width) / HEAD_TOKENS


def _optimizer_seconds(layer_params, num_layers: int, optimizer: str) -> float:
    """Gradient clipping and one AdamW step over `num_layers` copies of one layer's LoRA tensors; best of three."""
    import torch

    params = [torch.nn.Parameter(p.detach().clone().float()) for _ in range(num_layers) for p in layer_params]
    for p in params:
        p.grad = torch.randn_like(p)
    fused = optimizer == "adamw_torch_fused"
    adam = torch.optim.AdamW(params, lr=1e-4, fused=fused or None)
    adam.step()  # creates the state
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)  # the Trainer clips before every step (max_grad_norm)
        adam.step()
        best = min(best, time.perf_counter() - start)
    return best
