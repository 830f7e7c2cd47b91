"""How cpuft asks transformers for a model: which version and whether its own code may run
(`pretrained_kwargs`, for every from_pretrained of config, tokenizer and weights), the config read
that sizes a plan before any weights load, and the bitsandbytes configs for quantised base
weights. Shared by training and inference, so a base is loaded the same way when it is trained
and when it is served.

bitsandbytes: importing it (PEFT's and transformers' imports do, whenever it is installed) makes
its x86 backend ask the Hub for an optional kernel and print about it, although nothing is
quantised. `defer_bitsandbytes` keeps it out of the process (as if not installed) until a
quantised path is planned; `bitsandbytes_config` and the other quantised paths then import it
through `import_bitsandbytes`, with its loaders' notices silenced.

Remote code: a model repository whose config.json has an `auto_map` ships Python classes that
transformers imports (and so runs) only with trust_remote_code. cpuft passes it as False unless
the user asks (`--trust-remote-code`), never None: None makes transformers ask on stdin and wait.
With it on, one warning line per model says that the code will run here. A model that needs it
without it is a UserError naming the flag (`loading_error`).
"""

from __future__ import annotations

import sys
from typing import Any

from cpuft.dtypes import torch_dtype
from cpuft.errors import UserError, first_line

TRUST_REMOTE_CODE_FLAG = "--trust-remote-code"
_warned_remote_code: set[str] = set()


def pretrained_kwargs(model: str, revision: str | None = None, trust_remote_code: bool = False) -> dict[str, Any]:
    """from_pretrained keyword arguments for `model` at `revision` (None: the default branch)."""
    if trust_remote_code and model not in _warned_remote_code:
        _warned_remote_code.add(model)
        print(f"cpuft: warning: {TRUST_REMOTE_CODE_FLAG}: Python code from the repository of '{model}' will run"
              " on this machine.", file=sys.stderr, flush=True)
    kwargs: dict[str, Any] = {"trust_remote_code": bool(trust_remote_code)}
    if revision is not None:
        kwargs["revision"] = revision
    return kwargs


def needs_remote_code(exc: BaseException) -> bool:
    """transformers' refusal of a model whose code it may not run (a ValueError naming the flag)."""
    return isinstance(exc, ValueError) and "trust_remote_code" in str(exc)


def loading_error(model: str, exc: BaseException, message: str) -> UserError:
    """The UserError for a failed from_pretrained of `model`: `message`, or the remote-code refusal
    naming the flag when that is why it failed."""
    if needs_remote_code(exc):
        return UserError(
            f"'{model}' needs its own Python code to load (its config.json maps the model to classes in"
            f" the repository), and transformers runs that only when allowed. If you trust that code,"
            f" pass {TRUST_REMOTE_CODE_FLAG} (trust_remote_code: true); it will run on this machine."
        )
    return UserError(message)


def read_model_config(model: str, revision: str | None = None, trust_remote_code: bool = False):
    """The model's config.json only (no weights): enough to size the plan and catch typos early."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model, **pretrained_kwargs(model, revision, trust_remote_code))
    except Exception as exc:  # OSError for missing files, ValueError for bad configs, hub errors
        raise loading_error(model, exc, (
            f"cannot load model config for '{model}': {first_line(exc)}. Pass --model a local model"
            " directory (config.json + weights + tokenizer) or a Hub id you can reach (with"
            " --revision, one of its branches, tags or commits); offline, `cpuft tiny-model --out"
            " models/tiny` builds a small model to try cpuft with."
        )) from None


# Loggers of bitsandbytes' optional Hub kernel: it falls back to its own kernel, nothing to act on.
BITSANDBYTES_NOISE_LOGGERS = ("bitsandbytes.backends.cpu.ops", "kernels")


def defer_bitsandbytes() -> None:
    """Hide bitsandbytes from the libraries' imports and availability checks (importlib's
    find_spec answers None for a module set to None in sys.modules) until `import_bitsandbytes`."""
    if "bitsandbytes" not in sys.modules:
        sys.modules["bitsandbytes"] = None  # type: ignore[assignment]


def import_bitsandbytes():
    """bitsandbytes for a quantised path: lifts `defer_bitsandbytes`, silences its Hub-kernel
    notices, and clears PEFT's cached availability answers. The module; ImportError if absent."""
    import importlib
    import logging

    if "bitsandbytes" in sys.modules and sys.modules["bitsandbytes"] is None:
        del sys.modules["bitsandbytes"]
    for name in BITSANDBYTES_NOISE_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    module = importlib.import_module("bitsandbytes")
    peft_import_utils = sys.modules.get("peft.import_utils")
    for check in ("is_bnb_4bit_available", "is_bnb_available"):
        cache_clear = getattr(getattr(peft_import_utils, check, None), "cache_clear", None)
        if cache_clear is not None:
            cache_clear()
    peft_helpers = sys.modules.get("peft.helpers")
    if peft_helpers is not None and getattr(peft_helpers, "bnb", None) is None:
        peft_helpers.bnb = module  # imported while bitsandbytes was deferred
    return module


def bitsandbytes_config(quantization: str, compute_dtype: str):
    """bitsandbytes config: NF4 + double quantisation (QLoRA) computing in `compute_dtype`, or LLM.int8."""
    from transformers import BitsAndBytesConfig

    import_bitsandbytes()
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
