"""cpuft's own config keys, in sections: each key's type, default and help, defined once.

A section is what one stage of the flow reads: the planner the model, adapter and hardware
sections; data preparation the data section; the trainer's arguments the training, evaluation
and output sections. `SFTJobConfig` (cpuft.config.job) is all of them at once, so the keys stay
one flat namespace (YAML `lora_r: 8`, flag `--lora-r 8`); `config.section(HardwareSection)`
hands a stage a copy of just its own.

A section's docstring (its first paragraph) is its `cpuft sft --help` group. A key marked
`trl=True` sets TRL SFTConfig's field of the same name as it is; where its default differs from
TRL's, cpuft.config.trl_config's `CpuftSFTConfig` reads the default from here and says why.
The adapter keys' defaults are read the same way by the PEFT side (cpuft.config.peft_config).

Limits: only the keys, types and defaults; checking values against each other is
cpuft.config.job's (resolve_config), and the machine-dependent checks are the planner's.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any

from cpuft.config.choices import (
    DatasetFormat,
    DeviceRequest,
    DtypeRequest,
    LossOn,
    OptimizerRequest,
    PeftMethod,
    QuantRequest,
)

DEFAULT_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
DEFAULT_DATASET = "GAIR/lima"
# `cpuft dpo`'s learning_rate when none is set (cpuft.config.trl_config.CpuftDPOConfig says why).
DPO_LEARNING_RATE = 5e-5


def _key(text: str, default: Any, trl: bool = False) -> Any:
    """A cpuft key; `trl`: it sets the SFTConfig field of the same name as it is."""
    return field(default=default, metadata={"help": text, "trl": trl})


def _pass_through() -> Any:
    """The library fields the job sets by name (no key of its own: each entry is one)."""
    return field(default_factory=dict)


@dataclass
class ModelSection:
    """the model: what to train"""

    model: str = _key("base model: a local directory or a Hugging Face Hub id", DEFAULT_MODEL)
    revision: str | None = _key(
        "the Hub model's revision: a branch, tag or commit hash (default: main). Used for its config,"
        " tokenizer and weights, recorded in adapter_config.json; a local directory has none", None,
    )
    trust_remote_code: bool = _key(
        "let transformers run the Python code a model repository ships (auto_map in config.json):"
        " only for code you trust, it runs on this machine", False, trl=True,
    )


@dataclass
class DataSection:
    """the data: rows, held-out fraction, length and which tokens the loss counts"""

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
    max_length: int = _key("truncate each tokenized conversation to this many tokens", 512, trl=True)
    loss_on: LossOn = _key(
        "which tokens of a conversation the loss counts: assistant (each reply and its end-of-turn"
        " token, for any chat template; prompt/completion rows: the completion) or all; plain text"
        " rows always train on every token",
        "assistant",
    )


@dataclass
class TrainingSection:
    """how long and how fast to learn (these set TRL SFTConfig's fields of the same name)"""

    max_steps: int = _key("optimizer steps; -1 means train for num_train_epochs", -1, trl=True)
    num_train_epochs: float = _key("passes over the data when max_steps is -1", 1.0, trl=True)
    learning_rate: float = _key("peak learning rate (LoRA tolerates higher rates than full FT)", 2e-4, trl=True)
    lr_scheduler_type: str = _key("transformers scheduler name (linear, cosine, constant, ...)", "cosine", trl=True)
    warmup_steps: float = _key(
        "warm-up: an int counts steps, a float < 1 is a fraction of the run", 0.03, trl=True
    )
    weight_decay: float = _key("AdamW weight decay", 0.0, trl=True)
    seed: int = _key("seed for init, data split and shuffling", 42, trl=True)
    # TRL SFTConfig fields set by name (`cpuft sft --help-trl`), typed.
    trl_args: dict[str, Any] = _pass_through()


@dataclass
class AdapterSection:
    """the adapter (these set the PEFT config's fields; `--help-peft METHOD` lists them all)"""

    # The issue calls this `peft.method`; cpuft's config is flat, so the key is `peft_method`.
    peft_method: PeftMethod = _key(
        "adapter type: lora; loha/lokr/adalora use lora_r, lora_alpha, lora_dropout and"
        " lora_target_modules too; ia3 uses lora_target_modules; prompt_tuning, prefix_tuning and"
        " p_tuning learn num_virtual_tokens virtual tokens",
        "lora",
    )
    lora_r: int = _key("LoRA rank (PEFT's r; AdaLoRA's target_r)", 16)
    lora_alpha: int = _key("LoRA scaling numerator (scale = alpha / r)", 32)
    lora_dropout: float = _key("dropout on the LoRA path", 0.05)
    lora_target_modules: str = _key(
        "'all-linear' or a comma-separated list of module names (e.g. q_proj,v_proj)", "all-linear"
    )
    num_virtual_tokens: int = _key("virtual tokens for prompt_tuning, prefix_tuning, p_tuning", 20)
    # Fields of the PEFT config of peft_method set by name (`cpuft sft --help-peft METHOD`), typed.
    peft_args: dict[str, Any] = _pass_through()


@dataclass
class HardwareSection:
    """the hardware plan ('auto' or unset: the planner chooses; `cpuft env` shows why)"""

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
    optimizer: OptimizerRequest = _key(
        "optimizer (SFTConfig's optim); auto is paged_adamw_8bit for QLoRA on CUDA, adamw_torch_fused"
        " on a CPU without quantisation, adamw_torch otherwise", "auto"
    )
    machine_type: str | None = _key(
        "GCP machine type to plan time and cost for (e.g. c3-standard-44; `cpuft plan --list-machine-types`)", None
    )


@dataclass
class EvaluationSection:
    """evaluation during training: the best checkpoint kept, early stopping"""

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


@dataclass
class OutputSection:
    """bookkeeping: the run directory, checkpoints, metrics and their durable copy"""

    output_dir: str | None = _key("run directory (default: runs/sft-<timestamp>)", None)
    save_steps: int = _key("checkpoint every N optimizer steps (resume and preemption use them)", 50, trl=True)
    save_total_limit: int = _key("keep only the newest N checkpoints", 2, trl=True)
    logging_steps: int = _key("log loss and tokens/s every N steps", 1, trl=True)
    report_to: str | list[str] = _key(
        "where metrics go besides metrics.jsonl: tensorboard, wandb, mlflow, trackio or none;"
        " a comma list for several. Offline (HF_HUB_OFFLINE=1 or no network) they log locally",
        "tensorboard", trl=True,
    )
    sync_to: str | None = _key(
        "durable copy of the run (gs://bucket/path, s3://..., a local path): every checkpoint, the"
        " metrics and the adapter are uploaded in the background; --resume restores from it",
        None,
    )


# In the order of `cpuft sft --help` and config.yaml.
SECTIONS = (
    ModelSection, DataSection, TrainingSection, AdapterSection, HardwareSection, EvaluationSection, OutputSection,
)
# The pass-through dicts: a section's fields, but not keys themselves.
PASS_THROUGH_FIELDS = ("trl_args", "peft_args")


def section_keys(section: type) -> dict[str, dataclasses.Field]:
    """The config keys of one section, in order."""
    return {f.name: f for f in dataclasses.fields(section) if f.name not in PASS_THROUGH_FIELDS}


def section_title(section: type) -> str:
    """A section's `--help` group: its docstring's first paragraph."""
    return " ".join(inspect.getdoc(section).split("\n\n")[0].split())


def key_default(name: str) -> Any:
    """cpuft's default for the key `name` (what the library-side deviations read)."""
    for section in SECTIONS:
        keys = section_keys(section)
        if name in keys:
            return keys[name].default
    raise KeyError(name)
