"""How cpuft asks transformers for a model: the config read that sizes a plan before any weights
load, and the bitsandbytes configs for quantised base weights. Shared by training and inference,
so a QLoRA base is quantised the same way when it is trained and when it is served.
"""

from __future__ import annotations

from cpuft.dtypes import torch_dtype
from cpuft.errors import UserError, first_line


def read_model_config(model: str):
    """The model's config.json only (no weights): enough to size the plan and catch typos early."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model)
    except Exception as exc:  # OSError for missing files, ValueError for bad configs, hub errors
        raise UserError(
            f"cannot load model config for '{model}': {first_line(exc)}. Pass --model a local model"
            " directory (config.json + weights + tokenizer) or a Hub id you can reach; offline,"
            " `cpuft tiny-model --out models/tiny` builds a small model to try cpuft with."
        ) from None


def bitsandbytes_config(quantization: str, compute_dtype: str):
    """bitsandbytes config: NF4 + double quantisation (QLoRA) computing in `compute_dtype`, or LLM.int8."""
    from transformers import BitsAndBytesConfig

    if quantization == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch_dtype(compute_dtype),
        )
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"no bitsandbytes config for quantization {quantization!r}")
