"""The `cpuft sft` recipe: LoRA / QLoRA (and the other PEFT methods) supervised fine-tuning with
TRL's SFTTrainer, planned for this machine.

The job, top to bottom (`setup()`, `train()`, `finalize()`):
1. setup: check the run directory (train.run_dir), plan the run and print the plan, its memory
   estimate and, once the data is tokenisable, its time estimate (train.preflight); validate
   and split the data (cpuft.data.prepare); load the tokenizer (a base model's without a chat
   template gets cpuft's default ChatML one and its two tokens: cpuft.data.chat_template);
   tokenise conversations with their loss mask (cpuft.data.loss_mask); load the base model as
   planned, its embedding grown for added tokens (train.model_loading). Nothing is written
   before all of that has passed.
2. train: on --resume, find the last checkpoint and trim metrics.jsonl to it; write config.yaml
   and plan.json; build the SFTTrainer (SFTConfig from train.trainer_args, the PEFT config from
   train.peft_methods, callbacks from train.callbacks) and train.
3. finalize: evaluate on the held-out split, save the adapter, draw the loss curve, write
   summary.json (train.summary), all atomically.

Features:
- the loss on what the model should learn: conversations (and prompt/completion, alpaca rows,
  which become one-turn conversations) train on the assistant's replies and their end-of-turn
  tokens only, for any chat template (`loss_on: all` trains on every token); plain text rows on
  every token. The end-of-run eval loss scores the same tokens; summary.json records the counts;
- base models without a chat template train on conversations with cpuft's default ChatML
  template; the new tokens' embedding rows are trained and saved with the adapter (PEFT's
  trainable_token_indices), so stock AutoPeftModelForCausalLM reloads it;
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
or a checkpoint, bad config or data, a model or tokenizer that will not load, a chat template
cpuft cannot mask faithfully, added tokens with a PEFT method that cannot train their rows, a
run that cannot fit in memory), always before anything is written. Anything else is a failed run (exit 1).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cpuft.artifacts import atomic_directory, atomic_write_json, write_loss_curve
from cpuft.config.job import SFTJobConfig
from cpuft.config.passthrough import loads_best_checkpoint
from cpuft.data.prepare import PreparedData, prepare_dataset
from cpuft.errors import UserError
from cpuft.hardware.probe import Machine
from cpuft.planning.plan import Plan
from cpuft.train.distributed import (
    World,
    bind_to_numa_node,
)
from cpuft.train.model_loading import (
    fit_model_to_tokenizer,
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
from cpuft.train.summary import (
    ModelFacts,
    measured_eval_loss,
    run_summary,
    trainable_parameter_count,
)

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
        self.default_template = None  # cpuft.data.chat_template.DefaultTemplate, for a tokenizer without one
        self.loss_masks = {}  # "train"/"eval" -> cpuft.data.loss_mask.LossMaskCounts (conversational rows)
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
            if bound:  # the plan gives threads per rank and why
                self.log(f"rank {self.world.rank} of {self.world.size}: bound to CPUs {bound[0]}-{bound[-1]}")
        preflight = plan_and_check_memory(config, self.machine, self.log, world=self.world)
        self.plan, self.memory_plan = preflight.plan, preflight.memory_plan
        torch.set_num_threads(self.plan.threads)
        self.data = prepare_dataset(
            config.dataset, row_format=config.dataset_format, split=config.dataset_split,
            eval_fraction=config.eval_fraction, max_samples=config.max_samples, seed=config.seed,
            revision=config.dataset_revision,
        )
        if self.plan.task_type == "SEQ_2_SEQ_LM":  # T5/mT5: prompt/target pairs (cpuft.train.seq2seq)
            from cpuft.train.seq2seq import prepare_seq2seq

            self.tokenizer, self.data, self.time_estimate = prepare_seq2seq(preflight, config, self.data, self.log)
        else:
            self.tokenizer = load_tokenizer(config.model, revision=config.revision, trust_remote_code=config.trust_remote_code)
            if "messages" in self.data.train.column_names:
                self._tokenize_conversations()
            self.time_estimate = estimate_time(preflight, config, self.data.train, self.tokenizer, self.log)
        self.model = load_model(config.model, self.plan, preflight.model_config, revision=config.revision,
                                trust_remote_code=config.trust_remote_code)
        if self.default_template is not None:
            fit_model_to_tokenizer(self.model, self.tokenizer, config.seed)
        self.model_facts = ModelFacts.of(self.model)

    def _tokenize_conversations(self) -> None:
        """Conversations -> TRL pre-tokenised rows whose loss mask follows `loss_on`
        (cpuft.data.loss_mask), train and eval alike, so the end-of-run eval loss scores the same
        tokens; a tokenizer without a chat template first gets cpuft's default one
        (cpuft.data.chat_template). Prints what the loss counts, and what in the data stops it."""
        from datasets import Dataset

        from cpuft.data.chat_template import install_default_chat_template
        from cpuft.data.loss_mask import tokenize_conversations
        from cpuft.train.peft_methods import check_can_train_new_tokens

        self.default_template = install_default_chat_template(self.tokenizer)
        if self.default_template is not None:
            check_can_train_new_tokens(self.config)
            self.log(self.default_template.describe())
        for split in ("train", "eval"):
            rows = getattr(self.data, split)
            if rows is None:
                continue
            tokenized, counts = tokenize_conversations(
                rows["messages"], self.tokenizer, self.config.loss_on, self.config.max_length,
                where=getattr(self.data, f"{split}_where"),
            )
            setattr(self.data, split, Dataset.from_list(tokenized))
            self.loss_masks[split] = counts
        train_counts = self.loss_masks["train"]
        if train_counts.conversations and train_counts.loss_tokens == 0:  # the run would take 0 steps
            raise UserError(
                f"{self.config.dataset}: no conversation has a token to train on after truncation to"
                f" max_length {self.config.max_length} (loss_on: {self.config.loss_on}); every reply lies"
                " past it. Raise --max-length, shorten the prompts, or pass --loss-on all."
            )
        self.log(train_counts.describe())
        for line in train_counts.warnings():
            self.log(f"cpuft: warning: {line}")

    def train(self) -> RunResult:
        resume_from = None
        if self.resume and self.world.is_main:
            resume_from = checkpoint_to_resume(self.run_dir)
            self.log(f"resuming from {resume_from}")
        elif self.resume:  # the checkpoint rank 0 picks; only rank 0 sets the cut-short ones aside
            from cpuft.checkpoints import newest_complete_checkpoint

            complete, _ = newest_complete_checkpoint(self.run_dir)
            resume_from = str(complete) if complete else None
        if self.world.is_main:
            write_run_header(self.run_dir, self.config, self.machine, self.plan)  # the plan holds the world
        if self.store is not None and self.world.is_main:
            from cpuft.storage import BackgroundUploader

            self.uploader = BackgroundUploader(self.store, keep_checkpoints=self.config.save_total_limit)
            for name in ("config.yaml", "plan.json"):
                self.uploader.upload_file(self.run_dir / name)
        self.trainer = self.build_trainer()
        self.trainable_params = trainable_parameter_count(self.trainer.model)
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
            # Evaluations during training may have measured the saved weights already.
            eval_loss = measured_eval_loss(self.trainer.state, loads_best_checkpoint(self.config))
            if eval_loss is None:
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
            loss_masks=self.loss_masks, default_template=self.default_template,
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
            evaluation_callbacks,
        )
        from cpuft.train.peft_methods import (
            build_peft_config,
            embedding_rows_to_train,
            let_trl_read_trained_head_rows,
            method_callbacks,
            save_only_trained_token_rows,
        )
        from cpuft.train.trainer_args import build_sft_config

        config, plan = self.config, self.plan
        adapter_config = build_peft_config(
            config, total_steps=self._total_steps(), task_type=plan.task_type or "CAUSAL_LM",
            trainable_tokens=(
                embedding_rows_to_train(self.model, self.default_template.token_ids) if self.default_template else None
            ),
        )
        self.model = prepare_quantized_for_training(self.model, plan)
        self.metrics = MetricsCallback(self.run_dir / "metrics.jsonl", show_progress=self.show_progress)
        self.signals = CheckpointOnSignal()
        callbacks = [
            self.metrics, self.signals, *method_callbacks(config), *evaluation_callbacks(config),
            *([SyncToStore(self.uploader, self.run_dir)] if self.uploader is not None else []),
        ]
        if plan.task_type == "SEQ_2_SEQ_LM":  # T5/mT5: transformers' Seq2SeqTrainer (cpuft.train.seq2seq)
            from cpuft.train.seq2seq import build_seq2seq_trainer

            trainer = build_seq2seq_trainer(
                self.model, adapter_config, config, plan, self.run_dir, self.data, self.tokenizer, callbacks
            )
        else:
            trainer = SFTTrainer(
                model=self.model,
                args=build_sft_config(config, plan, self.run_dir),
                train_dataset=(
                    order_by_length(self.data.train, plan.per_device_batch_size, config.seed)
                    if plan.length_grouping else self.data.train
                ),
                eval_dataset=self.data.eval,
                processing_class=self.tokenizer,
                peft_config=adapter_config,
                callbacks=callbacks,
            )
        keep_cpu_adapter_in_fp32(trainer, plan)
        if plan.cpu_lm_head:  # why: the plan's reasons["cpu_lm_head"]; proof: tests/test_chunked_loss.py
            from cpuft.train.chunked_loss import use_cpu_lm_head

            use_cpu_lm_head(trainer)
        if plan.fused_lora:  # why: the plan's reasons["fused_lora"]; proof: tests/test_fused_lora.py
            from cpuft.train.fused_lora import fuse_lora_layers

            fuse_lora_layers(trainer.model)
        if self.default_template is not None:
            let_trl_read_trained_head_rows(trainer.model)
            save_only_trained_token_rows(trainer.model)
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        return trainer

    def _total_steps(self) -> int:
        """Optimizer steps the run will take (AdaLoRA lays its rank schedule over them)."""
        if self.config.max_steps > 0:
            return self.config.max_steps
        per_epoch = math.ceil(len(self.data.train) / self.plan.effective_batch_size)
        return max(1, math.ceil(per_epoch * self.config.num_train_epochs))
