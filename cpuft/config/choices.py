"""The allowed values of cpuft's enumerated settings, defined once.

The config dataclass annotates its fields with these `Literal` types (so YAML, flags and --help
all list the same values); the planner, the memory estimate and the inference commands read the
same types with `values(...)`. Config sits at the bottom of the flow, so everyone may import it.
"""

from __future__ import annotations

import typing
from typing import Literal

DeviceRequest = Literal["auto", "cpu", "cuda"]
DtypeRequest = Literal["auto", "fp32", "bf16", "fp16"]
QuantRequest = Literal["auto", "none", "nf4", "int8"]
Quantization = Literal["none", "nf4", "int8"]
DatasetFormat = Literal["auto", "lima", "messages", "prompt_completion", "alpaca", "text"]
# Which tokens the loss counts on conversational rows (cpuft.data.loss_mask).
LossOn = Literal["assistant", "all"]
PeftMethod = Literal["lora", "loha", "lokr", "ia3", "adalora", "prompt_tuning", "prefix_tuning", "p_tuning"]
# Where training metrics go besides metrics.jsonl (transformers' reporting integrations that
# cpuft runs offline-safe: cpuft.config.reporting checks them, cpuft.train.trainer_args sets
# their offline modes).
ReportIntegration = Literal["tensorboard", "wandb", "mlflow", "trackio", "none"]
OptimizerName = Literal["adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "sgd"]
OptimizerRequest = Literal["auto", "adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "sgd"]


def values(literal) -> tuple[str, ...]:
    """The allowed values of a Literal type, in declaration order (for argparse `choices`)."""
    return typing.get_args(literal)
