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

Activation dtype: each method says which model dtypes its int8 linear accepts as input
(`Int8Method.activation_dtypes`). torch-dynamic's quantised linear takes fp32 only (bf16 input
fails with "expected scalar type Float but found BFloat16"), so on CPUs where the plan picks bf16
(AMX, AVX-512-BF16) `int8_model_dtype` runs that method's model in fp32 and says so; the torchao
and bitsandbytes paths accept fp32, bf16 and fp16 and keep the planned dtype.

`default_int8_method(machine)` picks the method that measured best for the machine's CPU kind
(`scripts/bench_int8.py`, numbers in docs/int8.md): AVX2 and AVX-512 (VNNI) were measured
against fp32; on AMX only against fp32 with fp32 forced (no bf16 baseline yet), and "other"
repeats the choice unmeasured.

Limits: every nn.Linear is quantised, lm_head included (it is the largest matmul of a decode step
with a real vocabulary). A LoRA adapter must be merged first (`cpuft.inference.loading` does that): a
quantised base under an unmerged adapter runs the adapter in full precision on every token.
Quantisation is in place and one-way; the model is for inference only.
"""

from __future__ import annotations

import importlib.metadata
import logging
from dataclasses import dataclass

from cpuft.dtypes import DTYPE_NAMES
from cpuft.errors import UserError
from cpuft.hardware.probe import Machine


@dataclass(frozen=True)
class Int8Method:
    name: str
    package: str  # the import that must succeed
    install_hint: str
    summary: str
    # Model dtypes (cpuft names) whose activations the quantised linear accepts as input.
    activation_dtypes: tuple[str, ...] = DTYPE_NAMES


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
            # fbgemm's quantize-per-token step reads fp32 input only.
            activation_dtypes=("fp32",),
        ),
        Int8Method(
            "bnb-llm-int8", "bitsandbytes", "pip install 'cpuft[quant]'",
            "bitsandbytes LLM.int8 with fp16 outliers",
        ),
    )
}

# Best measured method per CPU kind (scripts/bench_int8.py on a 128M-parameter Llama, docs/int8.md).
# "avx2" (2-core AMD, shared machine) and "avx512" (2-core AMD Zen 4 class with AVX-512 VNNI/BF16,
# quiet: torch-dynamic 3.4-4x fp32) were measured; "amx" against fp32 only (2-core Xeon, one
# round: torch-dynamic 2.2x prefill, 2.4x decode; bf16 baseline owed); "other" is not measured.
DEFAULT_INT8_BY_CPU_KIND = {
    "amx": "torch-dynamic",
    "avx512": "torch-dynamic",
    "avx2": "torch-dynamic",
    "other": "torch-dynamic",
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


def int8_model_dtype(method: str, planned_dtype: str) -> tuple[str, str | None]:
    """The dtype to load and run the model in for `method`, given the dtype the plan chose, and
    why when the two differ (None when the planned dtype is kept)."""
    if method not in INT8_METHODS:
        raise UserError(f"unknown int8 method {method!r}; choose one of: {', '.join(INT8_METHODS)}.")
    accepted = INT8_METHODS[method].activation_dtypes
    if planned_dtype in accepted:
        return planned_dtype, None
    usable = available_int8_methods()
    keeps = [name for name, m in INT8_METHODS.items() if planned_dtype in m.activation_dtypes and usable[name] is None]
    alternative = f" (--int8-method {keeps[0]} keeps {planned_dtype})" if keeps else ""
    return accepted[0], (
        f"{method} runs in {accepted[0]}, not {planned_dtype}: its int8 linear layers take"
        f" {'/'.join(accepted)} activations only{alternative}."
    )


def available_int8_methods() -> dict[str, str | None]:
    """Method name -> None if usable here, else why not (and how to install it)."""
    result = {}
    for name, method in INT8_METHODS.items():
        if not _installed(method.package):
            result[name] = f"needs {method.package}: {method.install_hint}"
        else:
            result[name] = None
    return result


def _installed(distribution: str) -> bool:
    # Package metadata, not find_spec: cpuft.modeling.defer_bitsandbytes hides an installed
    # bitsandbytes from find_spec until a quantised path imports it.
    try:
        importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def quantize_for_cpu_inference(model, method: str):
    """Quantise every nn.Linear of `model` to int8 in place with `method`; returns the model.

    Raises UserError for an unknown method or one whose package is not installed.
    """
    if method not in INT8_METHODS:
        raise UserError(f"unknown int8 method {method!r}; choose one of: {', '.join(INT8_METHODS)}.")
    missing = available_int8_methods()[method]
    if missing is not None:
        raise UserError(f"int8 method {method} is not available: it {missing}.")
    dtype = _dtype_name(model)
    if dtype not in INT8_METHODS[method].activation_dtypes:
        # Caught here rather than as a dtype mismatch deep inside the first forward pass.
        raise ValueError(f"{method} needs a {'/'.join(INT8_METHODS[method].activation_dtypes)} model, got {dtype};"
                         " load it in the dtype int8_model_dtype() returns.")
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


def _dtype_name(model) -> str:
    from cpuft.dtypes import torch_dtype

    by_torch_dtype = {torch_dtype(name): name for name in DTYPE_NAMES}
    weight = next(model.parameters())
    return by_torch_dtype.get(weight.dtype, str(weight.dtype))


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
    import torch

    from cpuft.modeling import import_bitsandbytes

    bnb = import_bitsandbytes()
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
