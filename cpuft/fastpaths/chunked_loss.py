"""lm_head + loss on CPU: only at positions that carry a label, in tiles that stay in the heap.

TRL 1.16's SFTTrainer already never builds the full [batch, seq, vocab] logits: it patches the
base model's forward (`trl.trainer.utils.add_fused_lm_head`) so that `fused_lm_head=True` runs
the decoder and then TRL's chunked log-prob kernel (`trl.kernels.ChunkedLogProbFunction`, which
recomputes each tile in backward). Off CUDA it scores *every* position, padding and prompt
included (so the tile shapes stay fixed for compilers), in [tokens, 32768] tiles; on a CPU those
tiles and their temporaries (256 MiB each at 2,048 tokens) are mmapped and faulted in again
every step (cpuft.hardware.tiles). `use_cpu_lm_head` re-patches that forward to run the same
kernel on the labelled positions only, in tiles of `cpuft.hardware.tiles.lm_head_vocab_chunk`
columns, and to return the same `FusedCausalLMOutput` (log-probs, entropy and top-1 for TRL's
logs, label mask), so SFTTrainer.compute_loss, its metrics and its token count are TRL's own.
Its backward is cpuft's (`_compact_head_function`): TRL's, off CUDA, casts the lm_head weight and
every tile to fp32 for the hidden-state gradient's GEMM; cpuft's keeps them in the compute dtype
and sums over the whole vocabulary in one GEMM, which accumulates in fp32.

Proof: tests/test_chunked_loss.py (the loss and the LoRA gradients equal the plain path's, HF's
own full-logits cross-entropy, within 1e-5 in fp32; the backward in row blocks against autograd
over the full logits, fp32 and bf16).

Limits: causal LMs whose logits are the plain lm_head product (no soft-capping, logit scaling
or MoE router loss) and eager execution; anything else keeps TRL's forward (`use_cpu_lm_head`
returns False and says why).
"""

from __future__ import annotations

import functools
import types

# Config fields that change the logits after the lm_head matmul; TRL's forward handles them.
LOGIT_TRANSFORM_FIELDS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                          "logits_scaling")
# The compact head's backward recomputes the logits of a block of rows into one buffer of this
# size at most (256 MiB: 883 rows at Qwen2.5's 151,936-token vocabulary in bf16), so that their
# gradient meets the weight in one GEMM; allocated once per backward, not per tile. The memory
# plan counts far more for the logits (cpuft.planning.memory.activation_bytes).
HEAD_BACKWARD_BUFFER_BYTES = 256 * 2**20
HEAD_BACKWARD_MIN_ROWS = 64
# What SFTTrainer.compute_loss reads: log-probs for the loss, entropy and top-1 for its logs.
TRAINER_OUTPUTS = ("log_probs", "entropy", "is_top1")


def why_not_cpu_lm_head(model) -> str | None:
    """Why the compact head cannot replace TRL's on `model` (a PreTrainedModel); None if it can."""
    config = model.config
    text_config = config.get_text_config()
    if text_config is not config:
        return "a multimodal model: its backbone is not the text decoder alone"
    for name in LOGIT_TRANSFORM_FIELDS:
        if getattr(text_config, name, None) not in (None, 1.0):
            return f"the model transforms its logits ({name})"
    if getattr(text_config, "output_router_logits", False):
        return "a mixture-of-experts model with a router loss"
    if getattr(config, "is_encoder_decoder", False):
        return "an encoder-decoder model"
    return None


def use_cpu_lm_head(trainer) -> bool:
    """Give `trainer`'s model (an SFTTrainer's, PEFT-wrapped or not) the compact CPU head.
    Returns False, changing nothing, where it does not apply (`why_not_cpu_lm_head`)."""
    model = trainer.model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if why_not_cpu_lm_head(base) is not None:
        return False
    patch_compact_head(base)
    return True


def patch_compact_head(model) -> None:
    """Make `model(..., labels=..., fused_lm_head=True)` score only labelled positions in CPU
    tiles; without `fused_lm_head` the model's own forward runs (generation, evaluation)."""
    from trl.trainer.utils import FusedCausalLMOutput

    original_forward = type(model).forward

    @functools.wraps(original_forward)
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                **kwargs):
        if not fused_lm_head:
            extra = {k: v for k, v in (("labels", labels), ("shift_labels", shift_labels),
                                       ("num_items_in_batch", num_items_in_batch)) if v is not None}
            return original_forward(self, *args, **kwargs, **extra)
        kwargs["use_cache"] = False
        hidden_states = self.base_model(*args, **kwargs).last_hidden_state
        if shift_labels is None:  # position t predicts token t + 1
            hidden_states, targets = hidden_states[:, :-1], labels[:, 1:]
        else:  # already shifted (context or sequence parallelism)
            targets = shift_labels
        mask = targets != -100
        lm_head = self.get_output_embeddings()
        log_probs, entropy, is_top1 = head_log_probs(hidden_states[mask], lm_head.weight, lm_head.bias, targets[mask])
        # masked_scatter keeps a micro-batch without labels connected to the graph (a zero loss).
        log_probs, entropy, is_top1 = (x.new_zeros(mask.shape).masked_scatter(mask, x)
                                       for x in (log_probs, entropy, is_top1))
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-log_probs.sum() / count, log_probs=log_probs, entropy=entropy,
                                   is_top1=is_top1, label_mask=mask)

    model.forward = types.MethodType(forward, model)


