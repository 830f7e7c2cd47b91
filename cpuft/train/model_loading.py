"""The base model and tokenizer for training, loaded the way the plan says.

Owns: the model path recorded in the adapter, the tokenizer policy (pad falls back to EOS; a
tokenizer without a chat template gets cpuft's default one for conversational data, in the recipe:
cpuft.data.chat_template), the embedding resize for tokens that adds, loading the weights in the planned dtype,
attention and quantisation (bitsandbytes NF4/INT8), readying a quantised model for training, and
the QLoRA-on-CPU patch that keeps the adapter in fp32.

Limits: CUDA runs use device 0 only; quantisation needs bitsandbytes (its CPU backend on CPUs).
Raises UserError (exit 2) when the tokenizer or weights cannot be loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cpuft.dtypes import torch_dtype
from cpuft.modeling import bitsandbytes_config, loading_error, pretrained_kwargs


def resolve_model_path(model: str) -> str:
    """A local model directory as an absolute path (a hub id unchanged): adapter_config.json
    records it, and an absolute path keeps the adapter loadable from any working directory."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.is_dir() else model


def load_tokenizer(model: str, revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model, **pretrained_kwargs(model, revision, trust_remote_code))
    except Exception as exc:
        raise loading_error(model, exc, f"cannot load the tokenizer of '{model}': {exc}") from None
    if tokenizer.pad_token is None:
        # Padding is masked out of the loss and attention; reusing EOS is the common choice.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model: str, plan, model_config, revision: str | None = None, trust_remote_code: bool = False):
    """The base model in the plan's weights dtype, attention kernel and quantisation, on its device;
    `model_config` (its PretrainedConfig) picks the Auto class: seq2seq for T5/mT5, causal otherwise."""
    from cpuft.planning.architecture import auto_model_class

    kwargs: dict[str, Any] = {
        **pretrained_kwargs(model, revision, trust_remote_code),
        "dtype": torch_dtype(plan.weights_dtype),
        "attn_implementation": plan.attn_implementation,
    }
    if plan.quantization != "none":
        kwargs["quantization_config"] = bitsandbytes_config(plan.quantization, plan.compute_dtype)
        kwargs["device_map"] = {"": 0} if plan.device == "cuda" else {"": "cpu"}
    try:
        loaded = auto_model_class(model_config).from_pretrained(model, **kwargs)
    except Exception as exc:
        raise loading_error(model, exc, f"cannot load model weights of '{model}': {exc}") from None
    if plan.device == "cuda" and plan.quantization == "none":
        loaded = loaded.to("cuda")
    return loaded


def fit_model_to_tokenizer(model, tokenizer, seed: int) -> int | None:
    """Ready `model` for a tokenizer that gained tokens (cpuft.data.chat_template): grow the
    embedding (and an untied output head) to len(tokenizer) where the ids run past its rows, and
    make the tokenizer's EOS the model's (generation stops at the end of a reply). Returns the new
    row count, or None when the rows already cover every id (many checkpoints carry spare rows).

    Exactly len(tokenizer), no padding to a multiple: stock PEFT's AutoPeftModel resizes a base to
    len(tokenizer) before it loads the adapter, and the shapes must agree. transformers samples
    the new rows around the mean of the old ones; seeded, so a resumed run starts them alike.
    """
    import torch
    from transformers.utils import logging as hf_logging

    model.config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) <= rows:
        return None
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its note on how new rows are initialised: they are trained anyway
    try:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model.resize_token_embeddings(len(tokenizer))
    finally:
        hf_logging.set_verbosity(previous)
    return len(tokenizer)


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


def keep_adapter_dtype(trainer, plan) -> None:
    """Keep the trainable adapter in the plan's adapter dtype (cpuft.planning.plan.Plan.adapter_dtype:
    fp32 on a CPU), undoing TRL's bf16 cast of a quantised model's adapter. An unquantised base's
    adapter PEFT already creates in fp32 (its autocast_adapter_dtype), and its other trainable
    tensors (modules_to_save copies) stay in the base's dtype, so those are left alone."""
    if plan.quantization == "none" or plan.adapter_dtype is None:
        return
    from cpuft.dtypes import torch_dtype

    dtype = torch_dtype(plan.adapter_dtype)
    for param in trainer.model.parameters():
        if param.requires_grad and param.dtype != dtype:
            param.data = param.data.to(dtype)
