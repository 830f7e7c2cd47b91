"""summary.json as a typed value: `Summary`, what one training run did and how much of the machine
it used.

Owns the file format. `Summary.to_dict()` writes exactly the keys summary.json has always had:
flat (the evaluation record's keys sit beside the others), in this order, and the keys that only
some runs have (evaluation during training, a held-out loss mask, cpuft's default chat template,
the planned memory and time, CUDA's peak memory) only when they apply. `Summary.from_dict()` reads
the summary.json of any cpuft: a key it lacks reads as the field's default (None, 0, "" or False),
a key this version does not know is kept in `other` and written back as it was.

How the figures are measured is cpuft.train.summary's business; where the file lives, and writing
it atomically, cpuft.run_dir's. Nothing here imports more than the standard library.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any


def _known_values(cls, data: dict) -> dict[str, Any]:
    """The values in `data` of `cls`'s fields; a field `data` lacks keeps its default."""
    return {f.name: data[f.name] for f in fields(cls) if f.name in data}


@dataclass(frozen=True)
class LossMaskRecord:
    """Which tokens of the conversational rows the loss counted, after truncation to max_length:
    cpuft.data.loss_mask.LossMaskCounts.to_dict(), as summary.json holds it."""

    loss_on: str = ""
    conversations: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    loss_token_fraction: float = 0.0
    conversations_without_loss_tokens: int = 0
    truncated_conversations: int = 0
    turns_without_end_token: int = 0

    @classmethod
    def from_dict(cls, data: dict) -> LossMaskRecord:
        return cls(**_known_values(cls, data))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class DefaultChatTemplateRecord:
    """cpuft's ChatML template, given to a tokenizer that had none (cpuft.data.chat_template)."""

    added_tokens: tuple[str, ...] = ()  # special tokens the tokenizer did not have
    trained_token_ids: tuple[int, ...] = ()  # their embedding rows, trained and saved with the adapter
    eos_token: str = ""

    @classmethod
    def from_dict(cls, data: dict) -> DefaultChatTemplateRecord:
        values = _known_values(cls, data)
        for name in ("added_tokens", "trained_token_ids"):
            if name in values:
                values[name] = tuple(values[name])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {"added_tokens": list(self.added_tokens), "trained_token_ids": list(self.trained_token_ids),
                "eos_token": self.eos_token}


@dataclass(frozen=True)
class EvaluationRecord:
    """What evaluation during training (eval_steps) found; only such runs have it. summary.json
    holds these keys beside the others, not nested."""

    eval_steps: int = 0
    evaluations: int = 0
    best_checkpoint: str | None = None  # the checkpoint-N with the lowest eval_loss
    best_eval_loss: float | None = None
    adapter_is_best_checkpoint: bool = False  # adapter/ holds the best checkpoint's weights
    stopped_early: bool = False  # early stopping ended the run before max_steps

    @classmethod
    def from_dict(cls, data: dict) -> EvaluationRecord:
        return cls(**_known_values(cls, data))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class PreferenceRecord:
    """A `cpuft dpo` run's held-out preference figures, from TRL's DPOTrainer evaluation: how often
    the adapter's implicit reward ranks chosen above rejected, and by how much on average."""

    eval_reward_accuracy: float | None = None  # eval_rewards/accuracies
    eval_reward_margin: float | None = None  # eval_rewards/margins
    beta: float | None = None
    loss_type: str | None = None
    starting_point: str | None = None  # "base model" or the SFT run directory it started from

    @classmethod
    def from_dict(cls, data: dict) -> PreferenceRecord:
        return cls(**_known_values(cls, data))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# Fields written only when set (None means the run has no such figure, never "unknown").
_ONLY_WHEN_SET = ("eval_loss_mask", "default_chat_template", "planned_memory_bytes", "planned_train_seconds",
                  "peak_gpu_memory_bytes", "preference")
_RECORDS = {"loss_mask": LossMaskRecord, "eval_loss_mask": LossMaskRecord,
            "default_chat_template": DefaultChatTemplateRecord, "preference": PreferenceRecord}