def head_log_probs(hidden, weight, bias, targets):
    """(log-probabilities of `targets`, entropy, top-1) under `hidden @ weight.T (+ bias)`, in
    heap-sized tiles (`lm_head_vocab_chunk`), with the CPU backward of `_compact_head_function`."""
    from cpuft.hardware.tiles import lm_head_vocab_chunk

    log_probs, entropy, _, _, is_top1 = _compact_head_function().apply(
        hidden, weight, bias, targets, 1.0, lm_head_vocab_chunk(hidden.shape[0]), None, 1.0, TRAINER_OUTPUTS,
    )
    return log_probs, entropy, is_top1


@functools.cache
def _compact_head_function():
    """TRL's ChunkedLogProbFunction (its forward, its tile folds) with a backward for CPUs.

    TRL's backward adds each vocabulary tile's `grad_tile @ weight_tile` into an fp32 sum; off
    CUDA (no `out_dtype=float32` matmul) it casts both to fp32 first, so in a bf16 run each step
    casts the whole lm_head weight to fp32 and runs the gradient GEMM in fp32 (2x slower than bf16
    on AVX-512-BF16, ~8x on AMX). This backward recomputes the tiles into one [rows, vocab] buffer
    per block of rows and takes the hidden-state gradient as one GEMM over the whole vocabulary:
    oneDNN's bf16 GEMM accumulates in fp32 and rounds once, as TRL's fp32 sum does when it casts
    the result to the hidden states' dtype, so it is the same function (tests/test_chunked_loss.py).
    A trainable lm_head (its weight or bias needs a gradient) takes TRL's backward."""
    from trl.kernels import ChunkedLogProbFunction
    from trl.kernels import chunked_logprob as kernel

    class CompactHeadLogProbFunction(ChunkedLogProbFunction):
        @staticmethod
        def backward(ctx, grad_logprobs, grad_entropy, *rest):
            import torch

            if ctx.needs_input_grad[1] or ctx.needs_input_grad[2] or not ctx.needs_input_grad[0]:
                return ChunkedLogProbFunction.backward(ctx, grad_logprobs, grad_entropy, *rest)
            hidden, weight, bias, targets, log_z, entropy = ctx.saved_tensors
            dtype, chunk = ctx.compute_dtype, ctx.chunk_size
            rows, vocab = hidden.shape[0], weight.shape[0]
            grad_logprobs = grad_logprobs.float().contiguous() if grad_logprobs is not None else None
            grad_entropy = grad_entropy.float().contiguous() if grad_entropy is not None else None
            weight = weight.to(dtype)
            grad_hidden = torch.empty(hidden.shape, dtype=dtype)
            block = head_backward_rows(rows, vocab, dtype.itemsize)
            buffer = torch.empty((block, vocab), dtype=dtype)
            for first in range(0, rows, block):
                last = min(first + block, rows)
                hidden_block, logits = hidden[first:last].to(dtype), buffer[: last - first]
                for start in range(0, vocab, chunk):
                    end = min(start + chunk, vocab)
                    tile = logits[:, start:end]  # strided rows: matmul and the fold write in place
                    torch.mm(hidden_block, weight[start:end].t(), out=tile)
                    if bias is not None:
                        tile.add_(bias[start:end].to(dtype))
                    kernel._backward_tile(
                        tile, tile.stride(0), targets[first:last], log_z[first:last], entropy[first:last],
                        grad_logprobs[first:last] if grad_logprobs is not None else log_z,
                        grad_entropy[first:last] if grad_entropy is not None else log_z,
                        start, end - start, HAS_LOGPROB_GRAD=grad_logprobs is not None,
                        HAS_ENTROPY_GRAD=grad_entropy is not None, BLOCK_SIZE=kernel._BLOCK_SIZE, **ctx.kernel_args,
                    )
                torch.mm(logits, weight, out=grad_hidden[first:last])
            return (grad_hidden.to(hidden.dtype),) + (None,) * 8

    return CompactHeadLogProbFunction


def head_backward_rows(rows: int, vocab: int, itemsize: int) -> int:
    """Rows per block of the compact head's backward for `rows` in all: as few blocks as keep the
    [block, vocab] gradient buffer within HEAD_BACKWARD_BUFFER_BYTES (each block reads the whole
    lm_head weight twice), of equal size (a short last block runs a slow GEMM), and at least
    HEAD_BACKWARD_MIN_ROWS rows each."""
    most = max(HEAD_BACKWARD_MIN_ROWS, HEAD_BACKWARD_BUFFER_BYTES // (vocab * itemsize))
    blocks = max(1, -(-rows // most))
    return max(1, -(-rows // blocks))
