"""The fused LoRA linear (cpuft.fastpaths.fused_lora) computes what PEFT's LoRA computes.

Yardsticks: stock PEFT's forward (dropout 0: every op is deterministic) and, with dropout, torch's
own autograd of y = x W^T + b + s ((x * keep / (1 - p)) A^T) B^T with the same keep mask.
Tolerances (fp32): outputs and gradients within 1e-5 of the largest magnitude; the mask keeps
1 - p of 4 M elements within 0.001 (9 standard deviations).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from tests.lora_models import loss_and_grads, tiny_lora_model  # noqa: E402


def lora_llama(vocab: int = 300, tied: bool = False, dropout: float = 0.0, use_dora: bool = False):
    """A 2-layer Llama with LoRA r 8 on every linear layer (tests/lora_models.py)."""
    return tiny_lora_model("llama", vocab=vocab, tied=tied, dropout=dropout, use_dora=use_dora)


def _batch():
    ids = torch.randint(0, 300, (2, 48), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def _assert_close(got: dict, want: dict, rel: float):
    assert got.keys() == want.keys()
    scale = max(float(g.abs().max()) for g in want.values())
    assert scale > 0
    for name, grad in want.items():
        assert float((got[name] - grad).abs().max()) <= rel * scale, name


def test_whole_model_loss_and_gradients_equal_stock_peft():
    from cpuft.fastpaths.fused_lora import fuse_lora_layers

    model, batch = lora_llama(), _batch()
    peft_loss, peft_grads = loss_and_grads(model, batch)
    assert fuse_lora_layers(model) == (14, 0)  # 2 layers x q k v o gate up down
    fused_loss, fused_grads = loss_and_grads(model, batch)
    assert abs(fused_loss - peft_loss) <= 1e-5
    _assert_close(fused_grads, peft_grads, 1e-5)
    # Outside training (evaluation, generation) PEFT's own forward runs: the same logits.
    model.eval()
    with torch.no_grad():
        assert abs(float(model(**batch).loss) - peft_loss) <= 1e-6


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_one_layer_equals_torch_autograd_with_the_same_mask(p, compiled):
    from cpuft.fastpaths.compiled_elementwise import hashed_keep
    from cpuft.fastpaths.fused_lora import draw_seeds, hashed_scale, hashed_threshold, keep_mask, keep_scale, lora_linear

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 37, 24, generator=generator, requires_grad=True)
    weight, bias = torch.randn(40, 24, generator=generator), torch.randn(40, generator=generator)
    lora_a = torch.randn(4, 24, generator=generator, requires_grad=True)
    lora_b = torch.randn(40, 4, generator=generator, requires_grad=True)
    grad_out = torch.randn(3, 37, 40, generator=generator)

    torch.manual_seed(7)
    out = lora_linear(x, weight, bias, lora_a, lora_b, 2.0, p, compiled)
    got = torch.autograd.grad(out, (x, lora_a, lora_b), grad_out)
    torch.manual_seed(7)  # the same draws: the same mask
    if not p:
        keep, scale = torch.ones(3, 37, 24, dtype=torch.bool), 1.0
    elif compiled:  # the mask is a hash of each index under two seeds from torch's generator
        keep = hashed_keep(torch.empty(3 * 37, 24), draw_seeds(), hashed_threshold(p)).view(3, 37, 24)
        scale = hashed_scale(p)
    else:  # 16-bit lanes from torch's generator
        keep, scale = keep_mask((3 * 37, 24), p).view(3, 37, 24), keep_scale(p)
    if p:
        assert not bool(keep.all())  # the mask really drops something here
    want_out = x @ weight.T + bias + 2.0 * ((x * keep * scale) @ lora_a.T) @ lora_b.T
    want = torch.autograd.grad(want_out, (x, lora_a, lora_b), grad_out)

    assert float((out - want_out).detach().abs().max()) <= 1e-5 * float(want_out.detach().abs().max())
    _assert_close(dict(zip("x a b".split(), got)), dict(zip("x a b".split(), want)), 1e-5)


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_keep_mask_keeps_one_minus_p_in_every_lane(p):
    from cpuft.fastpaths.fused_lora import keep_mask, keep_scale

    torch.manual_seed(0)
    mask = keep_mask((1000, 4000), p)
    assert mask.dtype == torch.bool and mask.shape == (1000, 4000)
    assert abs(float(mask.float().mean()) - (1 - p)) <= 1e-3
    # Four 16-bit lanes come from one 64-bit draw: each lane position must be unbiased too.
    for lane in mask.view(-1, 4).float().mean(0).tolist():
        assert abs(lane - (1 - p)) <= 2e-3
    assert not torch.equal(mask, keep_mask((1000, 4000), p))  # fresh draws every call
    assert abs(keep_scale(p) - 1 / (1 - p)) <= 1e-4  # p rounded to 1/65536


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_dropout_is_unbiased_like_torchs(compiled):
    """Dropout's law, as torch's: E[output] is the no-dropout output (keep / (1 - p) rescales)."""
    from cpuft.fastpaths.fused_lora import lora_linear

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(8, 16, generator=generator)
    weight, lora_a, lora_b = (torch.randn(*shape, generator=generator) for shape in ((12, 16), (4, 16), (12, 4)))
    torch.manual_seed(0)
    with torch.no_grad():
        draws = torch.stack([lora_linear(x, weight, None, lora_a, lora_b, 1.0, 0.5, compiled) for _ in range(2000)])
        exact = lora_linear(x, weight, None, lora_a, lora_b, 1.0, 0.0)
    assert float(draws.std(0).min()) > 0  # every output really varies
    # 6 standard errors: 96 outputs, each outside with probability ~2e-9.
    assert bool(((draws.mean(0) - exact).abs() <= 6 * draws.std(0) / 2000**0.5).all())


def test_dropout_training_draws_fresh_masks_and_stays_finite():
    from cpuft.fastpaths.fused_lora import fuse_lora_layers

    model, batch = lora_llama(dropout=0.1), _batch()
    assert fuse_lora_layers(model) == (14, 0)
    first, first_grads = loss_and_grads(model, batch)
    second, _ = loss_and_grads(model, batch)
    assert torch.isfinite(torch.tensor([first, second])).all()
    assert first != second
    assert all(bool(torch.isfinite(g).all()) for g in first_grads.values())


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_recomputes_the_same_dropout_masks(use_reentrant, compiled):
    """With dropout, checkpointing's recompute must draw the masks its first forward drew (reentrant
    checkpointing runs that forward without gradients): the same loss and gradients as no checkpointing."""
    from cpuft.fastpaths.fused_lora import fuse_lora_layers

    model, batch = lora_llama(dropout=0.1), _batch()
    fuse_lora_layers(model, compiled=compiled)
    torch.manual_seed(3)
    plain_loss, plain_grads = loss_and_grads(model, batch)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    model.enable_input_require_grads()  # what PEFT/TRL do for checkpointing with a frozen embedding
    torch.manual_seed(3)
    checkpointed_loss, checkpointed_grads = loss_and_grads(model, batch)
    assert abs(checkpointed_loss - plain_loss) <= 1e-5
    _assert_close(checkpointed_grads, plain_grads, 1e-5)


def test_autocast_bf16_runs_in_bf16_and_returns_fp32_adapter_gradients():
    from cpuft.fastpaths.fused_lora import fuse_lora_layers

    model, batch = lora_llama(), _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        peft_loss, peft_grads = loss_and_grads(model, batch)
    fuse_lora_layers(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused_loss, fused_grads = loss_and_grads(model, batch)
    assert all(g.dtype == torch.float32 for g in fused_grads.values())
    assert abs(fused_loss - peft_loss) <= 1e-2 * abs(peft_loss)  # bf16: 8 bits of mantissa
    _assert_close(fused_grads, peft_grads, 5e-2)


@pytest.mark.parametrize("fused_adamw", [True, False], ids=["fused-adamw", "adamw"])
def test_bf16_working_copies_follow_every_optimizer_step(fused_adamw):
    """Under bf16 autocast the fp32 adapter is cast once and reused until it changes; fused AdamW
    updates it in place without bumping its version: the next step must still see the new weights
    (the loss equals stock PEFT's on the same updated weights)."""
    from cpuft.fastpaths.fused_lora import fuse_lora_layers

    stock, fused, batch = lora_llama(), lora_llama(), _batch()
    fuse_lora_layers(fused)
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2, fused=fused_adamw)
                  for m in (stock, fused)]
    for _ in range(3):
        losses = []
        for model, optimizer in zip((stock, fused), optimizers):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss))
        assert abs(losses[1] - losses[0]) <= 1e-2 * abs(losses[0])
    assert losses[0] < 5.7  # both trained: ln(300) = 5.70 at the start


def test_layers_it_cannot_fuse_keep_peft_forward():
    from cpuft.fastpaths.fused_lora import fuse_lora_layers, why_not_fused

    model = lora_llama(use_dora=True)
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    assert "variant" in why_not_fused(layer)
    assert fuse_lora_layers(model) == (0, 14)

