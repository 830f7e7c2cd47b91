"""Tiny LoRA models and one training pass, shared by the tests of cpuft's fast paths
(test_fused_lora.py, test_compiled_elementwise.py, test_short_attention.py)."""

from __future__ import annotations

import contextlib

import torch


def tiny_lora_model(model_type: str = "llama", dtype=torch.float32, vocab: int = 300, tied: bool = False,
                    dropout: float = 0.0, use_dora: bool = False):
    """A 2-layer `model_type` (4 query heads, 2 key/value heads of 16) with LoRA r 8 on every linear
    layer, weights in `dtype`, the adapter in fp32 as cpuft's plan keeps it, B drawn at random (PEFT
    starts it at zero) so A's gradient is real; in training mode, SDPA attention."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, vocab_size=vocab, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  tie_word_embeddings=tied)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules="all-linear",
                                             task_type="CAUSAL_LM", use_dora=use_dora))
    for name, param in model.named_parameters():
        if param.requires_grad:
            param.data = param.data.float()
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    model.train()
    return model


def loss_and_grads(model, batch: dict, autocast: bool = False):
    """(loss, {name: gradient} of every trainable parameter) for one forward and backward, under
    bf16 autocast when `autocast`."""
    # Entered only when asked: a caller's own autocast region stays in force otherwise.
    with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
        loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return float(loss.detach()), grads
