"""The `cpuft sft` job config: one typed dataclass that is at once the YAML schema and the CLI.

Precedence: dataclass defaults < YAML file (`--config`) < command-line flags. Every field is a
YAML key `name` and a flag `--name` (underscores become dashes); `Literal[...]` fields list
their allowed values. Unknown YAML keys are rejected with the nearest valid name and the line.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from cpuft.config.choices import (
    DatasetFormat,
    DeviceRequest,
    DtypeRequest,
    OptimizerRequest,
    PeftMethod,
    QuantRequest,
)
from cpuft.errors import UserError

DEFAULT_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
DEFAULT_DATASET = "GAIR/lima"


def _help(text: str, **kwargs) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass
class SFTJobConfig:
    # What to train
    model: str = _help("base model: a local directory or a Hugging Face Hub id", default=DEFAULT_MODEL)
    dataset: str = _help(
        "training data: a Hub id (default GAIR/lima, gated: needs HF_TOKEN), a local"
        " .jsonl/.json/.parquet file, or 'sample' for the bundled LIMA-shaped sample",
        default=DEFAULT_DATASET,
    )
    dataset_format: DatasetFormat = _help(
        "row format; auto detects it from the first row's keys", default="auto"
    )
    dataset_split: str = _help("split to read from a Hub dataset", default="train")
    max_samples: int | None = _help("use only the first N rows, for quick experiments (default: all)", default=None)
    eval_fraction: float = _help("fraction of rows held out for evaluation (0 disables)", default=0.05)
    output_dir: str | None = _help("run directory (default: runs/sft-<timestamp>)", default=None)

    # How long and how fast to learn
    max_steps: int = _help("optimizer steps; -1 means train for num_train_epochs", default=-1)
    num_train_epochs: float = _help("passes over the data when max_steps is -1", default=1.0)
    max_length: int = _help("truncate each tokenized conversation to this many tokens", default=512)
    learning_rate: float = _help("peak learning rate (LoRA tolerates higher rates than full FT)", default=2e-4)
    lr_scheduler_type: str = _help("transformers scheduler name", default="cosine")
    warmup_steps: float = _help("warm-up: an int counts steps, a float < 1 is a fraction of the run", default=0.03)
    weight_decay: float = _help("AdamW weight decay", default=0.0)
    seed: int = _help("seed for init, data split and shuffling", default=42)
    assistant_only_loss: bool = _help(
        "train only on assistant turns (needs a chat template with {% generation %} markers)",
        default=False,
    )

    # The LoRA adapter
    lora_r: int = _help("LoRA rank", default=16)
    lora_alpha: int = _help("LoRA scaling numerator (scale = alpha / r)", default=32)
    lora_dropout: float = _help("dropout on the LoRA path", default=0.05)
    lora_target_modules: str = _help(
        "'all-linear' or a comma-separated list of module names (e.g. q_proj,v_proj)", default="all-linear"
    )
    # The issue calls this `peft.method`; cpuft's config is flat, so the key is `peft_method`.
    peft_method: PeftMethod = _help(
        "adapter type: lora; loha/lokr/adalora use lora_r, lora_alpha, lora_dropout and"
        " lora_target_modules too; ia3 uses lora_target_modules; prompt_tuning, prefix_tuning and"
        " p_tuning learn num_virtual_tokens virtual tokens",
        default="lora",
    )
    num_virtual_tokens: int = _help("virtual tokens for prompt_tuning, prefix_tuning, p_tuning", default=20)
    optimizer: OptimizerRequest = _help(
        "optimizer; auto is paged_adamw_8bit for QLoRA on CUDA, adamw_torch otherwise", default="auto"
    )
    machine_type: str | None = _help(
        "GCP machine type to plan time and cost for (e.g. c3-standard-44; `cpuft plan --list-machine-types`)",
        default=None,
    )

    # Hardware plan: 'auto' / unset lets the planner choose (see `cpuft env`)
    device: DeviceRequest = _help("where to train", default="auto")
    dtype: DtypeRequest = _help("compute dtype", default="auto")
    quant: QuantRequest = _help("base-weight quantisation (QLoRA)", default="auto")
    threads: int | None = _help("CPU compute threads (default: one per physical core)", default=None)
    per_device_batch_size: int | None = _help("micro-batch size (default: the plan's)", default=None)
    gradient_accumulation_steps: int | None = _help("micro-batches per optimizer step (default: the plan's)", default=None)
    gradient_checkpointing: bool | None = _help(
        "recompute activations to save memory (default: only when memory requires it)", default=None
    )
    packing: bool = _help(
        "pack whole samples into rows of max_length (no padding; samples stay apart: position_ids"
        " restart per sample). Changes how many samples an optimizer step sees",
        default=False,
    )
    torch_compile: bool | None = _help(
        "torch.compile the model (default: only runs of 5000+ steps repay inductor's warm-up and"
        " its recompiles for each new sequence length)",
        default=None,
    )
    attn_implementation: str | None = _help("attention kernel (default: sdpa)", default=None)

    # Bookkeeping
    save_steps: int = _help("checkpoint every N optimizer steps (resume and preemption use them)", default=50)
    save_total_limit: int = _help("keep only the newest N checkpoints", default=2)
    logging_steps: int = _help("log loss and tokens/s every N steps", default=1)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


CONFIG_FIELDS = {f.name: f for f in dataclasses.fields(SFTJobConfig)}
_TYPE_HINTS = typing.get_type_hints(SFTJobConfig)


# ----------------------------------------------------------------------------- type handling


def _unwrap_optional(hint) -> tuple[Any, bool]:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], True
    return hint, False


def coerce_value(name: str, value: Any, where: str) -> Any:
    """Check/convert one value against the field's type; `where` names its origin for errors."""
    hint, optional = _unwrap_optional(_TYPE_HINTS[name])
    if value is None or (isinstance(value, str) and optional and value.lower() in ("none", "null")):
        if optional:
            return None
        raise UserError(f"{where}: '{name}' may not be empty.")
    if typing.get_origin(hint) is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise UserError(f"{where}: '{name}' is {value!r}; allowed values: {', '.join(allowed)}.")
        return value
    try:
        if hint is bool:
            return _to_bool(value)
        if hint is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if hint is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if hint is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        kind = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[hint]
        raise UserError(f"{where}: '{name}' must be {kind}, got {value!r}.") from None
    raise AssertionError(f"unhandled config type {hint} for {name}")


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
        return True
    if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
        return False
    raise ValueError


