"""The `cpuft sft` job config: `SFTJobConfig` (cpuft's own keys, from the sections of
cpuft.config.sections) and its resolution.

Precedence: defaults < base (a resumed run's config.yaml, a batch queue's job) < YAML file
(`--config`) < command-line flags. Every key is a YAML key `name` and a flag `--name`
(underscores become dashes; cpuft.config.cli_args makes the flags).

The namespace is flat: cpuft's own keys first, then every field of TRL's `SFTConfig`
(cpuft.config.passthrough), then every field of the PEFT config of `peft_method`
(cpuft.config.peft_config). Several cpuft keys set an SFTConfig field of the same name
(learning_rate, max_steps, ...: `trl=True` in the sections) with cpuft's defaults
(cpuft.config.trl_config says why they differ from TRL's); lora_r, lora_alpha, lora_dropout,
lora_target_modules and num_virtual_tokens set the PEFT config's fields. Unknown keys are refused
with the nearest valid name and where they were set; every value is typed, and SFTConfig and the
PEFT config are built once here, so a value the libraries refuse stops the job before anything
is written or loaded.

Limits: checks that need the machine (a known `machine_type`, whether the plan can be met) are
the planner's, done by the commands before they write anything.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import itertools
import math
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterator
from typing import Any, TypeVar

import yaml

from cpuft.config import choices, passthrough, peft_config
from cpuft.config.reporting import check_report_integrations, report_integration_names
from cpuft.config.sections import (
    DPO_LEARNING_RATE,
    SECTIONS,
    AdapterSection,
    DataSection,
    EvaluationSection,
    HardwareSection,
    ModelSection,
    OutputSection,
    TrainingSection,
    section_keys,
    section_title,
)
from cpuft.config.values import typed_value
from cpuft.config.yaml_file import read_mapping
from cpuft.errors import UserError

Section = TypeVar("Section")


# Dataclasses collect the fields of the last base first: the bases are SECTIONS reversed, so the
# fields keep the sections' order.
@dataclass
class SFTJobConfig(
    OutputSection, EvaluationSection, HardwareSection, AdapterSection, TrainingSection, DataSection, ModelSection
):
    """One `cpuft sft` job: every section's keys as flat fields (`config.learning_rate`)."""

    # The job kind: which TRL trainer and config run it (cpuft.config.passthrough.JOB_KINDS).
    kind: typing.ClassVar[str] = "sft"
    # Where each key was set ("FILE:LINE", "--flag"), for messages; not part of the job.
    origins: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def section(self, kind: type[Section]) -> Section:
        """A copy of one section of the job (a class of SECTIONS), for a stage that needs only
        it: `config.section(HardwareSection)`."""
        if kind not in SECTIONS:
            raise TypeError(f"{kind!r} is not a section of SFTJobConfig")
        return kind(**{f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(kind)})

    def to_dict(self) -> dict[str, Any]:
        """The job as flat config keys: cpuft's, then the pass-through values (config.yaml)."""
        values = {name: getattr(self, name) for name in CONFIG_FIELDS}
        return {**values, **self.trl_args, **self.peft_args}


@dataclass
class DPOJobConfig(SFTJobConfig):
    """One `cpuft dpo` job: the same keys as `cpuft sft` where they mean the same; TRL's DPOConfig
    fields (beta, loss_type, ...) pass through in `trl_args`."""

    kind: typing.ClassVar[str] = "dpo"

    def to_dict(self) -> dict[str, Any]:
        """The job as flat config keys (config.yaml), without the keys only `cpuft sft` reads."""
        return {key: value for key, value in super().to_dict().items() if key not in SFT_ONLY_KEYS}


JOB_CONFIG_CLASSES = {"sft": SFTJobConfig, "dpo": DPOJobConfig}


CONFIG_FIELDS = {name: f for section in SECTIONS for name, f in section_keys(section).items()}
KEY_TYPES = {name: hint for name, hint in typing.get_type_hints(SFTJobConfig).items() if name in CONFIG_FIELDS}
# --help groups: the first key of each section, and the section's title.
KEY_GROUPS = {next(iter(section_keys(section))): section_title(section) for section in SECTIONS}


