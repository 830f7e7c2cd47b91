"""The compiled elementwise kernels (cpuft.fastpaths.compiled_elementwise) compute what the eager
code they replace computes, forward and backward, alone and inside a whole LoRA model.

Yardsticks: the eager formulas written out here with plain torch ops, and stock PEFT's LoRA model
(dropout 0: deterministic). Tolerances follow the dtype: fp32 within 1e-5 of the largest
magnitude; bf16 (autocast and bf16 weights, as the plan runs on AMX/AVX-512-BF16) within 1 % for
the loss and 5 % of the largest gradient, bf16's 8-bit mantissa accumulated over two layers.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from cpuft.fastpaths.compiled_elementwise import why_not_compiled  # noqa: E402
from tests.lora_models import loss_and_grads, tiny_lora_model  # noqa: E402

pytestmark = pytest.mark.skipif(why_not_compiled() is not None, reason=str(why_not_compiled()))

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def _trl_tiles_restored():
    """compile_head_tiles swaps TRL's tile functions for the process: put TRL's own back after each test."""
    import trl.kernels.chunked_logprob as kernel

    eager = (kernel._forward_tile, kernel._backward_tile)
    yield
    kernel._forward_tile, kernel._backward_tile = eager


def _random(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).requires_grad_(True)


def _forward_and_grads(function, inputs, seed=9):
    out = function(*inputs)
    out = out if isinstance(out, tuple) else (out,)
    grads_out = [torch.randn(o.shape, generator=torch.Generator().manual_seed(seed + i)).to(o.dtype)
                 for i, o in enumerate(out)]
    grads = torch.autograd.grad(out, [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad], grads_out)
    return [o.detach() for o in out] + list(grads)


def _assert_all_close(got, want, dtype):
    tolerance = TOLERANCE[dtype]
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        scale = max(float(b.abs().max()), 1e-6)
        assert float((a.float() - b.float()).abs().max()) <= tolerance * scale


def _eager_rms_norm(x, weight, eps):
    """Llama's RMSNorm as transformers writes it."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _eager_rotary(q, k, cos, sin):
    """transformers' apply_rotary_pos_emb with its rotate_half."""
    def rotate_half(x):
        return torch.cat((-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]), dim=-1)

    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_each_kernel_equals_its_eager_formula_forward_and_backward(dtype):
    from cpuft.fastpaths.compiled_elementwise import rms_norm, rotary, swiglu

    # Two shapes per kernel: symbolic shapes, so the second runs the same compiled code.
    for rows, seq in ((2, 37), (3, 64)):
        x, weight = _random(rows, seq, 48, dtype=dtype), _random(48, dtype=dtype, seed=1)
        _assert_all_close(*(_forward_and_grads(f, (x, weight, 1e-6)) for f in (rms_norm, _eager_rms_norm)), dtype)
        gate, up = _random(rows, seq, 96, dtype=dtype, seed=2), _random(rows, seq, 96, dtype=dtype, seed=3)
        _assert_all_close(*(_forward_and_grads(f, (gate, up)) for f in
                            (swiglu, lambda g, u: torch.nn.functional.silu(g) * u)), dtype)
        q, k = _random(rows, 4, seq, 16, dtype=dtype, seed=4), _random(rows, 2, seq, 16, dtype=dtype, seed=5)
        cos, sin = (torch.randn(rows, seq, 16, generator=torch.Generator().manual_seed(s)).to(dtype) for s in (6, 7))
        _assert_all_close(*(_forward_and_grads(f, (q, k, cos, sin)) for f in (rotary, _eager_rotary)), dtype)


def _lowbias32(x: int) -> int:
    """The hash written out with Python integers, from its published form (C. Wellons, hash-prospector)."""
    x ^= x >> 16
    x = (x * 0x21F0AAAD) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x735A2D97) & 0xFFFFFFFF
    return x ^ (x >> 15)


