"""Attention for short rows on CPU: grouped batched GEMMs where SDPA's CPU kernel is slow.

PyTorch's CPU flash-attention kernel (what `attn_implementation="sdpa"` runs) works in blocks
sized for long sequences; on short rows its backward dominates: at Qwen2.5-0.5B's heads (14
query, 2 key/value, head_dim 64), bf16, forward + backward on a 2-core EPYC, 16 x 64 tokens
took 100 ms against 31 ms as plain batched GEMMs, 8 x 128 70 against 30, 4 x 256 83 against
66, while from 384 tokens the GEMMs lose (168 against 224 ms): docs/speed.md.

`use_short_row_attention(model)` registers `cpuft_sdpa` with transformers' attention and mask
interfaces and points the model's config at it. Rows of at most SHORT_ROW_MAX_TOKENS tokens run
transformers' eager attention (scores by GEMM in the compute dtype, softmax in fp32, then the
GEMM with the values) with one change: the query heads that share a key/value head are stacked
along the sequence, so keys and values are never repeated (`repeat_kv` copies them 7 times at
Qwen's 14/2 heads). Everything else (longer rows, dropout, sliding windows, float masks, a KV
cache of another length) goes to transformers' own SDPA function unchanged, and masks are built
by its SDPA mask function: the same masks, the same skipping of an all-causal mask.

The same function: tests/test_short_attention.py (loss and LoRA gradients equal SDPA's on padded
batches, fp32 and bf16).
"""

from __future__ import annotations

import torch

NAME = "cpuft_sdpa"
# Measured crossover (see the module docstring): batched GEMMs win up to 256 tokens a row.
SHORT_ROW_MAX_TOKENS = 256


def grouped_causal_attention(query, key, value, keep_mask, scaling: float):
    """softmax(q k^T * scaling, masked) v for query [B, H, T, D] and key/value [B, KV, T, D],
    H a multiple of KV; `keep_mask` a bool [B, 1, T, T] (True: attend) or None for plain causal.
    Returns [B, T, H, D], as transformers' attention functions do."""
    batch, heads, tokens, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    stacked = query.reshape(batch * kv_heads, groups * tokens, dim)
    scores = torch.bmm(stacked, key.reshape(batch * kv_heads, tokens, dim).transpose(1, 2))
    scores = scores.view(batch, kv_heads, groups, tokens, tokens)
    attends_somewhere = None
    if keep_mask is None:
        keep_mask = torch.ones(tokens, tokens, dtype=torch.bool, device=query.device).tril()
    else:
        keep_mask = keep_mask.unsqueeze(2)  # [B, 1, 1, T, T]: the same for every head
        attends_somewhere = keep_mask.any(-1, keepdim=True)  # False on a left pad's first rows
    # The dtype's lowest value rather than -inf: a fully masked row gives finite weights, and its
    # output is then zeroed, as SDPA's CPU kernel returns zeros for it.
    scores = scores.mul(scaling).masked_fill(~keep_mask, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.bmm(weights.view(batch * kv_heads, groups * tokens, tokens),
                    value.reshape(batch * kv_heads, tokens, dim)).view(batch, kv_heads, groups, tokens, dim)
    if attends_somewhere is not None:
        out = out * attends_somewhere
    return out.reshape(batch, heads, tokens, dim).transpose(1, 2)


def _is_short_causal_self_attention(module, query, key, attention_mask, dropout, scaling, is_causal, kwargs) -> bool:
    tokens = query.shape[2]
    return (
        tokens <= SHORT_ROW_MAX_TOKENS and key.shape[2] == tokens and tokens > 1
        and not dropout and scaling is not None and is_causal is not False
        and getattr(module, "is_causal", True)
        and kwargs.get("sliding_window") is None and kwargs.get("softcap") is None
        and kwargs.get("position_bias") is None and not kwargs.get("output_attentions", False)
        and query.shape[1] % key.shape[1] == 0
        and (attention_mask is None or (attention_mask.dtype == torch.bool and attention_mask.dim() == 4
                                        and attention_mask.shape[1] == 1
                                        and tuple(attention_mask.shape[-2:]) == (tokens, tokens)))
    )


def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                      is_causal=None, **kwargs):
    """transformers' attention-function signature: grouped GEMMs for short causal rows, SDPA otherwise."""
    if _is_short_causal_self_attention(module, query, key, attention_mask, dropout, scaling, is_causal, kwargs):
        return grouped_causal_attention(query, key, value, attention_mask, scaling), None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def use_short_row_attention(model) -> bool:
    """Point `model` (and its sub-configs) from "sdpa" to `cpuft_sdpa`; False, changing nothing,
    when the model does not run SDPA."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    configs = [base.config] + [getattr(base.config, name) for name in getattr(base.config, "sub_configs", {})
                               if getattr(base.config, name, None) is not None]
    if not configs or any(getattr(c, "_attn_implementation", None) not in ("sdpa", NAME) for c in configs):
        return False
    AttentionInterface.register(NAME, attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    for config in configs:
        config._attn_implementation = NAME
    return True
