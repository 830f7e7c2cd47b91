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

Proof: tests/test_chunked_loss.py (the loss and the LoRA gradients equal the plain path's, HF's
own full-logits cross-entropy, within 1e-5 in fp32).

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
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.utils import FusedCausalLMOutput

    from cpuft.hardware.tiles import lm_head_vocab_chunk

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
        labelled = hidden_states[mask]
        log_probs, entropy, _, _, is_top1 = ChunkedLogProbFunction.apply(
            labelled, lm_head.weight, lm_head.bias, targets[mask], 1.0, lm_head_vocab_chunk(labelled.shape[0]),
            None, 1.0, TRAINER_OUTPUTS,
        )
        # masked_scatter keeps a micro-batch without labels connected to the graph (a zero loss).
        log_probs, entropy, is_top1 = (x.new_zeros(mask.shape).masked_scatter(mask, x)
                                       for x in (log_probs, entropy, is_top1))
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-log_probs.sum() / count, log_probs=log_probs, entropy=entropy,
                                   is_top1=is_top1, label_mask=mask)

    model.forward = types.MethodType(forward, model)