@pytest.mark.parametrize("threshold", [0x0CCCCCCD, 1 << 31, 0xF3333333])
def test_hashed_mask_is_the_published_hash_of_each_index(threshold):
    """The int32 lanes compute the uint32 hash: every index, seeds and thresholds past 2**31."""
    from cpuft.fastpaths.compiled_elementwise import drop_hashed, hashed_keep

    seeds = torch.tensor([0x9E3779B9, 0x7F4A7C15], dtype=torch.int64)
    keep = hashed_keep(torch.empty(5, 7), seeds, threshold)
    assert keep.shape == (5, 7)
    want = [_lowbias32(_lowbias32(index ^ 0x9E3779B9) ^ 0x7F4A7C15) >= threshold for index in range(35)]
    assert keep.view(-1).tolist() == want
    assert 0 < sum(want) < 35
    # The compiled kernel (vector body and scalar tail: 35 is no multiple of a vector) agrees.
    dropped = drop_hashed(torch.ones(5, 7), seeds, threshold, 1.0)
    assert (dropped.view(-1) == 1).tolist() == want


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_hashed_masks_keep_one_minus_p_and_differ_by_seed(p):
    from cpuft.fastpaths.compiled_elementwise import hashed_keep
    from cpuft.fastpaths.fused_lora import draw_seeds, hashed_scale, hashed_threshold

    torch.manual_seed(0)
    like = torch.empty(1000, 4000)
    first, second = (hashed_keep(like, draw_seeds(), hashed_threshold(p)) for _ in range(2))
    # 4M draws: the kept fraction's standard error is <= 2.5e-4; 1e-3 is 4 of them.
    assert abs(float(first.float().mean()) - (1 - p)) <= 1e-3
    for column_block in first.view(1000, 8, 500).float().mean((0, 2)).tolist():  # no stretch of indices biased
        assert abs(column_block - (1 - p)) <= 3e-3
    # Another seed: an independent mask (its agreement with the first is what independence gives).
    both_dropped = float((~first & ~second).float().mean())
    assert abs(both_dropped - p * p) <= 1e-3 + 0.05 * p * p
    assert abs(hashed_scale(p) - 1 / (1 - p)) <= 1e-8


def test_dropout_kernels_equal_the_masked_formula():
    from cpuft.fastpaths.compiled_elementwise import drop_hashed, dropout_backward_hashed, hashed_keep

    x = torch.randn(37, 24, generator=torch.Generator().manual_seed(0)).bfloat16()
    seeds = torch.tensor([12345, 67890], dtype=torch.int64)
    threshold = int(0.1 * 2**32)
    keep = hashed_keep(x, seeds, threshold)
    assert 0 < int(keep.sum()) < keep.numel()
    assert torch.equal(drop_hashed(x, seeds, threshold, 1.25), (x * keep * 1.25).to(torch.bfloat16))
    total, addend = torch.randn(37, 24).bfloat16(), torch.randn(37, 24).bfloat16()
    want = (total.float() + addend.float() * keep * 1.25)
    got, dropped = dropout_backward_hashed(total, addend, x, seeds, threshold, 1.25)
    assert float((got.float() - want).abs().max()) <= 2e-2 * float(want.abs().max())
    assert torch.equal(dropped, (x * keep * 1.25).to(torch.bfloat16))


def _batch():
    ids = torch.randint(0, 300, (2, 48), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0
    return dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_whole_model_loss_and_lora_gradients_equal_stock_peft(model_type, dtype):
    from types import SimpleNamespace

    from cpuft.fastpaths import apply_fast_paths

    model, batch, autocast = tiny_lora_model(model_type, dtype), _batch(), dtype == torch.bfloat16
    stock_loss, stock_grads = loss_and_grads(model, batch, autocast)
    done = apply_fast_paths(model, SimpleNamespace(fused_lora=True, compiled_elementwise=True, short_row_attention=False))
    # 2 layers: 2 norms each plus the final one; one MLP and one attention each; 7 LoRA linears each.
    assert done == {"compiled_elementwise": {"rms_norm": 5, "mlp": 2, "rotary": 2, "head_tiles": 1},
                    "fused_lora": (14, 0)}
    fast_loss, fast_grads = loss_and_grads(model, batch, autocast)
    assert fast_grads.keys() == stock_grads.keys()
    assert all(g.dtype == torch.float32 for g in fast_grads.values())
    if dtype == torch.float32:
        assert abs(fast_loss - stock_loss) <= 1e-5 * abs(stock_loss)
        scale, rel = max(float(g.abs().max()) for g in stock_grads.values()), 1e-5
    else:
        assert abs(fast_loss - stock_loss) <= 1e-2 * abs(stock_loss)
        scale, rel = max(float(g.abs().max()) for g in stock_grads.values()), 5e-2
    for name, grad in stock_grads.items():
        assert float((fast_grads[name] - grad).abs().max()) <= rel * scale, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_trl_head_with_compiled_tiles_equals_its_eager_tiles(dtype):
    """TRL's chunked lm_head + loss (log-probs, entropy, top-1 and the hidden gradient), over
    several tiles and a vocabulary that is not a multiple of the tile: compiled = eager."""
    import trl.kernels.chunked_logprob as kernel

    from cpuft.fastpaths.compiled_elementwise import compile_head_tiles

    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(1000, 32, generator=generator) * 0.1).to(dtype)
    hidden = torch.randn(50, 32, generator=generator).requires_grad_(True)
    targets = torch.randint(0, 1000, (50,), generator=generator)
    targets[0] = int((hidden[0].detach().to(dtype) @ weight.t()).argmax())  # one top-1 hit for sure

    def head():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            log_probs, entropy, _, _, is_top1 = kernel.ChunkedLogProbFunction.apply(
                hidden, weight, None, targets, 1.0, 256, None, 1.0, ("log_probs", "entropy", "is_top1"))
        (grad,) = torch.autograd.grad((log_probs * 0.7 + entropy * 0.3).sum(), hidden)
        return log_probs.detach(), entropy.detach(), is_top1, grad

    want = head()
    assert compile_head_tiles()
    assert getattr(kernel._forward_tile, "cpuft_compiled", False)
    got = head()
    assert bool(want[2][0]) and torch.equal(got[2], want[2])
    for a, b in (got[0], want[0]), (got[1], want[1]), (got[3], want[3]):
        assert float((a - b).abs().max()) <= 1e-5 * max(1.0, float(b.abs().max()))