@dataclass(frozen=True)
class Summary:
    """One run's summary.json. Field order is the file's key order."""

    status: str = ""  # "completed" | "interrupted"
    run_dir: str = ""
    model: str = ""
    dataset: str = ""
    dataset_format: str = ""  # the row format detected or given (cpuft.data.formats)
    train_rows: int = 0
    eval_rows: int = 0
    device: str = ""  # the plan's: "cpu" | "cuda"
    dtype: str = ""  # the plan's compute dtype
    quantization: str = ""  # "none" | "nf4" | "int8"
    threads: int = 0
    steps: int = 0  # the trainer's global step (a resumed run's earlier steps included)
    max_steps: int = 0
    steps_this_run: int = 0  # steps this process took
    first_loss: float | None = None  # the first and last logged train loss (earlier processes included)
    final_loss: float | None = None
    eval_loss: float | None = None  # the saved adapter's loss on the held-out rows
    wall_seconds: float = 0.0
    train_seconds: float = 0.0
    train_tokens: int = 0  # non-padding tokens of this process's steps
    train_tokens_per_second: float = 0.0
    peak_rss_bytes: int = 0
    peak_rss_mib: float = 0.0
    total_params: int = 0
    trainable_params: int = 0
    flops_per_token: float = 0.0  # useful matmul FLOPs per trained token (cpuft.train.summary)
    achieved_flops_per_second: float = 0.0
    peak_flops_per_second: float | None = None  # the plan's peak; None where it is not known
    mfu: float | None = None
    adapter_dir: str | None = None  # None for an interrupted run
    revision: str | None = None
    dataset_revision: str | None = None
    trust_remote_code: bool = False
    evaluation: EvaluationRecord | None = None  # runs with eval_steps only
    loss_counted: str = ""  # "assistant tokens", "all tokens", ...
    loss_mask: LossMaskRecord | None = None  # None for rows that are not conversations
    eval_loss_counted: str | None = None  # None without held-out rows
    eval_loss_mask: LossMaskRecord | None = None
    default_chat_template: DefaultChatTemplateRecord | None = None
    planned_memory_bytes: int | None = None  # cpuft's estimate, next to the measured peak RSS
    planned_train_seconds: float | None = None  # cpuft's estimate, next to train_seconds
    peak_gpu_memory_bytes: int | None = None  # CUDA runs only
    job: str = "sft"  # "sft" | "dpo": the command that trained the run
    preference: PreferenceRecord | None = None  # `cpuft dpo` runs only
    other: dict[str, Any] = field(default_factory=dict)  # keys a newer cpuft wrote, kept as they were

    def to_dict(self) -> dict[str, Any]:
        """summary.json's record: the keys and values cpuft has always written."""
        record: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "other":
                record.update(value)
            elif f.name == "evaluation":
                record.update(value.to_dict() if value is not None else {})
            elif f.name in _ONLY_WHEN_SET and value is None:
                continue
            else:
                record[f.name] = value.to_dict() if f.name in _RECORDS and value is not None else value
        return record

    @classmethod
    def from_dict(cls, data: dict) -> Summary:
        """A summary.json record of any cpuft version (see the module docstring)."""
        flat = {f.name for f in fields(cls)} - {"evaluation", "other"}  # the keys that name a field
        values = {name: value for name, value in data.items() if name in flat}
        for name, record in _RECORDS.items():
            if name in values:
                values[name] = record.from_dict(values[name]) if isinstance(values[name], dict) else None
        if "eval_steps" in data:  # written with the rest of the evaluation record, or not at all
            values["evaluation"] = EvaluationRecord.from_dict(data)
        known = flat | {f.name for f in fields(EvaluationRecord)}
        values["other"] = {name: value for name, value in data.items() if name not in known}
        return cls(**values)

    @classmethod
    def parse(cls, text: str | bytes) -> Summary | None:
        """The Summary in summary.json's text; None when it is not a JSON object (a file cut short
        by an older cpuft that wrote it in place, or not a summary at all)."""
        try:
            data = json.loads(text)
        except ValueError:
            return None
        return cls.from_dict(data) if isinstance(data, dict) else None
