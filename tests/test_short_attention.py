"""Short-row attention (cpuft.fastpaths.short_attention) computes what transformers' SDPA computes.

Yardstick: the same model with attn_implementation "sdpa" (PyTorch's own kernel). Padded and
unpadded batches, rows on both sides of SHORT_ROW_MAX_TOKENS, a GQA model (4 query heads, 2
key/value heads). Tolerances follow the dtype: fp32 within 1e-5 of the largest magnitude, bf16
(autocast, bf16 weights) 1 % for the loss and 5 % of the largest LoRA gradient.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from tests.lora_models import loss_and_grads, tiny_lora_model  # noqa: E402


def _batch(rows: int, tokens: int, padded: bool):
    ids = torch.randint(0, 300, (rows, tokens), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, tokens // 2:] = 0  # right padding
        mask[-1, :3] = 0  # left padding: its first rows attend to nothing real
    return dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))


def _assert_equals_sdpa(model_type, dtype, rows: int, tokens: int, padded: bool, path: str, compiled: bool) -> list:
    """Train one batch with SDPA, then with cpuft_sdpa (`compiled`: the chunked path); assert the
    same loss and LoRA gradients, within the dtype's tolerance; the row lengths that `path` (a
    function of cpuft.fastpaths.short_attention) was called with."""
    from cpuft.fastpaths import short_attention

    model, batch, autocast = tiny_lora_model(model_type, dtype), _batch(rows, tokens, padded), dtype == torch.bfloat16
    want_loss, want = loss_and_grads(model, batch, autocast)
    calls = []
    original = getattr(short_attention, path)

    def counted(*args, **kwargs):
        calls.append(args[0].shape[2])
        return original(*args, **kwargs)

    setattr(short_attention, path, counted)
    try:
        assert short_attention.use_short_row_attention(model, compiled=compiled)
        got_loss, got = loss_and_grads(model, batch, autocast)
    finally:
        setattr(short_attention, path, original)
    loss_tolerance, grad_tolerance = (1e-5, 1e-5) if dtype == torch.float32 else (1e-2, 5e-2)
    assert abs(got_loss - want_loss) <= loss_tolerance * abs(want_loss)
    scale = max(float(g.abs().max()) for g in want.values())
    for name, grad in want.items():
        assert float((got[name] - grad).abs().max()) <= grad_tolerance * scale, name
    return calls


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tokens,padded", [(40, True), (40, False), (300, True)], ids=["short-padded", "short", "long"])
def test_loss_and_lora_gradients_equal_sdpa(model_type, dtype, tokens, padded):
    from cpuft.fastpaths.short_attention import SHORT_ROW_MAX_TOKENS

    calls = _assert_equals_sdpa(model_type, dtype, 3, tokens, padded, "grouped_causal_attention", compiled=False)
    # Short rows ran the grouped GEMMs in both layers; long ones SDPA.
    assert calls == ([tokens, tokens] if tokens <= SHORT_ROW_MAX_TOKENS else [])


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tokens,padded", [(300, True), (131, False), (600, True)], ids=["3-chunks-padded", "2-chunks", "past-the-cap"])
def test_chunked_attention_with_the_compiled_softmax_equals_sdpa(model_type, dtype, tokens, padded):
    """Causal chunks of 128 queries (the last one shorter), left and right padding: the loss and
    LoRA gradients of SDPA; past CHUNKED_MAX_TOKENS SDPA itself runs."""
    from cpuft.fastpaths.compiled_elementwise import why_not_compiled
    from cpuft.fastpaths.short_attention import CHUNKED_MAX_TOKENS

    if why_not_compiled() is not None:
        pytest.skip(why_not_compiled())
    calls = _assert_equals_sdpa(model_type, dtype, 2, tokens, padded, "chunked_causal_attention", compiled=True)
    assert calls == ([tokens, tokens] if tokens <= CHUNKED_MAX_TOKENS else [])


def test_generation_after_the_switch_matches_sdpa():
    """Evaluation and generation (a KV cache: queries shorter than keys) still work, via SDPA."""
    from cpuft.fastpaths.short_attention import use_short_row_attention

    model = tiny_lora_model("llama", torch.float32).eval()
    prompt = torch.randint(0, 300, (1, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model.generate(input_ids=prompt, max_new_tokens=5, do_sample=False)
        assert use_short_row_attention(model)
        got = model.generate(input_ids=prompt, max_new_tokens=5, do_sample=False)
    assert torch.equal(got, want)


def test_a_model_without_sdpa_is_left_alone():
    from transformers import AutoConfig, AutoModelForCausalLM

    from cpuft.fastpaths.short_attention import use_short_row_attention

    config = AutoConfig.for_model("llama", vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    assert not use_short_row_attention(model)
    assert model.config._attn_implementation == "eager"
