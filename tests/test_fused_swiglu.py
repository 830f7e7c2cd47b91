"""The fused gated-MLP activation (cpuft.fastpaths.fused_swiglu) computes transformers' own MLP.

Yardstick: the MLP's own forward (`down_proj(act_fn(gate_proj(x)) * up_proj(x))`) and torch's
autograd of it. Tolerances (fp32): outputs and gradients within 1e-6 of the largest magnitude
for one MLP, 1e-5 for a whole LoRA'd model.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from tests.test_fused_lora import lora_llama, loss_and_grads  # noqa: E402  (after the torch check)


def test_silu_mul_equals_torch_autograd():
    from cpuft.fastpaths.fused_swiglu import silu_mul

    generator = torch.Generator().manual_seed(0)
    gate = (torch.randn(64, 96, generator=generator) * 3).requires_grad_(True)  # both tails of SiLU
    up = torch.randn(64, 96, generator=generator).requires_grad_(True)
    grad_out = torch.randn(64, 96, generator=generator)
    got = silu_mul(gate, up)
    got_grads = torch.autograd.grad(got, (gate, up), grad_out)
    want = torch.nn.functional.silu(gate) * up
    want_grads = torch.autograd.grad(want, (gate, up), grad_out)
    assert float((got - want).detach().abs().max()) <= 1e-6 * float(want.detach().abs().max())
    for g, w in zip(got_grads, want_grads):
        assert float((g - w).abs().max()) <= 1e-6 * float(w.abs().max())


def test_whole_model_loss_and_gradients_equal_transformers_mlp():
    from cpuft.fastpaths.fused_swiglu import fuse_swiglu_mlps

    model = lora_llama()
    batch = {"input_ids": torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1))}
    batch["labels"] = batch["input_ids"]
    plain_loss, plain_grads = loss_and_grads(model, batch)
    assert fuse_swiglu_mlps(model) == (2, 0)
    fused_loss, fused_grads = loss_and_grads(model, batch)
    assert abs(fused_loss - plain_loss) <= 1e-5
    scale = max(float(g.abs().max()) for g in plain_grads.values())
    for name, grad in plain_grads.items():
        assert float((fused_grads[name] - grad).abs().max()) <= 1e-5 * scale, name


def test_it_keeps_one_intermediate_tensor_less_per_layer():
    """Counted with saved-tensor hooks: bytes autograd keeps for backward through one MLP."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    from cpuft.fastpaths.fused_swiglu import fuse_swiglu_mlps

    mlp = LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=256)).train()
    for p in mlp.parameters():
        p.requires_grad_(False)  # frozen, as under LoRA
    x = torch.randn(10, 32, requires_grad=True)

    def saved_bytes():
        sizes = []

        def pack(t):
            sizes.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            mlp(x).sum().backward()
        return sum(s for s in sizes if s == 10 * 256 * 4)  # the [tokens, intermediate] ones

    plain = saved_bytes()
    fuse_swiglu_mlps(mlp)
    fused = saved_bytes()
    assert plain - fused == 10 * 256 * 4  # one [tokens, intermediate] fp32 tensor less


def test_other_activations_keep_their_forward():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    from cpuft.fastpaths.fused_swiglu import fuse_swiglu_mlps

    gelu = LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=64, hidden_act="gelu"))
    assert fuse_swiglu_mlps(gelu) == (0, 1)