# ----------------------------------------------------------------------------- one key


def is_config_key(key: str, kind: str = "sft") -> bool:
    """A cpuft key, a field of the job kind's TRL config or a field of some PEFT config."""
    return key in CONFIG_FIELDS or key in passthrough.trl_fields(kind) or peft_config.is_peft_field(key)


def is_job_key(key: str, kind: str) -> bool:
    """A config key a job of `kind` reads (a saved config.yaml's keys are filtered by it on --resume)."""
    return is_config_key(key, kind) and not (kind == "dpo" and key in SFT_ONLY_KEYS)


def typed_config_value(key: str, value: Any, where: str, kind: str = "sft") -> Any:
    """A config value for `key`, typed; UserError naming `where` for unknown keys or bad values.

    PEFT fields are returned as given: their type depends on `peft_method` (resolve_config).
    """
    key = str(key)
    if key in CONFIG_FIELDS:
        return typed_value(key, KEY_TYPES[key], value, where)
    if key == RETIRED_ASSISTANT_ONLY_LOSS:
        return typed_value(key, bool, value, where)
    if key in passthrough.trl_fields(kind):
        return passthrough.typed_trl_value(key, value, where, kind)
    if not peft_config.is_peft_field(key):
        raise UserError(unknown_key_message(key, where))
    peft_config.refuse_peft_key_set_by_cpuft(key, where)
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
    library_names = list(dict.fromkeys([*passthrough.trl_fields("dpo"), *passthrough.trl_fields(),
                                        *peft_config.peft_field_names()]))
    return (
        nearest_name(key, CONFIG_FIELDS, cutoff=0.6)
        or nearest_name(key, library_names, cutoff=0.6)
        or nearest_name(key, [*CONFIG_FIELDS, *library_names], cutoff=0.5)
    )


def nearest_name(name: str, candidates, cutoff: float = 0.5) -> str | None:
    """The candidate most like `name` (difflib's ratio at least `cutoff`), or None."""
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=cutoff)
    return close[0] if close else None


def flag_name(key: str) -> str:
    return "--" + key.replace("_", "-")


# ----------------------------------------------------------------------------- files


def read_config_file(path: str | Path, kind: str = "sft") -> dict[str, Any]:
    """Read and validate a YAML config; returns only the keys it sets (typed)."""
    return read_config_values(path, kind)[0]


def read_config_values(path: str | Path, kind: str = "sft") -> tuple[dict[str, Any], dict[str, str]]:
    """(typed values, {key: "FILE:LINE"}) of a YAML config file."""
    raw, origins = read_mapping(path)
    values = {str(key): typed_config_value(key, value, origins[str(key)], kind) for key, value in raw.items()}
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
    kind: str = "sft",
) -> SFTJobConfig:
    """defaults < base (e.g. a resumed run's saved config) < YAML < CLI, validated whole, as a
    job of `kind` (SFTJobConfig, DPOJobConfig).

    `origins` says where each `base` value was set, for messages.
    """
    values: dict[str, Any] = {}
    where: dict[str, str] = {}
    for key, value in (base or {}).items():
        at = (origins or {}).get(key, f"'{key}'")
        values[key], where[key] = typed_config_value(key, value, at, kind), at
    if config_path:
        file_values, file_origins = read_config_values(config_path, kind)
        values.update(file_values)
        where.update(file_origins)
    for key, value in cli_values.items():
        values[key], where[key] = typed_config_value(key, value, flag_name(key), kind), flag_name(key)

    _read_retired_keys(values, where)
    own = {k: v for k, v in values.items() if k in CONFIG_FIELDS}
    if kind == "dpo":
        _refuse_sft_only_keys(own, where)
        own.setdefault("learning_rate", DPO_LEARNING_RATE)  # cpuft.config.trl_config.CpuftDPOConfig says why
    trl = {k: v for k, v in values.items() if k not in CONFIG_FIELDS and k in passthrough.trl_fields(kind)}
    peft_raw = {k: v for k, v in values.items() if k not in CONFIG_FIELDS and k not in trl}
    config = JOB_CONFIG_CLASSES[kind](**own, trl_args=trl, origins=where)
    if peft_raw:
        config.peft_args = peft_config.typed_peft_values(config.peft_method, peft_raw, where)
    _check_ranges(config)
    _check_hub_options(config)
    _align_evaluation(config)
    # What the libraries (and report_to's integrations) would refuse, checked before anything is
    # written or loaded.
    check_report_integrations(config, where)
    passthrough.validate_trl_config(config, where)
    peft_config.validate_peft_config(config, where)
    return config


