"""LoRA's training forward and backward on CPU as one autograd node per adapted linear layer.

PEFT's vanilla LoRA forward, `base(x) + lora_B(lora_A(dropout(x))) * scaling`, is a chain of
separate passes over the activations, each a memory-bound pass on a CPU: dropout draws a float
mask element by element from the Mersenne-Twister generator (torch's `bernoulli_`: ~40 M
elements/s, a seventh of the 100m step), divides it and multiplies; the scale and the add each
read and write the [tokens, out] output; autograd keeps the dropped input *and* the float mask
of every adapted layer for backward (8 bytes per input element, per layer: q, k and v each keep
their own copy of the same input) and runs the mirror passes back.

`fuse_lora_layers` makes each plain LoRA Linear compute the same function in one node:
- forward: y = x W^T + b, then the adapter's product added into y by the GEMM itself
  (`addmm_` with alpha = scaling): no scale pass, no add pass, no [tokens, out] temporary;
- dropout keeps each input element with probability 1 - p. With the compiled kernels
  (cpuft.fastpaths.compiled_elementwise) the mask is a hash of the element's index under two
  seeds drawn from torch's generator, applied in one pass and recomputed in backward: only x
  and the seeds are kept. Eagerly it is drawn 16 random bits at a time from one 64-bit draw
  (`keep_mask`: four elements per generator call instead of one), stored as a 1-byte mask, with p
  rounded to a multiple of 1/65536 (0.05 -> 0.0500031);
- backward: the base weight is frozen, so x's gradient is g W plus the adapter's, added by the
  GEMM (p = 0) or one fused multiply-add (p > 0); A's and B's gradients are rank-sized GEMMs;
  saved for backward: x (the same tensor for q, k and v, unless autocast had to cast it), the
  dropped copy and its 1-byte mask where the mask is eager, and h = x A^T.

The same function: tests/test_fused_lora.py (p = 0: the loss and every LoRA gradient of a whole
model equal stock PEFT's within 1e-5; p > 0: equal to torch's own autograd with the same masks;
the mask keeps 1 - p of the elements). Under CPU autocast the products run in the autocast
dtype, as PEFT's do, and A's and B's gradients come back in their own (fp32) dtype.

Limits: PEFT's plain `lora.Linear` over an `nn.Linear` with a frozen weight, one active adapter
without a variant (DoRA, aLoRA, ...), no LoRA bias, no fan_in_fan_out; anything else, and every
forward in eval mode (evaluation, generation), runs PEFT's own forward.
"""

from __future__ import annotations

import types

import torch

from cpuft.fastpaths.compiled_elementwise import HASH_BITS, drop_hashed, dropout_backward_hashed

# One 64-bit draw gives four 16-bit lanes; each lane keeps its element when it is >= the threshold.
MASK_LANES = 4
MASK_LEVELS = 1 << 16


