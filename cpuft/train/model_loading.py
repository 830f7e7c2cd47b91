"""The base model and tokenizer for training, loaded the way the plan says.

Owns: the model path recorded in the adapter, the tokenizer policy (a chat template is required
for conversational data; pad falls back to EOS), loading the weights in the planned dtype,
attention and quantisation (bitsandbytes NF4/INT8), readying a quantised model for training, and
the QLoRA-on-CPU patch that keeps the adapter in fp32.

Limits: CUDA runs use device 0 only; quantisation needs bitsandbytes (its CPU backend on CPUs).
Raises UserError (exit 2) when the tokenizer or weights cannot be loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cpuft.dtypes import torch_dtype
from cpuft.errors import UserError
from cpuft.modeling import bitsandbytes_config


def resolve_model_path(model: str) -> str:
    """A local model directory as an absolute path (a hub id unchanged): adapter_config.json
    records it, and an absolute path keeps the adapter loadable from any working directory."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.is_dir() else model


def load_tokenizer(model: str, row_format: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model)
    except Exception as exc:
        raise UserError(f"cannot load the tokenizer of '{model}': {exc}") from None
    if row_format != "text" and not tokenizer.chat_template:
        raise UserError(
            f"the tokenizer of '{model}' has no chat template, so conversational"
            f" data ({row_format}) cannot be formatted. Use an instruct/chat model,"
            " or plain text data with --dataset-format text."
        )
    if tokenizer.pad_token is None:
        # Padding is masked out of the loss and attention; reusing EOS is the common choice.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model: str, plan, model_config):
    """The base model in the plan's weights dtype, attention kernel and quantisation, on its device;
    `model_config` (its PretrainedConfig) picks the Auto class: seq2seq for T5/mT5, causal otherwise."""
    from cpuft.planning.architecture import auto_model_class

    kwargs: dict[str, Any] = {
        "dtype": torch_dtype(plan.weights_dtype),
        "attn_implementation": plan.attn_implementation,
    }
    if plan.quantization != "none":
        kwargs["quantization_config"] = bitsandbytes_config(plan.quantization, plan.compute_dtype)
        kwargs["device_map"] = {"": 0} if plan.device == "cuda" else {"": "cpu"}
    try:
        loaded = auto_model_class(model_config).from_pretrained(model, **kwargs)
    except Exception as exc:
        raise UserError(f"cannot load model weights of '{model}': {exc}") from None
    if plan.device == "cuda" and plan.quantization == "none":
        loaded = loaded.to("cuda")
    return loaded


def prepare_quantized_for_training(model, plan):
    """A quantised model readied for adapter training; other models unchanged.

    TRL 1.16's SFTTrainer does not call this for quantised models (it only casts the adapter to
    bf16): freeze the base, upcast norms/embeddings to fp32 for stable training, and make
    checkpointing work through the frozen 4/8-bit layers.
    """
    if plan.quantization == "none":
        return model
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=plan.gradient_checkpointing)


def keep_cpu_adapter_in_fp32(trainer, plan) -> None:
    """Undo TRL's bf16 cast of a quantised model's adapter when the run is on a CPU.

    On a CPU keep the adapter, its gradients and AdamW state in fp32: with fp32 compute (AVX2,
    where bf16 is emulated) bf16 would only be slower; with bf16 compute autocast still runs its
    matmuls in bf16, and the fp32 master copy (a few MB) keeps small updates from rounding away.
    """
    if plan.quantization == "none" or plan.device != "cpu":
        return
    for param in trainer.model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
