"""The gated MLP's activation, `silu(gate) * up`, as one autograd node that keeps two tensors.

Llama-family MLPs compute `down_proj(silu(gate_proj(x)) * up_proj(x))`. Autograd keeps gate's
output for SiLU's backward, SiLU's output and up's output for the product's backward: three
[tokens, intermediate] tensors per layer (at Qwen2.5-0.5B's shapes and 2,048 tokens, 40 MB
each, 24 layers), plus the product, which down_proj's adapter needs anyway. `silu_mul` keeps
gate and up only and recomputes SiLU in backward (one elementwise pass more), so each layer
holds one such tensor less.

The same function: tests/test_fused_swiglu.py (the MLP's output and its input gradient equal
transformers' own forward within 1e-6; a LoRA'd model's loss and gradients within 1e-5).

Measured (docs/speed.md; `scripts/profile_step.py --size qwen0.5b --fused-swiglu`, 2-core AVX2
EPYC): peak RSS 9.8-10.1 GiB -> 9.1 GiB at Qwen2.5-0.5B's shapes, 4 x 512 tokens, but the steps
ran 3-10 % slower in both A/Bs (the recompute), so the plan does not use it: it is here to
measure, and for a memory-bound plan to use once that is measured too.

Limits: the MLP classes in FUSABLE_MLPS with a SiLU activation; others keep their forward.
"""

from __future__ import annotations

import types

import torch

# Classes whose forward is exactly down_proj(act_fn(gate_proj(x)) * up_proj(x)) (transformers 5).
FUSABLE_MLPS = ("LlamaMLP", "Qwen2MLP", "Qwen3MLP", "MistralMLP")
# transformers' ACT2FN["silu"] (SiLUActivation: F.silu) and torch's own.
SILU_MODULES = ("SiLUActivation", "SiLU")


class SiLUMulFunction(torch.autograd.Function):
    """silu(gate) * up, keeping gate and up for backward."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return torch.nn.functional.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, grad_out):
        gate, up = ctx.saved_tensors
        # torch's own SiLU derivative kernel (one vectorised pass), as autograd's silu node runs it.
        grad_gate = torch.ops.aten.silu_backward(grad_out * up, gate)
        grad_up = torch.nn.functional.silu(gate).mul_(grad_out)
        return grad_gate, grad_up


def silu_mul(gate, up):
    return SiLUMulFunction.apply(gate, up)


def _fused_forward(self, x):
    if not self.training:  # evaluation and generation: nothing is kept for backward anyway
        return type(self).forward(self, x)
    return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


def fuse_swiglu_mlps(model) -> tuple[int, int]:
    """Give every fusable gated MLP in `model` the fused activation; (fused, gated MLPs kept)."""
    fused = kept = 0
    for module in model.modules():
        name = type(module).__name__
        if not name.endswith("MLP") or not hasattr(module, "gate_proj"):
            continue
        if name in FUSABLE_MLPS and type(getattr(module, "act_fn", None)).__name__ in SILU_MODULES:
            module.forward = types.MethodType(_fused_forward, module)
            fused += 1
        else:
            kept += 1
    return fused, kept
