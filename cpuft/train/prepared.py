"""A run prepared for training: everything the preparation stage of a recipe validated and loaded
(`PreparedRun`), the input of the training stage (cpuft.train.sft.train_run) for `cpuft sft` and
`cpuft dpo` alike, and of the bench. Holds values only; nothing here loads or writes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from cpuft.data.training_set import TrainingSet
from cpuft.hardware.probe import Machine
from cpuft.planning.plan import Plan
from cpuft.planning.preflight import Preflight
from cpuft.run_dir import RunDir
from cpuft.train.distributed import World


@dataclass(frozen=True)
class PreparedRun:
    """Everything `prepare_run` validated and loaded: the input of train_run (and of the bench)."""

    job: Any  # cpuft.config.job.SFTJobConfig or DPOJobConfig
    machine: Machine
    world: World
    run_dir: RunDir
    resume: bool
    preflight: Preflight
    data: TrainingSet
    tokenizer: Any
    model: Any  # the base model as loaded, before PEFT wraps it
    model_facts: ModelFacts
    time_estimate: Any  # cpuft.planning.cloud.TimeEstimate, or None
    store: Any  # cpuft.storage.RunStore with --sync-to, else None
    started: float  # time.perf_counter() when preparation began: summary.json's wall time

    @property
    def plan(self) -> Plan:
        return self.preflight.plan

    def with_plan(self, **fields) -> PreparedRun:
        """This run under its plan with `fields` replaced (the bench measures candidates so)."""
        return replace(self, preflight=replace(self.preflight, plan=replace(self.plan, **fields)))



def quiet(*args, **kwargs) -> None:  # the log of ranks other than 0: rank 0 reports for the job
    pass
