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

With the compiled kernels (`use_short_row_attention(model, compiled=True)`, the plan's
`compiled_elementwise`), rows of up to CHUNKED_MAX_TOKENS run the same GEMMs in causal chunks of
CHUNK_TOKENS queries, each against the keys up to its last query only (the upper triangle's
blocks are never computed: 2/3 of the work at 384 tokens), and the scale, mask and softmax as one
compiled pass each way. Forward + backward at Qwen2.5-0.5B's heads, bf16, 2-core EPYC (SDPA /
chunked): 4 x 256 25.8 / 15.0 ms, 4 x 384 66 / 33, 4 x 512 86 / 50, 4 x 1,024 291 / 209. Memory
caps the length (CHUNKED_MAX_TOKENS): unlike SDPA's kernel, autograd keeps each chunk's scores
and softmax weights.

The same function: tests/test_short_attention.py (loss and LoRA gradients equal SDPA's on padded
batches, fp32 and bf16).
"""

from __future__ import annotations

import torch

NAME = "cpuft_sdpa"
# Measured crossover (see the module docstring): batched GEMMs win up to 256 tokens a row.
SHORT_ROW_MAX_TOKENS = 256
# With the compiled softmax: causal chunks of this many queries (128: fastest of 64-512 chunks at
# 512 and 1,024 tokens), up to this length. Autograd keeps 4 bytes per score of the chunks (the
# bf16 scores for the softmax's backward, the bf16 weights for the values' GEMM): at 4 x 512
# Qwen2.5-0.5B's peak RSS rose 4,627 -> 5,420 MiB for ~0.9 s of a ~15 s step, a trade that
# could push a larger model into gradient checkpointing; at 384 the kept scores are 60 % of 512's.
CHUNK_TOKENS = 128
CHUNKED_MAX_TOKENS = 384


def grouped_causal_attention(query, key, value, keep_mask, scaling: float):
    """softmax(q k^T * scaling, masked) v for query [B, H, T, D] and key/value [B, KV, T, D],
    H a multiple of KV; `keep_mask` a bool [B, 1, T, T] (True: attend) or None for plain causal.
    Returns [B, T, H, D], as transformers' attention functions do. The whole row is one chunk and
    the softmax runs eagerly (cpuft.fastpaths.compiled_elementwise's formula, uncompiled)."""
    from cpuft.fastpaths.compiled_elementwise import masked_softmax

    return _attention_in_chunks(query, key, value, keep_mask, scaling, query.shape[2], masked_softmax.eager)


def chunked_causal_attention(query, key, value, keep_mask, scaling: float, chunk: int = CHUNK_TOKENS):
    """grouped_causal_attention in causal chunks of `chunk` queries, each against the keys up to
    its last query, the softmax compiled (cpuft.fastpaths.compiled_elementwise.masked_softmax)."""
    from cpuft.fastpaths.compiled_elementwise import masked_softmax

    return _attention_in_chunks(query, key, value, keep_mask, scaling, chunk, masked_softmax)


def _attention_in_chunks(query, key, value, keep_mask, scaling: float, chunk: int, masked_softmax):
    """The query heads sharing a key/value head stacked along the sequence (keys and values never
    repeated), queries in causal chunks of `chunk`, each against the keys up to its last query;
    `masked_softmax(scores, keep_mask, scaling)` gives the weights."""
    batch, heads, tokens, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    grouped = query.reshape(batch, kv_heads, groups, tokens, dim)  # a view: only the head dim is split
    keys = key.reshape(batch * kv_heads, tokens, dim)
    values = value.reshape(batch * kv_heads, tokens, dim)
    if keep_mask is None:
        keep_mask = torch.ones(tokens, tokens, dtype=torch.bool, device=query.device).tril().expand(batch, 1, tokens, tokens)
        attends_somewhere = None
    else:
        attends_somewhere = keep_mask.any(-1, keepdim=True).unsqueeze(2)  # [B, 1, 1, T, 1]: False on a left pad's first rows
    outs = []
    for start in range(0, tokens, chunk):
        end = min(tokens, start + chunk)
        rows = end - start
        stacked = grouped[:, :, :, start:end].reshape(batch * kv_heads, groups * rows, dim)
        scores = torch.bmm(stacked, keys[:, :end].transpose(1, 2)).view(batch, kv_heads, groups, rows, end)
        # A contiguous [B, 1, 1, rows, end] mask whether or not there was padding: one layout, so the
        # compiled softmax is not recompiled per mask stride (dynamo's limit is 8 variants).
        chunk_mask = keep_mask[:, :, start:end, :end].contiguous().unsqueeze(2)
        weights = masked_softmax(scores, chunk_mask, scaling)
        outs.append(torch.bmm(weights.view(batch * kv_heads, groups * rows, end), values[:, :end])
                    .view(batch, kv_heads, groups, rows, dim))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=3)
    if attends_somewhere is not None:
        # A fully masked row got finite weights (the fp32 lowest value, not -inf); its output is
        # zeroed, as SDPA's CPU kernel returns zeros for it.
        out = out * attends_somewhere
    return out.reshape(batch, heads, tokens, dim).transpose(1, 2)


def _is_short_causal_self_attention(module, query, key, attention_mask, dropout, scaling, is_causal, kwargs,
                                    max_tokens: int) -> bool:
    tokens = query.shape[2]
    return (
        tokens <= max_tokens and key.shape[2] == tokens and tokens > 1
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
    """transformers' attention-function signature: grouped GEMMs for short causal rows (in causal
    chunks where the module runs the compiled softmax), SDPA otherwise."""
    chunked = getattr(module, "_cpuft_chunked_attention", False)
    max_tokens = CHUNKED_MAX_TOKENS if chunked else SHORT_ROW_MAX_TOKENS
    if _is_short_causal_self_attention(module, query, key, attention_mask, dropout, scaling, is_causal, kwargs,
                                       max_tokens):
        if chunked:
            return chunked_causal_attention(query, key, value, attention_mask, scaling), None
        return grouped_causal_attention(query, key, value, attention_mask, scaling), None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def use_short_row_attention(model, compiled: bool = False) -> bool:
    """Point `model` (and its sub-configs) from "sdpa" to `cpuft_sdpa`; False, changing nothing,
    when the model does not run SDPA. `compiled`: rows up to CHUNKED_MAX_TOKENS in causal chunks
    with the compiled softmax (needs cpuft.fastpaths.compiled_elementwise's C++ compiler)."""
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
    for module in base.modules():
        if hasattr(module, "q_proj") or hasattr(module, "is_causal"):
            module._cpuft_chunked_attention = compiled
    return True
