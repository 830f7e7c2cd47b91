"""FLOPs per trained token: the one formula behind the time plan, the run summary's MFU and the bench.

Matmul FLOPs only (embedding lookups are free), per trained token:
- forward through every linear layer (the output head included): 2 * N_linear
- backward, gradients w.r.t. activations: 2 * N_linear (needed to reach earlier layers)
- backward, gradients w.r.t. weights: 2 * N_linear for full fine-tuning; for PEFT only the
  adapter's, 6 * N_trainable with its own forward and activation gradients
- attention scores and mixing: 12 * layers * hidden * seq_len (forward + backward, the
  PaLM/nanoGPT convention, not halved for the causal mask)
- gradient checkpointing runs the forward once more. MFU counts useful work, so the summary
  leaves that out; the time plan counts it, since the machine has to do it.
"""

from __future__ import annotations


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


def training_flops_per_token(
    linear_matmul_params: int, trainable_params: int, num_layers: int, hidden_size: int,
    seq_len: float, full_finetune: bool, gradient_checkpointing: bool,
) -> float:
    """Matmul FLOPs per trained token (the nanoGPT/PaLM convention).

    Forward 2N; backward to activations 2N; backward to weights 2N for full fine-tuning, only the
    adapter's for PEFT; checkpointing runs the forward twice. Attention 12 * L * h * s.
    """
    forward = 2.0 * linear_matmul_params
    attention = 12.0 * num_layers * hidden_size * seq_len
    if full_finetune:
        flops = 3 * forward + attention
    else:
        flops = 2 * forward + 6.0 * trainable_params + attention
    if gradient_checkpointing:
        flops += forward + attention / 3
    return flops
