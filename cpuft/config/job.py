"""The `cpuft sft` job config: cpuft's own keys (`SFTJobConfig`), and their resolution.

Precedence: defaults < base (a resumed run's config.yaml, a batch queue's job) < YAML file
(`--config`) < command-line flags. Every key is a YAML key `name` and a flag `--name`
(underscores become dashes; cpuft.config.cli_args makes the flags).

The namespace is flat: cpuft's own keys first, then every field of TRL's `SFTConfig`, then every
field of the PEFT config of `peft_method` (cpuft.config.passthrough). Several cpuft keys set an
SFTConfig field of the same name (learning_rate, max_steps, ...: `trl=True` below) with cpuft's
defaults; lora_r, lora_alpha, lora_dropout, lora_target_modules and num_virtual_tokens set the
PEFT config's fields. Unknown keys are refused with the nearest valid name and where they were
set; every value is typed, and SFTConfig and the PEFT config are built once here, so a value the
libraries refuse stops the job before anything is written or loaded.

Limits: checks that need the machine (a known `machine_type`, whether the plan can be met) are
the planner's, done by the commands before they write anything.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cpuft.config import choices, passthrough
from cpuft.config.choices import (
    DatasetFormat,
    DeviceRequest,
    DtypeRequest,
    LossOn,
    OptimizerRequest,
    PeftMethod,
    QuantRequest,
)
from cpuft.config.values import typed_value
from cpuft.config.yaml_file import read_mapping
from cpuft.errors import UserError

DEFAULT_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
DEFAULT_DATASET = "GAIR/lima"


def _key(text: str, default: Any, trl: bool = False) -> Any:
    """A cpuft key; `trl`: it sets the SFTConfig field of the same name as it is."""
    return field(default=default, metadata={"help": text, "trl": trl})


def _trl_key(name: str, text: str) -> Any:
    """A cpuft key for the SFTConfig field `name`, with cpuft's default from TRL_DEVIATIONS."""
    return _key(text, passthrough.TRL_DEVIATIONS[name].value, trl=True)


def _peft_key(peft_field: str, text: str) -> Any:
    """A cpuft key for a PEFT config field, with cpuft's default from PEFT_DEVIATIONS."""
    return _key(text, passthrough.PEFT_DEVIATIONS[peft_field].value)


