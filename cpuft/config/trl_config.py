"""`CpuftSFTConfig` and `CpuftDPOConfig`: TRL's SFTConfig and DPOConfig with cpuft's defaults,
each with why (its help).

TRL expresses its own deviations from transformers' TrainingArguments this way
(trl/trainer/sft_config.py overrides `learning_rate`, `logging_steps`, ... with
`field(default=..., metadata={"help": ...})`); cpuft does the same on top of TRL. Three kinds:
- cpuft keys of the same name (learning_rate, max_length, save_steps, ...): the default is the
  key's, read from cpuft.config.sections, so a value is written once and `cpuft sft --help`
  and TRL get the same one;
- fields without a cpuft key whose value cpuft prefers (save_strategy): set the field to override;
- values cpuft's pipeline relies on (disable_tqdm, packing_strategy, dataset_text_field, ...):
  setting the field itself is refused, with the cpuft key that decides it instead
  (cpuft.config.passthrough.TRL_PINNED).

What is decided per run (the plan's bf16/use_cpu/batch sizes/optim, the run directory, the
evaluation fields that follow eval_steps) is not a default: cpuft.config.passthrough.TRL_PER_RUN
lists it and cpuft.train.trainer_args sets it. `cpuft sft --help-trl` shows all of these next to
TRL's own defaults.

Limits: importing this module imports TRL (seconds): only what builds or describes an SFTConfig
imports it, on first use. An instance pickles (training_args.bin) and copies as TRL's own
SFTConfig, so a checkpoint's arguments load where TRL is installed, without cpuft.
"""

from dataclasses import dataclass, field, fields
from typing import Any

from transformers.trainer_utils import SaveStrategy, SchedulerType
from trl import DPOConfig, SFTConfig

from cpuft.config.sections import DPO_LEARNING_RATE, key_default


def _cpuft_value(default: Any, why: str) -> Any:
    """cpuft's default for an SFTConfig field; `why` is its help (argparse-safe: %% for %)."""
    return field(default=default, metadata={"help": why})


def _job_key(name: str, why: str) -> Any:
    """An SFTConfig field set by the cpuft key of the same name: the key's default."""
    return _cpuft_value(key_default(name), why)


@dataclass
class _CpuftTrainingDefaults:
    """cpuft's defaults for the fields SFTConfig and DPOConfig share (see the module)."""

    # cpuft keys of the same name (cpuft.config.sections holds their defaults)
    num_train_epochs: float = _job_key("num_train_epochs", "one pass keeps a first run on a CPU short")
    learning_rate: float = _job_key(
        "learning_rate", "LoRA trains few weights and tolerates ~10x a full fine-tune's rate"
    )
    lr_scheduler_type: SchedulerType | str = _job_key("lr_scheduler_type", "decays to zero by the last step")
    warmup_steps: float = _job_key("warmup_steps", "a float < 1 is a fraction of the run: 3 %% warm-up")
    max_length: int | None = _job_key("max_length", "CPU time and activation memory grow with length")
    logging_steps: float = _job_key("logging_steps", "metrics.jsonl and the progress bar show every step")
    save_steps: float = _job_key(
        "save_steps", f"resume and preemption lose at most {key_default('save_steps')} steps"
    )
    save_total_limit: int | None = _job_key(
        "save_total_limit", "keeps disk use bounded; TRL keeps every checkpoint"
    )
    report_to: None | str | list[str] = _job_key(
        "report_to", "event files in the run's tensorboard/; wandb, mlflow and trackio log locally when offline"
    )

    # cpuft's values for fields without a cpuft key (set the field to override)
    save_strategy: SaveStrategy | str = _cpuft_value(
        "steps", "checkpoints every save_steps are what --resume and preemption use"
    )

    # values cpuft's pipeline relies on (setting the field is refused: passthrough.TRL_PINNED)
    bf16_full_eval: bool = _cpuft_value(False, "evaluation runs in the plan's compute dtype")
    fp16_full_eval: bool = _cpuft_value(False, "evaluation runs in the plan's compute dtype")
    auto_find_batch_size: bool = _cpuft_value(False, "the memory plan sizes the batch before loading")
    disable_tqdm: bool | None = _cpuft_value(True, "cpuft draws its own progress bar, with tokens/s")
    model_init_kwargs: dict[str, Any] | str | None = _cpuft_value(None, "cpuft loads the model itself")


@dataclass
class CpuftSFTConfig(_CpuftTrainingDefaults, SFTConfig):
    """TRL's SFTConfig as cpuft runs it: cpuft's defaults, each with why (see the module)."""

    dataset_text_field: str = _cpuft_value("text", "cpuft converts every row format itself")
    packing_strategy: str = _cpuft_value("bfd", "bfd keeps samples apart (position_ids restart per sample)")
    padding_free: bool = _cpuft_value(False, "packing is TRL's padding-free bfd path")
    completion_only_loss: bool | None = _cpuft_value(
        None, "prompt/completion (and alpaca) rows reach TRL as user/assistant conversations that"
        " cpuft masks itself: loss_on assistant trains the completion; plain text rows train on"
        " every token",
    )
    assistant_only_loss: bool = _cpuft_value(
        False, "cpuft builds the assistant-token mask itself for any chat template and hands TRL"
        " pre-tokenised rows (TRL's own needs {%% generation %%} markers); the retired cpuft key of"
        " this name is read as loss_on",
    )

    def __reduce__(self):
        # Rebuilt as TRL's SFTConfig (same values): training_args.bin then loads without cpuft.
        return object.__new__, (SFTConfig,), self.__dict__.copy()


@dataclass
class CpuftDPOConfig(_CpuftTrainingDefaults, DPOConfig):
    """TRL's DPOConfig as cpuft runs it (`cpuft dpo`): the same defaults as CpuftSFTConfig where
    the fields are shared; DPO's own fields keep TRL's defaults (beta 0.1, loss_type sigmoid)."""

    learning_rate: float = _cpuft_value(
        DPO_LEARNING_RATE, "a LoRA adapter's DPO rate: TRL's 1e-6 is for full fine-tuning, LoRA takes"
        " ~10x more; SFT's 2e-4 overshoots a preference margin"
    )
    padding_free: bool = _cpuft_value(False, "TRL 1.16 turns DPO's padding-free path off (being reworked)")

    def __reduce__(self):
        # Rebuilt as TRL's DPOConfig (same values): training_args.bin then loads without cpuft.
        return object.__new__, (DPOConfig,), self.__dict__.copy()


TRL_CONFIG_CLASSES = {"sft": CpuftSFTConfig, "dpo": CpuftDPOConfig}


def cpuft_defaults(kind: str = "sft") -> dict[str, Any]:
    """The TRL config fields cpuft's class for the job `kind` gives a default of cpuft's:
    {name: dataclass field}."""
    cls = TRL_CONFIG_CLASSES[kind]
    own = set().union(*(base.__dict__.get("__annotations__", {}) for base in cls.__mro__ if base.__module__ == __name__))
    return {f.name: f for f in fields(cls) if f.name in own}


def cpuft_default_values() -> dict[str, Any]:
    """{name: cpuft's default} for the SFT fields (for argument classes that are not SFTConfig)."""
    return {name: f.default for name, f in cpuft_defaults().items()}


def reason(cpuft_field: Any) -> str:
    """Why a CpuftSFTConfig field has cpuft's default: its help, as plain text."""
    return cpuft_field.metadata["help"].replace("%%", "%")
