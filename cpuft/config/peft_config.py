"""The PEFT config of the chosen `peft_method`, passed through: which cpuft keys set which of its
fields, cpuft's deviations from PEFT's defaults, and its other fields as keys.

Every field of the method's PEFT config class (`PEFT_CONFIG_CLASSES`) is also a cpuft config key
and flag (`use_dora: true`, `--use-dora true`), typed by that class's annotations once
`peft_method` is known (`typed_peft_values`: the same name can have different types in two PEFT
configs) and validated by building the config (`validate_peft_config`), so a value PEFT would
refuse stops the job before anything is written or loaded.

Owns, each once:
- `PEFT_DEVIATIONS`: the fields cpuft sets (from lora_r, lora_alpha, lora_dropout,
  lora_target_modules, num_virtual_tokens, the model, the run's length) or fixes, and why; setting
  such a field itself is refused with the cpuft key to use. A table rather than a subclass (as
  cpuft.config.trl_config does for TRL) because the config class is chosen per method.
  `cpuft sft --help-peft METHOD` (cpuft.config.cli_args) lists it next to PEFT's defaults.
- `peft_config_kwargs`: the PEFT config's keyword arguments for a job (cpuft.train.peft_methods
  builds the config for the run).
- Which methods are LoRA-like (`LORA_LIKE`) and which learn prompts (`PROMPT_LEARNING`).

Limits: PEFT is imported on first use (seconds), not when cpuft starts. AdaLoRA's schedule is
validated against `max_steps` when it is set and against a placeholder length otherwise (the real
length needs the data).
"""

from __future__ import annotations

import math
from typing import Any

from cpuft.config.library_fields import (
    AT_RUN_TIME,
    Deviation,
    LibraryField,
    build_library_config,
    fields_of,
    library_value,
    refuse_if_set_by_cpuft,
)
from cpuft.config.sections import key_default
from cpuft.errors import UserError

# The PEFT config class of each `peft_method` (cpuft.config.choices.PeftMethod).
PEFT_CONFIG_CLASSES = {
    "lora": "LoraConfig",
    "loha": "LoHaConfig",
    "lokr": "LoKrConfig",
    "ia3": "IA3Config",
    "adalora": "AdaLoraConfig",
    "prompt_tuning": "PromptTuningConfig",
    "prefix_tuning": "PrefixTuningConfig",
    "p_tuning": "PromptEncoderConfig",
}
LORA_LIKE = ("lora", "loha", "lokr", "adalora")
# Prompt-learning methods add virtual tokens instead of adapting weights.
PROMPT_LEARNING = ("prompt_tuning", "prefix_tuning", "p_tuning")

PEFT_DEVIATIONS: dict[str, Deviation] = {
    # cpuft keys' defaults are cpuft.config.sections'
    "r": Deviation(key_default("lora_r"), "a common rank for instruction tuning on every linear layer; the adapter stays a few MB", "lora_r"),
    "lora_alpha": Deviation(key_default("lora_alpha"), "scale alpha / r = 2"),
    "alpha": Deviation(AT_RUN_TIME, "LoHa/LoKr's alpha is cpuft's lora_alpha", "lora_alpha", "lora_alpha"),
    "lora_dropout": Deviation(key_default("lora_dropout"), "a little regularisation for small data sets"),
    "target_modules": Deviation(
        key_default("lora_target_modules"), "every linear layer but the output head ('all-linear'; ia3: PEFT's per-architecture"
        " default)", "lora_target_modules",
    ),
    "feedforward_modules": Deviation(
        AT_RUN_TIME, "ia3 with explicit lora_target_modules scales their inputs, none as feed-forward", None,
        "[] with explicit lora_target_modules",
    ),
    "num_virtual_tokens": Deviation(key_default("num_virtual_tokens"), "PEFT has no default"),
    "target_r": Deviation(AT_RUN_TIME, "AdaLoRA prunes down to lora_r", "lora_r", "lora_r"),
    "init_r": Deviation(AT_RUN_TIME, "AdaLoRA starts from 1.5 x lora_r", "lora_r", "ceil(1.5 x lora_r)"),
    "total_step": Deviation(AT_RUN_TIME, "AdaLoRA lays its schedule over the run", "max_steps", "the run's steps"),
    "tinit": Deviation(AT_RUN_TIME, "AdaLoRA warm-up: the first 10 % of the run", None, "10 % of the run"),
    "tfinal": Deviation(AT_RUN_TIME, "AdaLoRA keeps the ranks fixed for the last 20 %", None, "20 % of the run"),
    "deltaT": Deviation(AT_RUN_TIME, "AdaLoRA reallocates every ~5 % of the run", None, "5 % of the run"),
    # CAUSAL_LM is the placeholder validation builds with; the run sets the model's own (peft_methods).
    "task_type": Deviation(
        "CAUSAL_LM", "the model's: SEQ_2_SEQ_LM for encoder-decoders (T5, mT5), CAUSAL_LM otherwise",
        "(fixed)", "from the model",
    ),
    "peft_type": Deviation(AT_RUN_TIME, "follows the method", "peft_method", "peft_method"),
    "base_model_name_or_path": Deviation(AT_RUN_TIME, "the model cpuft loads", "model", "model"),
    "revision": Deviation(
        AT_RUN_TIME, "the base model's revision, recorded so stock PEFT loads the same base", "revision", "revision"
    ),
    "inference_mode": Deviation(False, "cpuft trains the adapter", "(fixed)"),
    "auto_mapping": Deviation(None, "PEFT writes it when it saves", "(fixed)"),
    "peft_version": Deviation(None, "PEFT writes it when it saves", "(fixed)"),
}