@dataclass
class SFTJobConfig:
    # What to train
    model: str = _key("base model: a local directory or a Hugging Face Hub id", DEFAULT_MODEL)
    revision: str | None = _key(
        "the Hub model's revision: a branch, tag or commit hash (default: main). Used for its config,"
        " tokenizer and weights, recorded in adapter_config.json; a local directory has none", None,
    )
    trust_remote_code: bool = _key(
        "let transformers run the Python code a model repository ships (auto_map in config.json):"
        " only for code you trust, it runs on this machine", False, trl=True,
    )
    dataset: str = _key(
        "training data: a Hub id (default GAIR/lima, gated: needs HF_TOKEN), a local"
        " .jsonl/.json/.parquet file, or 'sample' for the bundled LIMA-shaped sample",
        DEFAULT_DATASET,
    )
    dataset_format: DatasetFormat = _key("row format; auto detects it from the first row's keys", "auto")
    dataset_split: str = _key("split to read from a Hub dataset", "train")
    dataset_revision: str | None = _key("the Hub dataset's revision: a branch, tag or commit hash (default: main)", None)
    max_samples: int | None = _key("use only the first N rows, for quick experiments (default: all)", None)
    eval_fraction: float = _key("fraction of rows held out for evaluation (0 disables)", 0.05)
    output_dir: str | None = _key("run directory (default: runs/sft-<timestamp>)", None)

    # How long and how fast to learn (these set TRL SFTConfig's fields of the same name)
    max_steps: int = _key("optimizer steps; -1 means train for num_train_epochs", -1, trl=True)
    num_train_epochs: float = _trl_key("num_train_epochs", "passes over the data when max_steps is -1")
    max_length: int = _trl_key("max_length", "truncate each tokenized conversation to this many tokens")
    learning_rate: float = _trl_key("learning_rate", "peak learning rate (LoRA tolerates higher rates than full FT)")
    lr_scheduler_type: str = _trl_key("lr_scheduler_type", "transformers scheduler name (linear, cosine, constant, ...)")
    warmup_steps: float = _trl_key("warmup_steps", "warm-up: an int counts steps, a float < 1 is a fraction of the run")
    weight_decay: float = _key("AdamW weight decay", 0.0, trl=True)
    seed: int = _key("seed for init, data split and shuffling", 42, trl=True)
    loss_on: LossOn = _key(
        "which tokens of a conversation the loss counts: assistant (each reply and its end-of-turn"
        " token, for any chat template; prompt/completion rows: the completion) or all; plain text"
        " rows always train on every token",
        "assistant",
    )
    optimizer: OptimizerRequest = _key(
        "optimizer (SFTConfig's optim); auto is paged_adamw_8bit for QLoRA on CUDA, adamw_torch_fused on a CPU without quantisation, adamw_torch otherwise", "auto"
    )

    # The adapter (these set the PEFT config's fields: `cpuft sft --help-peft METHOD`)
    # The issue calls this `peft.method`; cpuft's config is flat, so the key is `peft_method`.
    peft_method: PeftMethod = _key(
        "adapter type: lora; loha/lokr/adalora use lora_r, lora_alpha, lora_dropout and"
        " lora_target_modules too; ia3 uses lora_target_modules; prompt_tuning, prefix_tuning and"
        " p_tuning learn num_virtual_tokens virtual tokens",
        "lora",
    )
    lora_r: int = _peft_key("r", "LoRA rank (PEFT's r; AdaLoRA's target_r)")
    lora_alpha: int = _peft_key("lora_alpha", "LoRA scaling numerator (scale = alpha / r)")
    lora_dropout: float = _peft_key("lora_dropout", "dropout on the LoRA path")
    lora_target_modules: str = _peft_key(
        "target_modules", "'all-linear' or a comma-separated list of module names (e.g. q_proj,v_proj)"
    )
    num_virtual_tokens: int = _peft_key("num_virtual_tokens", "virtual tokens for prompt_tuning, prefix_tuning, p_tuning")

    # Hardware plan: 'auto' / unset lets the planner choose (see `cpuft env`)
    device: DeviceRequest = _key("where to train", "auto")
    dtype: DtypeRequest = _key("compute dtype (SFTConfig's bf16/fp16)", "auto")
    quant: QuantRequest = _key("base-weight quantisation (QLoRA)", "auto")
    threads: int | None = _key("CPU compute threads (default: one per physical core)", None)
    per_device_batch_size: int | None = _key("micro-batch size (default: the plan's)", None)
    gradient_accumulation_steps: int | None = _key("micro-batches per optimizer step (default: the plan's)", None)
    gradient_checkpointing: bool | None = _key(
        "recompute activations to save memory (default: only when memory requires it)", None
    )
    packing: bool = _key(
        "pack whole samples into rows of max_length (no padding; samples stay apart: position_ids"
        " restart per sample). Changes how many samples an optimizer step sees",
        False,
    )
    torch_compile: bool | None = _key(
        "torch.compile the model (default: only runs of 5000+ steps repay inductor's warm-up and"
        " its recompiles for each new sequence length)",
        None,
    )
    attn_implementation: str | None = _key("attention kernel (default: sdpa)", None)
    machine_type: str | None = _key(
        "GCP machine type to plan time and cost for (e.g. c3-standard-44; `cpuft plan --list-machine-types`)", None
    )

    # Evaluation during training (on the eval_fraction held out)
    eval_steps: int | None = _key(
        "evaluate every N optimizer steps; checkpoints follow (save_steps defaults to N) and adapter/ is"
        " the checkpoint with the lowest eval_loss (default: evaluate once, after training)", None, trl=True,
    )
    early_stopping_patience: int | None = _key(
        "stop after N evaluations in a row without a new lowest eval_loss (needs eval_steps)", None
    )
    early_stopping_threshold: float = _key(
        "how much lower than the best eval_loss counts as better, for early stopping", 0.0
    )

    # Bookkeeping
    save_steps: int = _trl_key("save_steps", "checkpoint every N optimizer steps (resume and preemption use them)")
    save_total_limit: int = _trl_key("save_total_limit", "keep only the newest N checkpoints")
    logging_steps: int = _trl_key("logging_steps", "log loss and tokens/s every N steps")
    report_to: str | list[str] = _trl_key(
        "report_to", "where metrics go besides metrics.jsonl: tensorboard, wandb, mlflow, trackio or none;"
        " a comma list for several. Offline (HF_HUB_OFFLINE=1 or no network) they log locally",
    )
    sync_to: str | None = _key(
        "durable copy of the run (gs://bucket/path, s3://..., a local path): every checkpoint, the"
        " metrics and the adapter are uploaded in the background; --resume restores from it",
        None,
    )

    # Pass-through values the job sets (SFTConfig fields, PEFT config fields), by field name.
    trl_args: dict[str, Any] = field(default_factory=dict)
    peft_args: dict[str, Any] = field(default_factory=dict)
    # Where each key was set ("FILE:LINE", "--flag"), for messages; not part of the job.
    origins: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The job as flat config keys: cpuft's, then the pass-through values (config.yaml)."""
        values = {name: getattr(self, name) for name in CONFIG_FIELDS}
        return {**values, **self.trl_args, **self.peft_args}


