"""The dtype vocabulary: cpuft's short names, their sizes, and the torch dtype each stands for.

Every module that turns "bf16" into bytes or into a torch dtype asks here, so the names mean the
same thing in the plan, the memory estimate, the GEMM timer and the model loaders.
"""

from __future__ import annotations

DTYPE_NAMES = ("fp32", "bf16", "fp16")
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
_TORCH_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def torch_dtype(name: str):
    """The torch dtype for a cpuft dtype name ("fp32", "bf16", "fp16")."""
    import torch

    try:
        return getattr(torch, _TORCH_NAMES[name])
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}: choose {', '.join(DTYPE_NAMES)}") from None