def unknown_key_message(key: str, where: str) -> str:
    close = difflib.get_close_matches(key, CONFIG_FIELDS, n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"{where}: unknown config key '{key}'.{hint} Valid keys: `cpuft sft --help`."


# ----------------------------------------------------------------------------- YAML


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read and validate a YAML config; returns only the keys it sets (typed)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist.")
    raw, node = load_yaml_with_nodes(path)
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: the top level must be a mapping of config keys, got {type(raw).__name__}.")
    lines = key_lines(node)
    return {key: typed_config_value(key, value, f"{path}:{lines.get(key, '?')}") for key, value in raw.items()}


def load_yaml_with_nodes(path: Path) -> tuple[Any, yaml.Node | None]:
    """(data, node tree) of a YAML file; the nodes give each key's line for error messages."""
    text = path.read_text()
    try:
        return yaml.safe_load(text), yaml.compose(text)
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML: {exc}") from None


def key_lines(node) -> dict[str, int]:
    """Line (1-based) of each key of a YAML mapping node; {} for anything else."""
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {key_node.value: key_node.start_mark.line + 1 for key_node, _ in node.value}


def typed_config_value(key: str, value: Any, where: str) -> Any:
    """A config file's value for `key`, typed; UserError naming `where` for unknown keys or bad values."""
    if key not in CONFIG_FIELDS:
        raise UserError(unknown_key_message(str(key), where))
    return coerce_value(key, value, where)


def write_config_file(config: SFTJobConfig, path: Path) -> None:
    from cpuft.artifacts import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))


# ----------------------------------------------------------------------------- CLI


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per config field. Defaults are suppressed so only flags the user typed override."""
    for name, f in CONFIG_FIELDS.items():
        hint, _ = _unwrap_optional(_TYPE_HINTS[name])
        default = f.default
        # argparse %-formats help strings; the chat-template text contains a literal '%'.
        shown_default = "" if default is None else f" (default: {default})"
        help_text = f"{f.metadata['help']}{shown_default}".replace("%", "%%")
        flag = "--" + name.replace("_", "-")
        if typing.get_origin(hint) is Literal:
            parser.add_argument(flag, choices=typing.get_args(hint), default=argparse.SUPPRESS, help=help_text)
        elif hint is bool:
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text
            )
        else:
            metavar = {int: "N", float: "X", str: "TEXT"}[hint]
            parser.add_argument(flag, default=argparse.SUPPRESS, metavar=metavar, help=help_text)


def resolve_config(config_path: str | None, cli_values: dict[str, Any], base: dict[str, Any] | None = None) -> SFTJobConfig:
    """defaults < base (e.g. a resumed run's saved config) < YAML < CLI."""
    values: dict[str, Any] = dict(base or {})
    if config_path:
        values.update(read_config_file(config_path))
    for key, value in cli_values.items():
        if key in CONFIG_FIELDS:
            values[key] = coerce_value(key, value, f"--{key.replace('_', '-')}")
    config = SFTJobConfig(**values)
    _check_ranges(config)
    return config


def _check_ranges(config: SFTJobConfig) -> None:
    if not 0.0 <= config.eval_fraction < 1.0:
        raise UserError(f"eval_fraction must be in [0, 1), got {config.eval_fraction}.")
    if config.max_length < 8:
        raise UserError(f"max_length must be at least 8 tokens, got {config.max_length}.")
    if config.max_steps == 0 or config.max_steps < -1:
        raise UserError(f"max_steps must be -1 (use epochs) or positive, got {config.max_steps}.")
    for name in ("lora_r", "lora_alpha", "save_steps", "logging_steps", "save_total_limit", "num_virtual_tokens"):
        if getattr(config, name) < 1:
            raise UserError(f"{name} must be at least 1, got {getattr(config, name)}.")
    if config.max_samples is not None and config.max_samples < 1:
        raise UserError(f"max_samples must be at least 1, got {config.max_samples}.")
    if config.machine_type is not None:
        from cpuft.planning.cloud import MACHINE_TYPES

        if config.machine_type not in MACHINE_TYPES:
            raise UserError(
                f"machine_type '{config.machine_type}' is not a known GCP machine type; known:"
                f" {', '.join(MACHINE_TYPES)}."
            )