_NOT_KEYS = ("trl_args", "peft_args", "origins")
CONFIG_FIELDS = {f.name: f for f in dataclasses.fields(SFTJobConfig) if f.name not in _NOT_KEYS}
KEY_TYPES = typing.get_type_hints(SFTJobConfig)
# --help groups: the first key of each group, in field order.
KEY_GROUPS = {
    "model": "what to train",
    "max_steps": "how long and how fast to learn (these set TRL SFTConfig's fields of the same name)",
    "peft_method": "the adapter (these set the PEFT config's fields; `--help-peft METHOD` lists them all)",
    "device": "the hardware plan ('auto' or unset: the planner chooses; `cpuft env` shows why)",
    "eval_steps": "evaluation during training: the best checkpoint kept, early stopping",
    "save_steps": "bookkeeping",
}


# ----------------------------------------------------------------------------- one key


def is_config_key(key: str) -> bool:
    """A cpuft key, an SFTConfig field or a field of some PEFT config."""
    return key in CONFIG_FIELDS or passthrough.is_library_key(key)


def typed_config_value(key: str, value: Any, where: str) -> Any:
    """A config value for `key`, typed; UserError naming `where` for unknown keys or bad values.

    PEFT fields are returned as given: their type depends on `peft_method` (resolve_config).
    """
    key = str(key)
    if key in CONFIG_FIELDS:
        return typed_value(key, KEY_TYPES[key], value, where)
    if key == RETIRED_ASSISTANT_ONLY_LOSS:
        return typed_value(key, bool, value, where)
    if not passthrough.is_library_key(key):
        raise UserError(unknown_key_message(key, where))
    refusal = passthrough.set_by_cpuft_message(key, where)
    if refusal:
        raise UserError(refusal)
    if key in passthrough.sft_fields():
        return passthrough.typed_trl_value(key, value, where)
    return value


def unknown_key_message(key: str, where: str) -> str:
    close = nearest_key(key)
    hint = f" Did you mean '{close}'?" if close else ""
    return (
        f"{where}: unknown config key '{key}'.{hint} Valid keys: `cpuft sft --help` (cpuft's),"
        " `--help-trl` (TRL SFTConfig), `--help-peft METHOD` (PEFT)."
    )


