"""The decoder layer's elementwise work as compiled kernels: RMSNorm, rotary embedding, SiLU-and-
multiply, and the LoRA dropout masks, each one fused pass forward and one backward.

In eager PyTorch every elementwise op is its own pass over the activations: Llama's RMSNorm is
eight (a cast to fp32, pow, mean, add, rsqrt, mul, a cast back, mul by the weight) and autograd
keeps the fp32 copies; rotary embedding is five per tensor (mul, two slices, neg, cat, mul,
add); `silu(gate) * up` two, and their backward as many again. On a CPU each pass is memory
bound, so once the GEMMs run in bf16 these passes are a large share of the step
(docs/speed.md, "Where the step's time goes"). Here each is one `torch.compile(dynamic=True)`
function: inductor emits one vectorised C++ loop for its forward and one for its backward, with
symbolic shapes, so one compile serves every sequence length and batch (no recompile per
length, unlike compiling the whole model); the GEMMs, attention and the fused LoRA node stay
eager (cpuft.fastpaths.fused_lora).

`compile_elementwise(model)` swaps them in where a module computes exactly the function
compiled here, checked numerically on random inputs at swap time (a norm with a different
formula, e.g. Gemma's 1 + weight, keeps its own forward):
- RMSNorm modules (`weight * (x.float() * rsqrt(mean(x^2) + eps)).to(x.dtype)`),
- gated MLPs (`down(silu(gate(x)) * up(x))`),
- the rotary embedding of each attention module (its modeling module's `apply_rotary_pos_emb`,
  swapped in only while that attention's forward runs);
- TRL's lm_head + loss tiles (`compile_head_tiles`): its log-softmax, entropy and top-1 folded
  over each logits tile in one compiled pass instead of ~12 eager ones, forward and backward;
- attention's scale, mask and softmax (`masked_softmax`), called by the chunked GEMM attention
  (cpuft.fastpaths.short_attention).

The fused LoRA node (cpuft.fastpaths.fused_lora) calls the dropout kernels itself: its masks are a
hash of each element's index under two seeds (`hashed_keep`), computed inside the pass that applies
them (3.4 ms for 2,048 x 4,864 elements against 17.0 ms for drawing 16-bit lanes from torch's
generator and applying them) and recomputed in backward, so no mask and no dropped copy is kept.

Costs: inductor's first compile of these functions took ~25 s on a 2-core EPYC (cached on disk
by inductor afterwards: a few seconds); the plan turns this on only for runs that repay it
(cpuft.planning.plan, field `compiled_elementwise`). Needs a C++ compiler (`why_not_compiled`).

The same function: tests/test_compiled_elementwise.py (each kernel against the eager formula,
forward and backward; TRL's head with compiled tiles against its eager tiles; a whole model's loss
and LoRA gradients against stock PEFT's).
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
import types

import torch

# The inductor-compiled kernels keep intermediates in fp32 where eager rounds to bf16 between
# ops, so a swapped-in function may differ from the module's eager one by bf16 rounding.
CHECK_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def why_not_compiled() -> str | None:
    """Why the compiled kernels cannot be built here (inductor's CPU backend compiles C++); None if they can."""
    compiler = os.environ.get("CXX") or "g++"
    if shutil.which(compiler) is None and shutil.which("c++") is None:
        return f"no C++ compiler on PATH ({compiler}); inductor's CPU kernels need one"
    return None


def _compiled(function, training_only: bool = False):
    """`function` compiled with symbolic shapes on first call (importing inductor costs seconds).
    `training_only`: without gradients (evaluation, generation) run it eagerly, sparing inductor a
    second compile for inference graphs that a training run rarely uses."""
    compiled = None

    @functools.wraps(function)
    def call(*args, **kwargs):
        nonlocal compiled
        if training_only and not torch.is_grad_enabled():
            return function(*args, **kwargs)
        if compiled is None:
            compiled = torch.compile(function, dynamic=True)
        return compiled(*args, **kwargs)

    call.eager = function
    call.compiled_yet = lambda: compiled is not None
    return call


def _rms_norm(x, weight, eps: float):
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _swiglu(gate, up):
    return torch.nn.functional.silu(gate) * up


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rotary(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


# Dropout's counter-based masks (`hashed_keep`): a 32-bit hash of each element's index under two
# 32-bit seeds. Computed in int32 lanes, two's complement standing in for uint32: products wrap
# modulo 2**32 as uint32's do, right shifts are masked to be logical, and the final unsigned
# comparison flips the sign bit of both sides. int64 lanes give the same bits at 2.4x the time
# (2,048 x 4,864 elements: 8.2 against 3.3 ms forward, 10.0 against 4.3 ms backward, AVX-512 EPYC).
HASH_BITS = 32
_SIGN_BIT = -(1 << (HASH_BITS - 1))
# Flat indices past this wrap modulo 2**32 (an int64 arange cast down); below it an int32 arange.
_INT32_INDICES = 1 << (HASH_BITS - 1)


def _mix32(x):
    """lowbias32 (C. Wellons' hash-prospector) on int32 lanes holding uint32 values: a bijection of
    32-bit values that mixes every input bit into every output bit."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * 0x21F0AAAD
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * 0x735A2D97
    return x ^ ((x >> 15) & 0x1FFFF)


def hashed_keep(like, seeds, threshold: int):
    """Dropout's keep mask for a tensor shaped `like`: True where the hash of the element's flat
    index (modulo 2**32) under `seeds` (an integer tensor of two 32-bit values; int64 values
    >= 2**31 wrap to the same bits) is >= `threshold` as an unsigned value (P(keep) = 1 -
    threshold / 2**32). A pure function of (index, seeds): backward recomputes the mask that
    forward drew instead of keeping it, and in a compiled kernel no random tensor is ever stored.
    Two rounds keyed by separate seeds, so masks under different seeds are not shifted copies."""
    if like.numel() < _INT32_INDICES:
        index = torch.arange(like.numel(), dtype=torch.int32, device=like.device)
    else:
        index = torch.arange(like.numel(), dtype=torch.int64, device=like.device).to(torch.int32)
    seeds = seeds.to(torch.int32)
    hashed = _mix32(_mix32(index.view(like.shape) ^ seeds[0]) ^ seeds[1])
    return (hashed ^ _SIGN_BIT) >= min(threshold, (1 << HASH_BITS) - 1) + _SIGN_BIT


def _drop_hashed(x, seeds, threshold: int, scale: float):
    """x where hashed_keep, scaled by `scale`, else 0: dropout's forward, one pass, nothing stored."""
    return torch.where(hashed_keep(x, seeds, threshold), x * scale, 0).to(x.dtype)


def _dropout_backward_hashed(total, addend, x, seeds, threshold: int, scale: float):
    """Dropout's backward in one pass over the recomputed mask: (total + addend * scale where kept,
    the input gradient; x dropped and scaled as forward dropped it, for A's gradient)."""
    keep = hashed_keep(x, seeds, threshold)
    return (total + torch.where(keep, addend * scale, 0).to(total.dtype),
            torch.where(keep, x * scale, 0).to(x.dtype))


def _masked_softmax(scores, keep_mask, scaling: float):
    """softmax(scores * scaling) over the last dim where `keep_mask`, in fp32, returned in the
    scores' dtype (cpuft.fastpaths.short_attention's chunked attention). The fp32 lowest value
    rather than -inf: a fully masked row gets finite weights, which that caller zeroes."""
    weights = scores.float().mul(scaling).masked_fill(~keep_mask, torch.finfo(torch.float32).min)
    return torch.softmax(weights, dim=-1).to(scores.dtype)


# The layer's kernels run where autograd records; the dropout kernels run inside the fused LoRA
# node's forward and backward, where it does not (gradients off by design), so they always compile.
rms_norm = _compiled(_rms_norm, training_only=True)
swiglu = _compiled(_swiglu, training_only=True)
rotary = _compiled(_rotary, training_only=True)
masked_softmax = _compiled(_masked_softmax, training_only=True)
drop_hashed = _compiled(_drop_hashed)
dropout_backward_hashed = _compiled(_dropout_backward_hashed)


def compiled_in_this_process() -> bool:
    """Whether the layer kernels were compiled already (e.g. by the time plan's measurement):
    then a run in this process pays no compile warm-up."""
    return all(kernel.compiled_yet() for kernel in (rms_norm, swiglu, rotary))


def _close(a, b) -> bool:
    tolerance = CHECK_TOLERANCE.get(a.dtype, 1e-5)
    return a.shape == b.shape and bool(torch.allclose(a.float(), b.float(), rtol=tolerance, atol=tolerance))


def _sample(shape, dtype):
    return torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)


def _is_plain_rms_norm(module) -> bool:
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if not type(module).__name__.endswith("RMSNorm") or not isinstance(weight, torch.Tensor) \
            or weight.dim() != 1 or not isinstance(eps, float):
        return False
    x = _sample((2, 3, weight.shape[0]), weight.dtype)
    with torch.no_grad():
        return _close(module(x), _rms_norm(x, weight, eps))


def _norm_forward(self, hidden_states):
    return rms_norm(hidden_states, self.weight, self._cpuft_eps)


def _is_gated_silu_mlp(module) -> bool:
    if not all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        return False
    if not isinstance(module.act_fn, torch.nn.SiLU) and type(module.act_fn).__name__ != "SiLUActivation":
        return False
    weight = next(module.parameters())
    x = _sample((2, 3, module.gate_proj.in_features), weight.dtype)
    was_training = module.training
    module.eval()  # LoRA dropout off for the check
    try:
        with torch.no_grad():
            reference = module.down_proj(_swiglu(module.gate_proj(x), module.up_proj(x)))
            return _close(module(x), reference)
    finally:
        module.train(was_training)


def _mlp_forward(self, x):
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def _rotary_computes_the_same(original, head_dim: int, dtype) -> bool:
    q, k = _sample((2, 3, 4, head_dim), dtype), _sample((2, 1, 4, head_dim), dtype).flip(-1)
    cos, sin = _sample((2, 4, head_dim), dtype), _sample((2, 4, head_dim), dtype).flip(0)
    try:
        with torch.no_grad():
            theirs, ours = original(q, k, cos, sin), _rotary(q, k, cos, sin)
    except Exception:  # a different signature: not the function compiled here
        return False
    return all(_close(a, b) for a, b in zip(theirs, ours))


def _swap_rotary(attention, checked: dict) -> bool:
    """Make `attention` call the compiled rotary where its modeling module's `apply_rotary_pos_emb`
    computes `_rotary`. The attention's forward reads that module global, so this instance's
    forward swaps it in for the length of its own call only: other models keep theirs."""
    module = sys.modules.get(type(attention).__module__)
    original = getattr(module, "apply_rotary_pos_emb", None)
    head_dim = getattr(attention, "head_dim", None)
    if original is None or not isinstance(head_dim, int) or head_dim % 2:
        return False
    key = (type(attention), head_dim)
    if key not in checked:
        checked[key] = _rotary_computes_the_same(original, head_dim, next(attention.parameters()).dtype)
    if not checked[key]:
        return False
    forward = attention.forward

    def forward_with_compiled_rotary(*args, **kwargs):
        module.apply_rotary_pos_emb = rotary
        try:
            return forward(*args, **kwargs)
        finally:
            module.apply_rotary_pos_emb = original

    attention.forward = forward_with_compiled_rotary
    return True


def compile_head_tiles() -> bool:
    """Compile TRL's CPU lm_head + loss tile functions (trl.kernels.chunked_logprob `_forward_tile`
    and `_backward_tile`, the torch-op fallback of its Triton kernels, called once per
    [tokens, columns] tile: ~12 eager passes each way over every logit). TRL's own code, compiled:
    the same function, so the swap is for the process. False when TRL has no such functions."""
    from trl.kernels import chunked_logprob as kernel

    for name in ("_forward_tile", "_backward_tile"):
        function = getattr(kernel, name, None)
        if function is None:
            return False
        if not getattr(function, "cpuft_compiled", False):
            compiled = _compiled(function)
            compiled.cpuft_compiled = True
            setattr(kernel, name, compiled)
    return True


def _stop_hub_kernel_resets(model) -> None:
    """transformers 5 loads a model with hub kernels on (`use_kernels`, its default) and kernelizes
    it again at every switch between train and eval mode. Kernelizing puts back the forward of each
    module decorated for hub kernels (RMSNorm among them), over the compiled one swapped in here: the
    Trainer's first `model.train()` silently undid the compiled RMSNorm (measured: 49 eager norms,
    ~0.25 s of a 2,048-token Qwen2.5-0.5B step). On CPU those modules have no hub kernel to lose;
    resetting the kernelization keeps the swap for the run."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base, "use_kernels", False) and hasattr(base, "reset_kernels"):
        base.reset_kernels()


def compile_elementwise(model) -> dict[str, int]:
    """Swap the compiled kernels into `model` wherever they compute the module's own function, and
    compile TRL's lm_head + loss tiles; counts of {"rms_norm", "mlp", "rotary", "head_tiles"} swapped.
    The swaps hold across train/eval switches (`_stop_hub_kernel_resets`)."""
    _stop_hub_kernel_resets(model)
    counts = {"rms_norm": 0, "mlp": 0, "rotary": 0, "head_tiles": int(compile_head_tiles())}
    rotary_checked: dict[tuple, bool] = {}
    for module in model.modules():
        if _is_plain_rms_norm(module):
            module._cpuft_eps = float(getattr(module, "variance_epsilon", getattr(module, "eps", 0.0)))
            module.forward = types.MethodType(_norm_forward, module)
            counts["rms_norm"] += 1
        elif _is_gated_silu_mlp(module):
            module.forward = types.MethodType(_mlp_forward, module)
            counts["mlp"] += 1
        elif all(hasattr(module, name) for name in ("q_proj", "k_proj", "head_dim")):
            counts["rotary"] += _swap_rotary(module, rotary_checked)
    return counts
