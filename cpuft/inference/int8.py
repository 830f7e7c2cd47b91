"""INT8 weights for CPU inference, behind one function: `quantize_for_cpu_inference(model, method)`.

Methods (each is usable only where its package imports; `available_int8_methods()` says which):
- torchao-int8-weight-only  torchao `Int8WeightOnlyConfig`: int8 weights, activations stay in the
                            model dtype; the weight is dequantised inside the matmul. Halves to
                            quarters the bytes a decode step reads.
- torchao-int8-dynamic      torchao `Int8DynamicActivationInt8WeightConfig`: activations are
                            quantised per token at run time and the matmul runs in int8.
- torch-dynamic             `torch.ao.quantization.quantize_dynamic` (fbgemm int8 GEMM). Deprecated
                            upstream in favour of torchao, still shipped in torch 2.13.
- bnb-llm-int8              bitsandbytes LLM.int8 (int8 matmul with fp16 outlier columns, threshold 6).

`default_int8_method(machine)` picks the method that measured best for the machine's CPU kind
(`scripts/bench_int8.py`, numbers in docs/int8.md). Only AVX2 (AMD, no AVX-512, no AMX) has been
measured; the AVX-512 and AMX rows fall back to the AVX2 choice until someone measures them.

Limits: every nn.Linear is quantised, lm_head included (it is the largest matmul of a decode step
with a real vocabulary). A LoRA adapter must be merged first (`cpuft.inference.loading` does that): a
quantised base under an unmerged adapter runs the adapter in full precision on every token.
Quantisation is in place and one-way; the model is for inference only.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass

from cpuft.errors import UserError
from cpuft.hardware.probe import Machine


@dataclass(frozen=True)
class Int8Method:
    name: str
    package: str  # the import that must succeed
    install_hint: str
    summary: str


INT8_METHODS: dict[str, Int8Method] = {
    m.name: m
    for m in (
        Int8Method(
            "torchao-int8-weight-only", "torchao", "pip install 'cpuft[int8]'",
            "int8 weights, fp32/bf16 activations (weight-only)",
        ),
        Int8Method(
            "torchao-int8-dynamic", "torchao", "pip install 'cpuft[int8]'",
            "int8 weights and per-token dynamic int8 activations",
        ),
        Int8Method(
            "torch-dynamic", "torch", "(ships with torch)",
            "torch.ao dynamic quantisation, per-channel int8 weights, fbgemm int8 GEMM (deprecated upstream)",
        ),
        Int8Method(
            "bnb-llm-int8", "bitsandbytes", "pip install 'cpuft[quant]'",
            "bitsandbytes LLM.int8 with fp16 outliers",
        ),
    )
}

# Best measured method per CPU kind (scripts/bench_int8.py on a 128M-parameter Llama, docs/int8.md).
# "avx2" (2-core AMD, shared machine) and "avx512" (2-core AMD Zen 4 class with AVX-512 VNNI/BF16,
# quiet: torch-dynamic 3.4-4x fp32) were measured; the others repeat the choice until measured.
DEFAULT_INT8_BY_CPU_KIND = {
    "amx": "torch-dynamic",  # not measured
    "avx512": "torch-dynamic",  # measured
    "avx2": "torch-dynamic",  # measured
    "other": "torch-dynamic",  # not measured
}


def cpu_kind(machine: Machine) -> str:
    if machine.has("amx_int8") or machine.has("amx_bf16"):
        return "amx"
    if machine.has("avx512_f"):
        return "avx512"
    if machine.has("avx2"):
        return "avx2"
    return "other"


def default_int8_method(machine: Machine) -> str:
    """The method `--int8` uses when none is named: the measured best for this CPU kind."""
    preferred = DEFAULT_INT8_BY_CPU_KIND[cpu_kind(machine)]
    available = available_int8_methods()
    if available.get(preferred) is None:
        return preferred
    # Fall back to whatever imports, in the order of INT8_METHODS (torch-dynamic always does).
    return next(name for name, missing in available.items() if missing is None)


def available_int8_methods() -> dict[str, str | None]:
    """Method name -> None if usable here, else why not (and how to install it)."""
    result = {}
    for name, method in INT8_METHODS.items():
        if importlib.util.find_spec(method.package) is None:
            result[name] = f"needs {method.package}: {method.install_hint}"
        else:
            result[name] = None
    return result


def quantize_for_cpu_inference(model, method: str):
    """Quantise every nn.Linear of `model` to int8 in place with `method`; returns the model.

    Raises UserError for an unknown method or one whose package is not installed.
    """
    if method not in INT8_METHODS:
        raise UserError(f"unknown int8 method {method!r}; choose one of: {', '.join(INT8_METHODS)}.")
    missing = available_int8_methods()[method]
    if missing is not None:
        raise UserError(f"int8 method {method} is not available: it {missing}.")
    model.eval()
    if method == "torchao-int8-weight-only":
        from torchao.quantization import Int8WeightOnlyConfig

        _torchao_quantize(model, Int8WeightOnlyConfig())
    elif method == "torchao-int8-dynamic":
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig

        _torchao_quantize(model, Int8DynamicActivationInt8WeightConfig())
    elif method == "torch-dynamic":
        _torch_dynamic_quantize(model)
    elif method == "bnb-llm-int8":
        _bnb_llm_int8(model)
    return model


def import_torchao_quietly():
    """Import torchao without its import-time log lines: on a CPU build it reports every CUDA-only
    kernel library it cannot load, and torch's pytree logs a deprecation for torchao's enums."""
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        import torchao  # noqa: F401
        import torchao.quantization  # noqa: F401
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _torchao_quantize(model, config) -> None:
    import_torchao_quietly()
    from torchao.quantization import quantize_

    _untie_lm_head(model)
    quantize_(model, config)


def _torch_dynamic_quantize(model) -> None:
    import warnings

    import torch

    # The x86 engine (fbgemm + oneDNN) is the default on x86; say so rather than rely on it.
    if "x86" in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = "x86"
    _untie_lm_head(model)
    with warnings.catch_warnings():
        # torch.ao's deprecation notices (see module docstring); nothing a user can act on.
        warnings.filterwarnings("ignore", message=r".*deprecated.*")
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        # Per-channel weight scales: per-tensor (the default qconfig) agreed with fp32's top-1 on
        # 5 points fewer tokens in scripts/bench_int8.py, at a speed within run-to-run noise.
        quantized = quantize_dynamic(
            model, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True
        )
    assert quantized is model


def _bnb_llm_int8(model, threshold: float = 6.0) -> None:
    import bitsandbytes as bnb
    import torch

    _untie_lm_head(model)
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear:
                continue
            replacement = bnb.nn.Linear8bitLt(
                child.in_features, child.out_features, bias=child.bias is not None,
                has_fp16_weights=False, threshold=threshold, device="meta",
            )
            replacement.weight = bnb.nn.Int8Params(
                child.weight.data.detach().clone(), requires_grad=False, has_fp16_weights=False
            )
            if child.bias is not None:
                replacement.bias = torch.nn.Parameter(child.bias.data.detach().clone(), requires_grad=False)
            # Int8Params quantises when it is moved from CPU memory to a device: here, the CPU.
            setattr(parent, child_name, replacement.to("cpu"))


def _untie_lm_head(model) -> None:
    """With tied embeddings lm_head.weight *is* the embedding table; give lm_head its own copy so
    that quantising it leaves the (float) embedding lookup intact."""
    import torch

    lm_head = getattr(model, "lm_head", None)
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if lm_head is None or embeddings is None:
        return
    if lm_head.weight is embeddings.weight:
        lm_head.weight = torch.nn.Parameter(embeddings.weight.detach().clone(), requires_grad=False)
        if hasattr(model.config, "tie_word_embeddings"):
            model.config.tie_word_embeddings = False