def nearest_key(key: str) -> str | None:
    """The valid key nearest to `key`: in namespace order first (cpuft's keys, then the
    libraries': 'lora_rank' means lora_r, not TrainingArguments' local_rank), then of all."""
    return (
        passthrough.nearest_name(key, CONFIG_FIELDS, cutoff=0.6)
        or passthrough.nearest_name(key, passthrough.library_names(), cutoff=0.6)
        or passthrough.nearest_name(key, [*CONFIG_FIELDS, *passthrough.library_names()], cutoff=0.5)
    )


def flag_name(key: str) -> str:
    return "--" + key.replace("_", "-")


# ----------------------------------------------------------------------------- files


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read and validate a YAML config; returns only the keys it sets (typed)."""
    return read_config_values(path)[0]


def read_config_values(path: str | Path) -> tuple[dict[str, Any], dict[str, str]]:
    """(typed values, {key: "FILE:LINE"}) of a YAML config file."""
    raw, origins = read_mapping(path)
    values = {str(key): typed_config_value(key, value, origins[str(key)]) for key, value in raw.items()}
    return values, origins


def write_config_file(config: SFTJobConfig, path: Path) -> None:
    from cpuft.artifacts import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))


# ----------------------------------------------------------------------------- resolution


def resolve_config(
    config_path: str | None,
    cli_values: dict[str, Any],
    base: dict[str, Any] | None = None,
    origins: dict[str, str] | None = None,
) -> SFTJobConfig:
    """defaults < base (e.g. a resumed run's saved config) < YAML < CLI, validated whole.

    `origins` says where each `base` value was set, for messages.
    """
    values: dict[str, Any] = {}
    where: dict[str, str] = {}
    for key, value in (base or {}).items():
        at = (origins or {}).get(key, f"'{key}'")
        values[key], where[key] = typed_config_value(key, value, at), at
    if config_path:
        file_values, file_origins = read_config_values(config_path)
        values.update(file_values)
        where.update(file_origins)
    for key, value in cli_values.items():
        values[key], where[key] = typed_config_value(key, value, flag_name(key)), flag_name(key)

    _read_retired_keys(values, where)
    own = {k: v for k, v in values.items() if k in CONFIG_FIELDS}
    trl = {k: v for k, v in values.items() if k not in CONFIG_FIELDS and k in passthrough.sft_fields()}
    peft_raw = {k: v for k, v in values.items() if k not in CONFIG_FIELDS and k not in trl}
    config = SFTJobConfig(**own, trl_args=trl, origins=where)
    if peft_raw:
        config.peft_args = passthrough.typed_peft_values(config.peft_method, peft_raw, where)
    _check_ranges(config)
    _check_hub_options(config)
    _align_evaluation(config)
    passthrough.validate_library_configs(config, where)
    return config


# cpuft's former key for the loss mask (it set TRL's field, which needs {% generation %} markers).
# Runs saved before loss_on have it in config.yaml, so --resume reads it as the loss_on it meant.
RETIRED_ASSISTANT_ONLY_LOSS = "assistant_only_loss"


def _read_retired_keys(values: dict[str, Any], where: dict[str, str]) -> None:
    """Replace assistant_only_loss by loss_on (true: assistant, false: all), with a one-line note;
    loss_on wins where both are set."""
    if RETIRED_ASSISTANT_ONLY_LOSS not in values:
        return
    at = where.pop(RETIRED_ASSISTANT_ONLY_LOSS)
    meant = "assistant" if values.pop(RETIRED_ASSISTANT_ONLY_LOSS) else "all"
    if "loss_on" in values:
        read = f"ignored: loss_on ({where['loss_on']}) is set"
    else:
        values["loss_on"], where["loss_on"] = meant, at
        read = f"read as loss_on: {meant}"
    print(f"cpuft: note: {at}: 'assistant_only_loss' is retired ({read}); set loss_on: assistant|all instead.",
          file=sys.stderr)


def _check_ranges(config: SFTJobConfig) -> None:
    def fail(key: str, text: str) -> None:
        at = config.origins.get(key)
        raise UserError(f"{at}: {text}" if at else text)

    if not 0.0 <= config.eval_fraction < 1.0:
        fail("eval_fraction", f"eval_fraction must be in [0, 1), got {config.eval_fraction}.")
    if config.max_length < 8:
        fail("max_length", f"max_length must be at least 8 tokens, got {config.max_length}.")
    if config.max_steps == 0 or config.max_steps < -1:
        fail("max_steps", f"max_steps must be -1 (use epochs) or positive, got {config.max_steps}.")
    for name in ("lora_r", "lora_alpha", "save_steps", "logging_steps", "save_total_limit", "num_virtual_tokens"):
        if getattr(config, name) < 1:
            fail(name, f"{name} must be at least 1, got {getattr(config, name)}.")
    if config.max_samples is not None and config.max_samples < 1:
        fail("max_samples", f"max_samples must be at least 1, got {config.max_samples}.")


def _fail(config: SFTJobConfig, key: str, text: str) -> None:
    at = config.origins.get(key)
    raise UserError(f"{at}: {text}" if at else text)


def _check_hub_options(config: SFTJobConfig) -> None:
    """A revision names a Hub version, so one given for a local model directory is refused: it
    cannot be honoured, and ignoring it would record a pinned version the run never used
    (cpuft.data.readers refuses dataset_revision for a local file the same way). report_to is
    checked and written as a comma list (config.yaml keeps that form)."""
    if config.revision is not None and Path(config.model).expanduser().is_dir():
        _fail(config, "revision", f"revision {config.revision!r} is for a Hub model, but model '{config.model}'"
              " is a local directory, which has no revisions: check out the version you want there,"
              " or drop revision.")
    names = passthrough.report_integration_names(config.report_to)
    allowed = choices.values(choices.ReportIntegration)
    for name in names:
        if name not in allowed:
            _fail(config, "report_to", f"report_to {name!r} is not one cpuft sets up; choose from"
                  f" {', '.join(allowed)} (a comma list for several).")
    if "none" in names and len(names) > 1:
        _fail(config, "report_to", f"report_to {','.join(names)}: 'none' cannot be combined with other integrations.")
    config.report_to = ",".join(names)


def _align_evaluation(config: SFTJobConfig) -> None:
    """eval_steps turns on evaluation every N steps and keeps the best checkpoint, which needs a
    checkpoint at the evaluations: the Trainer refuses a save_steps that is not a multiple of
    eval_steps. Unset, save_steps follows eval_steps (written to config.yaml, so --resume keeps it)."""
    if config.eval_steps is None:
        if config.early_stopping_patience is not None:
            _fail(config, "early_stopping_patience", "early_stopping_patience needs evaluations during"
                  " training: set eval_steps too (e.g. --eval-steps 50).")
        return
    if config.eval_steps < 1:
        _fail(config, "eval_steps", f"eval_steps must be at least 1, got {config.eval_steps}.")
    if config.eval_fraction == 0:
        _fail(config, "eval_steps", f"eval_steps {config.eval_steps} evaluates on held-out rows, but eval_fraction"
              " is 0: set eval_fraction above 0 (e.g. 0.1), or drop eval_steps.")
    if config.early_stopping_patience is not None and config.early_stopping_patience < 1:
        _fail(config, "early_stopping_patience",
              f"early_stopping_patience must be at least 1, got {config.early_stopping_patience}.")
    if config.early_stopping_threshold < 0:
        _fail(config, "early_stopping_threshold",
              f"early_stopping_threshold must be 0 or more, got {config.early_stopping_threshold}.")
    if not passthrough.loads_best_checkpoint(config):
        return  # no best checkpoint to load: any save_steps will do
    if "save_steps" not in config.origins:
        config.save_steps = config.eval_steps
    elif config.save_steps % config.eval_steps:
        fit = config.eval_steps * max(1, round(config.save_steps / config.eval_steps))
        _fail(config, "save_steps", f"save_steps {config.save_steps} is not a multiple of eval_steps"
              f" {config.eval_steps}: the best checkpoint can only be kept when checkpoints fall on"
              f" evaluations. Set save_steps to {fit} (or leave it unset: it follows eval_steps).")
