"""The `cpuft sft` recipe: LoRA / QLoRA (and the other PEFT methods) supervised fine-tuning with
TRL's SFTTrainer, planned for this machine.

The job, top to bottom (`setup()`, `train()`, `finalize()`):
1. setup: check the run directory (train.run_dir), plan the run and print the plan, its memory
   estimate and, once the data is tokenisable, its time estimate (train.preflight); validate
   and split the data (cpuft.data.prepare); load the tokenizer and the base model as planned
   (train.model_loading). Nothing is written before all of that has passed.
2. train: on --resume, find the last checkpoint and trim metrics.jsonl to it; write config.yaml
   and plan.json; build the SFTTrainer (SFTConfig from train.trainer_args, the PEFT config from
   train.peft_methods, callbacks from train.callbacks) and train.
3. finalize: evaluate on the held-out split, save the adapter, draw the loss curve, write
   summary.json (train.summary), all atomically.

Features:
- the plan (device, dtype, threads, batch, checkpointing, packing, compile) comes with a reason
  for each choice, and every later step reads it; nothing re-probes the hardware;
- a memory estimate that stops a run which cannot fit before the weights load, with the options
  that would fit; a time (and cost, with --machine-type) estimate;
- QLoRA (bitsandbytes NF4/INT8) on CUDA and CPU; on a CPU the adapter stays fp32;
- rows length-grouped into micro-batches (cpuft.data.packing), or packed by TRL with samples
  kept apart;
- SIGTERM/SIGINT save a checkpoint after the current step and stop (status "interrupted", exit
  75 from the CLI); `--resume` continues from it, logging every step exactly once;
- summary.json reports tokens/s, peak RSS, FLOP/s and MFU next to the planned memory and time.

Run directory:
    adapter/            LoRA adapter + tokenizer (stock PEFT: AutoPeftModelForCausalLM.from_pretrained)
    config.yaml         the resolved job config (defaults < YAML < CLI)
    plan.json           the machine facts and the plan, with reasons
    metrics.jsonl       one line per log: loss, lr, grad norm, tokens, tokens/s
    tensorboard/        TensorBoard event files
    loss_curve.png      train (and eval) loss by step
    summary.json        status, steps, losses, wall time, tokens/s, peak RSS, FLOP/s, MFU
    checkpoint-N/       trainer checkpoints (every save_steps, and on SIGTERM/SIGINT)

More than one process (torchrun, `cpuft sft --nproc-per-node/--nnodes`, train.distributed): DDP
through the Trainer; rank 0 alone writes the run directory and logs; a stop signal on any rank
stops all at the same step. Limits: `--resume` across machines needs the run directory on a
shared filesystem (or restored on each node); architectures the memory estimator cannot build get no memory or time estimate.

Errors: UserError (exit 2) for bad input (an occupied output directory, --resume without a run
or a checkpoint, bad config or data, a model or tokenizer that will not load, conversational
data without a chat template, a run that cannot fit in memory), always before anything is
written. Anything else is a failed run (exit 1).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cpuft.artifacts import atomic_directory, atomic_write_json, write_loss_curve
from cpuft.config.job import SFTJobConfig
from cpuft.data.prepare import PreparedData, prepare_dataset
from cpuft.hardware.probe import Machine
from cpuft.planning.plan import Plan
from cpuft.train.distributed import (
    World,
    allreduce_bytes,
    bind_to_numa_node,
    threads_per_rank,
)
from cpuft.train.model_loading import (
    keep_cpu_adapter_in_fp32,
    load_model,
    load_tokenizer,
    prepare_quantized_for_training,
    resolve_model_path,
)
from cpuft.train.preflight import estimate_time, plan_and_check_memory
from cpuft.train.run_dir import (
    check_run_dir,
    checkpoint_to_resume,
    default_run_dir,
    read_metrics,
    write_run_header,
)
from cpuft.train.summary import ModelFacts, run_summary, trainable_parameter_count

# Bounded waits for the background uploads at the end of a run (seconds).
SIGNAL_FLUSH_SECONDS = 20.0
FINAL_FLUSH_SECONDS = 600.0


@dataclass
class RunResult:
    status: str  # "completed" | "interrupted"
    run_dir: Path
    summary: dict[str, Any] = field(default_factory=dict)


class SFTRecipe:
    """One fine-tuning job: `setup()` validates and loads, `train()` runs, `finalize()` writes."""

    def __init__(self, config: SFTJobConfig, machine: Machine, resume: bool = False, show_progress: bool = True, log=print):
        self.config = config
        self.machine = machine
        self.resume = resume
        self.show_progress = show_progress
        self.log = log
        self.run_dir = Path(config.output_dir) if config.output_dir else default_run_dir()
        self.plan: Plan | None = None
        self.data: PreparedData | None = None
        self.memory_plan = None
        self.time_estimate = None
        self.started = time.perf_counter()
        self.store = None  # cpuft.storage.RunStore with --sync-to
        self.uploader = None
        self.world = World.from_env()  # rank 0 alone writes the run directory, logs and draws progress
        if not self.world.is_main:
            self.log, self.show_progress = (lambda *a, **k: None), False

    def setup(self) -> None:
        """Validate and load everything; raises UserError before writing anything on bad input."""
        import torch

        config = self.config
        if self.world.is_main:  # the others would see rank 0's files as an occupied directory
            check_run_dir(self.run_dir, self.resume)
        if config.sync_to:
            from cpuft.storage import RunStore

            self.store = RunStore(config.sync_to)
            self.store.check_writable()  # UserError (exit 2) before anything is written
        config.model = resolve_model_path(config.model)
        if self.world.distributed:
            bound = bind_to_numa_node(self.world)
            self.config_threads_given = config.threads is not None
            if config.threads is None:  # all cores on every rank would oversubscribe them N times
                config.threads = threads_per_rank(self.machine.physical_cores, self.world.local_size)
            self.log(f"rank {self.world.rank} of {self.world.size}: {config.threads} threads"
                     f" ({self.world.local_size} ranks share {self.machine.physical_cores} physical cores)"
                     + (f", bound to CPUs {bound[0]}-{bound[-1]}" if bound else ""))
        preflight = plan_and_check_memory(config, self.machine, self.log)
        self.plan, self.memory_plan = preflight.plan, preflight.memory_plan
        torch.set_num_threads(self.plan.threads)
        self.data = prepare_dataset(
            config.dataset, row_format=config.dataset_format, split=config.dataset_split,
            eval_fraction=config.eval_fraction, max_samples=config.max_samples, seed=config.seed,
        )
        self.tokenizer = load_tokenizer(config.model, self.data.row_format)
        self.time_estimate = estimate_time(preflight, config, self.data.train, self.tokenizer, self.log)
        self.model = load_model(config.model, self.plan, preflight.model_config)
        self.model_facts = ModelFacts.of(self.model)

    def train(self) -> RunResult:
        resume_from = None
        if self.resume and self.world.is_main:
            resume_from = checkpoint_to_resume(self.run_dir)
            self.log(f"resuming from {resume_from}")
        elif self.resume:
            from transformers.trainer_utils import get_last_checkpoint

            resume_from = get_last_checkpoint(str(self.run_dir))
        if self.world.is_main:
            write_run_header(self.run_dir, self.config, self.machine, self.plan, self._world_plan())
        if self.store is not None and self.world.is_main:
            from cpuft.storage import BackgroundUploader

            self.uploader = BackgroundUploader(self.store, keep_checkpoints=self.config.save_total_limit)
            for name in ("config.yaml", "plan.json"):
                self.uploader.upload_file(self.run_dir / name)
        self.trainer = self.build_trainer()
        self.trainable_params = trainable_parameter_count(self.trainer.model)
        if self.world.distributed:
            # DDP's ring all-reduce sends and receives about 2x the fp32 gradients per step.
            self.log(f"all-reduce per optimizer step: {allreduce_bytes(self.trainable_params) / 2**20:.2f} MiB"
                     f" ({self.trainable_params:,} trainable parameters x 4 bytes x 2)")
        self.signals.install()
        try:
            self.trainer.train(resume_from_checkpoint=resume_from)
        finally:
            self.signals.uninstall()
        return self.finalize()

    def finalize(self) -> RunResult:
        interrupted = self.signals.interrupted
        eval_loss = None
        if not interrupted and self.data.eval is not None:
            eval_loss = self.trainer.evaluate().get("eval_loss")  # every rank: it is a collective
        status = "interrupted" if interrupted else "completed"
        if not self.world.is_main:
            return RunResult(status, self.run_dir)
        if not interrupted:
            with atomic_directory(self.run_dir / "adapter") as tmp:
                self.trainer.model.save_pretrained(tmp)
                self.tokenizer.save_pretrained(tmp)
        logged = read_metrics(self.run_dir / "metrics.jsonl")
        write_loss_curve(logged, self.run_dir / "loss_curve.png")
        summary = run_summary(
            interrupted=interrupted, run_dir=self.run_dir, config=self.config, data=self.data, plan=self.plan,
            trainer_state=self.trainer.state, metrics=self.metrics, logged=logged, eval_loss=eval_loss,
            wall_seconds=time.perf_counter() - self.started, model_facts=self.model_facts,
            trainable_params=self.trainable_params, memory_plan=self.memory_plan, time_estimate=self.time_estimate,
        )
        atomic_write_json(self.run_dir / "summary.json", summary)
        self._make_durable(interrupted)
        return RunResult("interrupted" if interrupted else "completed", self.run_dir, summary)

    def _make_durable(self, interrupted: bool) -> None:
        """Upload the run's last files and wait, bounded, for every queued upload (--sync-to)."""
        if self.uploader is None:
            return
        if not interrupted:
            self.uploader.upload_directory(self.run_dir / "adapter")
        for name in ("metrics.jsonl", "summary.json"):
            self.uploader.upload_file(self.run_dir / name)
        # A Spot VM's notice gives ~30 s in all; a finished run can afford to wait longer.
        timeout = SIGNAL_FLUSH_SECONDS if interrupted else FINAL_FLUSH_SECONDS
        if self.uploader.close(timeout):
            self.log(f"synced to {self.store.url}")
        else:
            self.log(
                f"cpuft: warning: uploads to {self.store.url} not finished after {timeout:g} s"
                f" (pending: {', '.join(self.uploader.pending)}); the store keeps its older complete copies."
            )

    def build_trainer(self):
        """The SFTTrainer for this job, with cpuft's callbacks (the bench builds it this way too)."""
        from transformers import PrinterCallback, ProgressCallback
        from trl import SFTTrainer

        from cpuft.data.packing import order_by_length
        from cpuft.train.callbacks import (
            CheckpointOnSignal,
            MetricsCallback,
            SyncToStore,
        )
        from cpuft.train.peft_methods import build_peft_config, method_callbacks
        from cpuft.train.trainer_args import build_sft_config

        config, plan = self.config, self.plan
        adapter_config = build_peft_config(config, total_steps=self._total_steps(), task_type=plan.task_type or "CAUSAL_LM")
        self.model = prepare_quantized_for_training(self.model, plan)
        args = build_sft_config(config, plan, self.run_dir)
        self.metrics = MetricsCallback(self.run_dir / "metrics.jsonl", show_progress=self.show_progress)
        self.signals = CheckpointOnSignal()
        trainer = SFTTrainer(
            model=self.model,
            args=args,
            train_dataset=(
                order_by_length(self.data.train, plan.per_device_batch_size, config.seed)
                if plan.length_grouping else self.data.train
            ),
            eval_dataset=self.data.eval,
            processing_class=self.tokenizer,
            peft_config=adapter_config,
            callbacks=[
                self.metrics, self.signals, *method_callbacks(config),
                *([SyncToStore(self.uploader, self.run_dir)] if self.uploader is not None else []),
            ],
        )
        keep_cpu_adapter_in_fp32(trainer, plan)
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        return trainer

    def _world_plan(self) -> dict | None:
        """The DDP facts plan.json records (None in one process)."""
        world = self.world
        if not world.distributed:
            return None
        per_rank = self.plan.effective_batch_size
        self.log(f"DDP over {world.size} ranks ({world.local_size} on this node): {self.plan.threads} threads"
                 f" per rank, per-rank batch {per_rank}, global batch {per_rank * world.size}")
        return {
            "world_size": world.size, "ranks_per_node": world.local_size, "threads_per_rank": self.plan.threads,
            "threads_reason": "requested" if self.config_threads_given
            else f"{self.machine.physical_cores} physical cores shared by {world.local_size} ranks on the node",
            "per_rank_batch_size": per_rank, "global_batch_size": per_rank * world.size,
        }

    def _total_steps(self) -> int:
        """Optimizer steps the run will take (AdaLoRA lays its rank schedule over them)."""
        if self.config.max_steps > 0:
            return self.config.max_steps
        per_epoch = math.ceil(len(self.data.train) / self.plan.effective_batch_size)
        return max(1, math.ceil(per_epoch * self.config.num_train_epochs))