def keep_lanes(shape, generator=None):
    """A uniform int16 tensor of `shape`: four 16-bit lanes from each 64-bit draw."""
    count = 1
    for size in shape:
        count *= size
    words = torch.randint(-(1 << 63), (1 << 63) - 1, ((count + MASK_LANES - 1) // MASK_LANES,),
                          dtype=torch.int64, generator=generator)
    return words.view(torch.int16)[:count].view(shape)


def keep_threshold(p: float) -> int:
    """The lane value from which an element is kept: lanes are uniform over [-32768, 32767]."""
    return round(p * MASK_LEVELS) - MASK_LEVELS // 2


def keep_mask(shape, p: float, generator=None):
    """A bool tensor of `shape`: True with probability 1 - p (p rounded to a multiple of 1/65536)."""
    return keep_lanes(shape, generator) >= keep_threshold(p)


def keep_scale(p: float) -> float:
    """1 / (probability of keeping), for the rounded p that keep_mask draws with."""
    return 1.0 / (1.0 - round(p * MASK_LEVELS) / MASK_LEVELS)


def drop_input(flat, p: float):
    """(flat with dropout p applied and the kept elements scaled by keep_scale(p), the keep mask)."""
    keep = keep_mask(flat.shape, p)
    return torch.where(keep, flat, 0).mul_(keep_scale(p)), keep


def add_dropped_gradient(grad_x, grad_dropped, keep, p: float):
    """grad_x + grad_dropped * keep_scale(p) where the input was kept: dropout's backward."""
    return grad_x.add_(torch.where(keep, grad_dropped, 0), alpha=keep_scale(p))


def draw_seeds():
    """Two 32-bit seeds for a hashed dropout mask (cpuft.fastpaths.compiled_elementwise.hashed_keep),
    from torch's generator: under torch.manual_seed a run draws the same masks again, and
    checkpointing's recompute (which restores the generator) the masks its first forward drew."""
    return torch.randint(-(1 << (HASH_BITS - 1)), 1 << (HASH_BITS - 1), (2,), dtype=torch.int32)


def hashed_threshold(p: float) -> int:
    """The 32-bit hash value from which an element is kept: P(keep) = 1 - p to within 2**-32."""
    return round(p * (1 << HASH_BITS))


def hashed_scale(p: float) -> float:
    """1 / P(keep) for hashed_threshold(p)."""
    return 1.0 / (1.0 - hashed_threshold(p) / (1 << HASH_BITS))


class LoRALinearFunction(torch.autograd.Function):
    """y = x W^T + b + scaling * ((x * keep * q) A^T) B^T, W and b frozen; q = keep_scale(p)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float, p: float, compiled: bool = False):
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        with torch.autocast("cpu", enabled=False):
            flat = x.reshape(-1, x.shape[-1]).to(dtype)
            a, b = working_copy(lora_a, dtype), working_copy(lora_b, dtype)
            out = torch.nn.functional.linear(flat, weight.to(dtype), None if bias is None else bias.to(dtype))
            if p > 0 and compiled:
                # A hashed mask, recomputed in backward: x is kept (one tensor for q, k and v
                # alike), not a dropped copy and a mask per layer.
                keep = draw_seeds()
                h = torch.mm(drop_hashed(flat, keep, hashed_threshold(p), hashed_scale(p)), a.t())
                saved = flat
            else:
                # The dropped (and rescaled) input is what A's gradient needs: it is kept in place of x.
                saved, keep = drop_input(flat, p) if p > 0 else (flat, None)
                h = torch.mm(saved, a.t())
            out.addmm_(h, b.t(), alpha=scaling)
        ctx.save_for_backward(saved, keep, h, weight, lora_a, lora_b)
        ctx.scaling, ctx.p, ctx.dtype, ctx.x_dtype, ctx.compiled = scaling, p, dtype, x.dtype, compiled
        ctx.x_shape = x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad_out):
        saved, keep, h, weight, lora_a, lora_b = ctx.saved_tensors
        scaling, p, dtype = ctx.scaling, ctx.p, ctx.dtype
        hashed = keep is not None and ctx.compiled  # keep holds the seeds: see forward
        with torch.autocast("cpu", enabled=False):
            g = grad_out.reshape(-1, grad_out.shape[-1]).to(dtype)
            a, b = working_copy(lora_a, dtype), working_copy(lora_b, dtype)
            grad_h = torch.mm(g, b).mul_(scaling)  # [tokens, r]
            grad_b = torch.mm(g.t(), h).mul_(scaling) if lora_b.requires_grad else None
            dropped, grad_x = saved, None
            if ctx.needs_input_grad[0]:
                grad_x = torch.mm(g, weight.to(dtype))
                if keep is None:
                    grad_x.addmm_(grad_h, a)
                elif hashed:  # the mask recomputed once: the input gradient and the dropped input together
                    grad_x, dropped = dropout_backward_hashed(grad_x, torch.mm(grad_h, a), saved, keep,
                                                              hashed_threshold(p), hashed_scale(p))
                else:
                    grad_x = add_dropped_gradient(grad_x, torch.mm(grad_h, a), keep, p)
                grad_x = grad_x.view(ctx.x_shape).to(ctx.x_dtype)
            elif hashed:
                dropped = drop_hashed(saved, keep, hashed_threshold(p), hashed_scale(p))
            grad_a = torch.mm(grad_h.t(), dropped) if lora_a.requires_grad else None
        return (grad_x, None, None, None if grad_a is None else grad_a.to(lora_a.dtype),
                None if grad_b is None else grad_b.to(lora_b.dtype), None, None, None)


# Bumped after every optimizer step, by a global step hook registered on first use: fused
# AdamW updates parameters in place without bumping their version counters.
_optimizer_steps = [0]


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    _optimizer_steps[0] += 1


def working_copy(param, dtype):
    """`param` in `dtype`, cast once per change rather than at every call (LoRA's A and B are
    fp32 masters under bf16 autocast: 14 small casts per layer each way measured ~3 ms a layer).
    The cast is cached on the tensor, keyed by the count of optimizer steps taken in this
    process and by the tensor's version counter (loading weights, DDP's broadcast)."""
    if param.dtype == dtype:
        return param.detach()
    if _optimizer_steps[0] == 0 and not getattr(_count_optimizer_step, "registered", False):
        from torch.optim.optimizer import register_optimizer_step_post_hook

        register_optimizer_step_post_hook(_count_optimizer_step)
        _count_optimizer_step.registered = True
    key = (_optimizer_steps[0], param._version, dtype)
    cached = getattr(param, "_cpuft_working_copy", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    copy = param.detach().to(dtype)
    param._cpuft_working_copy = (key, copy)
    return copy


def lora_linear(x, weight, bias, lora_a, lora_b, scaling: float, p: float, compiled: bool = False):
    """The fused LoRA linear (see the module docstring); differentiable in x, lora_a and lora_b.
    `compiled`: dropout's passes as cpuft.fastpaths.compiled_elementwise kernels."""
    return LoRALinearFunction.apply(x, weight, bias, lora_a, lora_b, scaling, p, compiled)


