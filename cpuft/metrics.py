"""Throughput accounting: FLOPs per token, achieved FLOP/s, MFU, peak memory.

FLOPs per trained token with LoRA (matmul FLOPs only; embedding lookups are free):
- forward through every linear layer: 2 * N_linear
- backward, gradients w.r.t. activations: 2 * N_linear (needed to reach earlier layers)
- backward, gradients w.r.t. weights: only for the trainable LoRA matrices, 2 * N_lora
  (plus their own forward and activation-gradient 4 * N_lora)
- attention scores and mixing: 12 * layers * hidden * seq_len (forward + backward, the
  PaLM/nanoGPT convention, not halved for the causal mask)
Full fine-tuning would be 6 * N_linear + attention; LoRA saves a third of the matmul work.
"""

from __future__ import annotations

import resource
import sys


def linear_parameter_count(model) -> int:
    """Parameters that take part in matmuls: every nn.Linear weight (lm_head included).

    Call it on the base model before PEFT wraps it, or the LoRA matrices count twice.
    bitsandbytes' quantised layers subclass nn.Linear, so QLoRA models count the same.
    """
    import torch

    return sum(
        module.in_features * module.out_features
        for module in model.modules()
        if isinstance(module, torch.nn.Linear)
    )


def lora_flops_per_token(linear_params: int, trainable_params: int, num_layers: int, hidden_size: int, seq_len: float) -> float:
    attention = 12.0 * num_layers * hidden_size * seq_len
    return 4.0 * linear_params + 6.0 * trainable_params + attention


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)