def test_the_rotary_swap_is_local_to_the_patched_model():
    """The compiled rotary runs inside the patched attention's forward only; the modeling module's
    own function is back in place outside it, so another model in the process is untouched."""
    import transformers.models.qwen2.modeling_qwen2 as qwen2

    from cpuft.fastpaths.compiled_elementwise import compile_elementwise, rotary

    original = qwen2.apply_rotary_pos_emb
    model = tiny_lora_model("qwen2")
    seen = []
    attention = model.get_base_model().model.layers[0].self_attn
    assert compile_elementwise(model)["rotary"] == 2
    inner = attention.q_proj.forward

    def spy(x, *args, **kwargs):
        seen.append(qwen2.apply_rotary_pos_emb)
        return inner(x, *args, **kwargs)

    attention.q_proj.forward = spy
    model(**_batch())
    assert seen == [rotary]
    assert qwen2.apply_rotary_pos_emb is original


def test_the_swaps_survive_train_and_eval_switches(tmp_path):
    """A model loaded by from_pretrained has transformers' hub kernels on, and each switch between
    train and eval mode kernelizes it again: the compiled norm and MLP must still be in place after
    the Trainer's model.train() (and an evaluation's eval() and back)."""
    from transformers import AutoModelForCausalLM

    from cpuft.fastpaths.compiled_elementwise import compile_elementwise

    pytest.importorskip("kernels")
    tiny_lora_model("qwen2").get_base_model().save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    if not model.use_kernels:  # transformers 5.25 loads with kernels on; forced should a release change that
        model.set_use_kernels(True)
    assert model.use_kernels
    counts = compile_elementwise(model)
    assert counts["rms_norm"] == 5 and counts["mlp"] == 2
    for mode in (True, False, True):
        model.train(mode)
        norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
        mlps = [layer.mlp for layer in model.model.layers]
        assert all(getattr(m.forward, "__func__", None) is not None and m.forward.__func__.__name__ == "_norm_forward"
                   for m in norms), mode
        assert all(m.forward.__func__.__name__ == "_mlp_forward" for m in mlps), mode


def test_modules_computing_something_else_keep_their_forward():
    """Gemma's RMSNorm scales by 1 + weight and its MLP uses GELU: the check at swap time refuses both."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from cpuft.fastpaths.compiled_elementwise import compile_elementwise

    config = AutoConfig.for_model("gemma", vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # a non-trivial weight: Gemma's norm differs from Llama's only where weight != 0
        for module in model.modules():
            if type(module).__name__.endswith("RMSNorm"):
                module.weight.normal_()
    counts = compile_elementwise(model)
    assert counts["rms_norm"] == 0 and counts["mlp"] == 0


def test_the_plan_compiles_for_models_that_repay_it_and_says_why():
    from dataclasses import replace

    from cpuft.planning.plan import ELEMENTWISE_COMPILE_MIN_PARAMS, PlanRequest, plan_for
    from tests.test_plan import SAPPHIRE_RAPIDS

    small = plan_for(SAPPHIRE_RAPIDS, PlanRequest(device="cpu", model_params=4_000_000))
    assert not small.compiled_elementwise
    assert "4M-parameter" in small.reasons["compiled_elementwise"]
    big = plan_for(SAPPHIRE_RAPIDS, PlanRequest(device="cpu", model_params=494_000_000))
    assert big.compiled_elementwise and big.reasons["compiled_elementwise"].startswith("on:")
    assert big.short_row_attention and small.short_row_attention  # no warm-up: on for every CPU run
    whole = plan_for(SAPPHIRE_RAPIDS, PlanRequest(device="cpu", model_params=494_000_000, torch_compile=True))
    assert not whole.compiled_elementwise and "torch.compile" in whole.reasons["compiled_elementwise"]
    assert not whole.short_row_attention
    forced = plan_for(SAPPHIRE_RAPIDS, replace(PlanRequest(device="cpu", model_params=1_000_000), compiled_elementwise=True))
    assert forced.compiled_elementwise and forced.reasons["compiled_elementwise"] == "requested"
    assert ELEMENTWISE_COMPILE_MIN_PARAMS > 4_000_000