def why_not_fused(module) -> str | None:
    """Why `module` (a PEFT LoRA layer) keeps PEFT's forward; None when it can be fused."""
    from peft.tuners.lora import layer as lora_layer

    if type(module) is not lora_layer.Linear:
        return f"{type(module).__name__} is not PEFT's plain LoRA Linear"
    if type(module.base_layer) is not torch.nn.Linear:
        return f"its base layer is {type(module.base_layer).__name__}, not nn.Linear"
    if module.base_layer.weight.requires_grad:
        return "its base weight is trained"
    if module.fan_in_fan_out:
        return "fan_in_fan_out weights"
    for name in module.lora_A:
        if name in module.lora_variant:
            return f"adapter {name!r} is a LoRA variant (DoRA, aLoRA, ...)"
        if module.lora_B[name].bias is not None:
            return f"adapter {name!r} has a LoRA bias"
    return None


def _fused_forward(self, x, *args, **kwargs):
    """PEFT's forward, fused where it is plain training LoRA (see why_not_fused)."""
    active = [name for name in self.active_adapters if name in self.lora_A]
    # In training mode even without gradients: reentrant gradient checkpointing runs the first
    # forward under no_grad and must draw the same dropout masks as its recompute.
    if args or kwargs or self.disable_adapters or self.merged or len(active) != 1 or not self.training:
        return type(self).forward(self, x, *args, **kwargs)
    name = active[0]
    dropout = self.lora_dropout[name]
    p = float(dropout.p) if isinstance(dropout, torch.nn.Dropout) else 0.0
    base = self.base_layer
    return lora_linear(x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight,
                       float(self.scaling[name]), p, self._cpuft_compiled)


def fuse_lora_layers(model, compiled: bool = False) -> tuple[int, int]:
    """Give every fusable PEFT LoRA Linear in `model` the fused training forward (`compiled`:
    dropout's passes as compiled kernels); (layers fused, LoRA layers left with PEFT's forward)."""
    from peft.tuners.lora import LoraLayer

    fused = kept = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        if why_not_fused(module) is None:
            module.forward = types.MethodType(_fused_forward, module)
            module._cpuft_compiled = compiled
            fused += 1
        else:
            kept += 1
    return fused, kept