# ----------------------------------------------------------------------------- the fields


def peft_config_class(method: str):
    import peft

    return getattr(peft, PEFT_CONFIG_CLASSES[method])


def peft_fields(method: str) -> dict[str, LibraryField]:
    return fields_of(peft_config_class(method))


def methods_with_field(name: str) -> list[str]:
    return [m for m in PEFT_CONFIG_CLASSES if name in peft_fields(m)]


def is_peft_field(name: str) -> bool:
    """A field of some method's PEFT config."""
    return bool(methods_with_field(name))


def peft_field_names() -> list[str]:
    """Every PEFT config's field names, once each (for nearest-name suggestions)."""
    return list(dict.fromkeys(name for method in PEFT_CONFIG_CLASSES for name in peft_fields(method)))


# ----------------------------------------------------------------------------- typing values


def refuse_peft_key_set_by_cpuft(name: str, where: str) -> None:
    """UserError when the PEFT field `name`, set at `where`, is one cpuft sets through another key
    or fixes (PEFT_DEVIATIONS); its value is typed once `peft_method` is known (typed_peft_values)."""
    refuse_if_set_by_cpuft(name, PEFT_DEVIATIONS.get(name), "the PEFT config", where)


def typed_peft_values(method: str, values: dict[str, Any], origins: dict[str, str]) -> dict[str, Any]:
    """PEFT pass-through values typed by `method`'s config class; UserError for a field it lacks."""
    fields = peft_fields(method)
    typed = {}
    for name, value in values.items():
        where = origins.get(name, f"'{name}'")
        if name not in fields:
            owners = ", ".join(PEFT_CONFIG_CLASSES[m] for m in methods_with_field(name))
            raise UserError(
                f"{where}: '{name}' is not a field of {PEFT_CONFIG_CLASSES[method]} (peft_method {method});"
                f" it belongs to {owners}. `cpuft sft --help-peft {method}` lists the fields."
            )
        typed[name] = fields[name].typed(value, where)
    return typed


# ----------------------------------------------------------------------------- building


def peft_config_kwargs(config, total_steps: int) -> tuple[dict[str, Any], dict[str, str]]:
    """Keyword arguments of the PEFT config of `config.peft_method`.

    Returns (kwargs, source): `source[field]` is the config key a field's value came from.
    `total_steps`: the run's optimizer steps (AdaLoRA's schedule).
    """
    method = config.peft_method
    spec = config.lora_target_modules
    targets = spec if spec == "all-linear" else [name.strip() for name in spec.split(",") if name.strip()]
    kwargs: dict[str, Any] = {"task_type": PEFT_DEVIATIONS["task_type"].value}
    source: dict[str, str] = {}

    def put(field: str, value: Any, key: str) -> None:
        kwargs[field], source[field] = value, key

    if method in ("lora", "adalora"):
        put("lora_alpha", config.lora_alpha, "lora_alpha")
        put("lora_dropout", config.lora_dropout, "lora_dropout")
    if method in ("lora", "loha", "lokr"):
        put("r", config.lora_r, "lora_r")
    if method in ("loha", "lokr"):  # no input dropout: their rank/module dropouts stay at PEFT's 0
        put("alpha", config.lora_alpha, "lora_alpha")
    if method in LORA_LIKE:
        put("target_modules", targets, "lora_target_modules")
    if method == "adalora":
        put("target_r", config.lora_r, "lora_r")
        put("init_r", math.ceil(1.5 * config.lora_r), "lora_r")
        put("total_step", total_steps, "max_steps")
        # Warm up for the first 10 % and freeze the ranks for the last 20 % of the run (AdaLoRA's
        # schedule), reallocating every ~5 % in between; too short a run gets no schedule.
        warmup, final = (total_steps // 10, total_steps // 5) if total_steps >= 20 else (0, 0)
        kwargs.update(tinit=warmup, tfinal=final, deltaT=max(1, total_steps // 20))
    if method == "ia3" and targets != "all-linear":
        put("target_modules", targets, "lora_target_modules")
        kwargs["feedforward_modules"] = []
    # ia3 with all-linear: PEFT's per-architecture default targets (keys, values, MLP down-projection)
    if method in PROMPT_LEARNING:
        put("num_virtual_tokens", config.num_virtual_tokens, "num_virtual_tokens")
    if config.revision is not None:
        put("revision", config.revision, "revision")
    fields = peft_fields(method)
    for name, value in config.peft_args.items():
        put(name, library_value(fields[name].hint, value), name)
    return kwargs, source


# Stands in for the run's length when AdaLoRA is validated before the data is read: long enough
# that any schedule (tinit, tfinal) a user sets fits; the run checks the real length again.
_PLACEHOLDER_STEPS = 1_000_000


def validate_peft_config(config, origins: dict[str, str]) -> None:
    """Build the PEFT config for `config` now, so PEFT's own checks run before anything is
    written or loaded (with task_type CAUSAL_LM; the run sets the model's)."""
    steps = config.max_steps if config.max_steps > 0 else _PLACEHOLDER_STEPS
    kwargs, source = peft_config_kwargs(config, steps)
    build_library_config(peft_config_class(config.peft_method), kwargs, source, origins)