# cpuft keys that shape SFT rows only: a DPO pair has its own fields and TRL's own loss.
SFT_ONLY_KEYS = ("dataset_format", "loss_on", "packing")


def _refuse_sft_only_keys(own: dict[str, Any], where: dict[str, str]) -> None:
    for key in SFT_ONLY_KEYS:
        if key in own:
            raise UserError(f"{where[key]}: '{key}' is a cpuft sft key; cpuft dpo reads preference pairs"
                            " (prompt/chosen/rejected) and scores every completion token, so it has no use for it. Remove it.")


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
    """Values the libraries would accept and then train nonsense with (a NaN or negative learning
    rate, zero steps, a batch of 0), refused here so the run directory is never written."""
    for key, value in _numbers(config):
        if not math.isfinite(value):
            _fail(config, key, f"{key} must be a finite number, got {value}.")
    if not config.learning_rate > 0:
        _fail(config, "learning_rate", f"learning_rate must be positive, got {config.learning_rate}.")
    if config.weight_decay < 0:
        _fail(config, "weight_decay", f"weight_decay must be 0 or more, got {config.weight_decay}.")
    if config.warmup_steps < 0:
        _fail(config, "warmup_steps", f"warmup_steps must be 0 or more, got {config.warmup_steps}.")
    if not 0.0 <= config.lora_dropout < 1.0:
        _fail(config, "lora_dropout", f"lora_dropout must be in [0, 1), got {config.lora_dropout}.")
    if config.max_steps == -1 and not config.num_train_epochs > 0:
        _fail(config, "num_train_epochs", f"num_train_epochs must be positive when max_steps is -1 (train by"
              f" epochs), got {config.num_train_epochs}: set num_train_epochs (e.g. 1) or max_steps.")
    for name in ("per_device_batch_size", "gradient_accumulation_steps", "threads"):
        if getattr(config, name) is not None and getattr(config, name) < 1:
            _fail(config, name, f"{name} must be at least 1 (or unset: the plan's), got {getattr(config, name)}.")
    max_grad_norm = config.trl_args.get("max_grad_norm")
    if max_grad_norm is not None and max_grad_norm < 0:
        _fail(config, "max_grad_norm", f"max_grad_norm must be 0 (no clipping) or more, got {max_grad_norm}.")
    if not 0.0 <= config.eval_fraction < 1.0:
        _fail(config, "eval_fraction", f"eval_fraction must be in [0, 1), got {config.eval_fraction}.")
    if config.max_length < 8:
        _fail(config, "max_length", f"max_length must be at least 8 tokens, got {config.max_length}.")
    if config.max_steps == 0 or config.max_steps < -1:
        _fail(config, "max_steps", f"max_steps must be -1 (use epochs) or positive, got {config.max_steps}.")
    for name in ("lora_r", "lora_alpha", "save_steps", "logging_steps", "save_total_limit", "num_virtual_tokens"):
        if getattr(config, name) < 1:
            _fail(config, name, f"{name} must be at least 1, got {getattr(config, name)}.")
    if config.max_samples is not None and config.max_samples < 1:
        _fail(config, "max_samples", f"max_samples must be at least 1, got {config.max_samples}.")


def _numbers(config: SFTJobConfig) -> Iterator[tuple[str, float]]:
    """Every float the job sets, cpuft's keys and the libraries' alike, with its key."""
    own = ((name, getattr(config, name)) for name in CONFIG_FIELDS)
    for key, value in itertools.chain(own, config.trl_args.items(), config.peft_args.items()):
        if isinstance(value, float):
            yield key, value


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
    names = report_integration_names(config.report_to)
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
