"""Trainer assembly, the stage between the loaded model and `trainer.train()`: plan + data +
model -> a ready trainer, with every library patch cpuft applies, and no state kept here.

Owns, for a causal LM (`assemble_sft_trainer`):
- the adapter's PEFT config (cpuft.train.peft_methods; AdaLoRA's schedule laid over the run's
  optimizer steps; a default chat template's new token rows trained too);
- a quantised base prepared for training (PEFT's prepare_model_for_kbit_training);
- TRL's SFTTrainer with the SFTConfig the plan and the job decide (cpuft.train.trainer_args), on
  rows in cpuft's length-grouped order when the plan says so (cpuft.data.packing);
- the patches after construction: the adapter kept in the plan's adapter dtype, cpuft's CPU fast
  paths the plan turns on (its CPU_EAGER_PATHS fields, cpuft.fastpaths), the trained token rows made
  readable to TRL and saved alone, and transformers' printing callbacks removed (cpuft's
  MetricsCallback draws progress).

Inputs are what the earlier stages produced: the job (its adapter, training and output keys), the
plan, the TrainingSet, the tokenizer, the loaded base model, the run directory and the callbacks.
The seq2seq variant assembles transformers' Seq2SeqTrainer instead (cpuft.train.seq2seq).
"""

from __future__ import annotations

import math
from pathlib import Path

from cpuft.data.training_set import TrainingSet
from cpuft.planning.plan import Plan


def total_optimizer_steps(max_steps: int, num_train_epochs: float, train_rows: int, plan: Plan) -> int:
    """Optimizer steps the run will take (AdaLoRA lays its rank schedule over them)."""
    if max_steps > 0:
        return max_steps
    per_epoch = math.ceil(train_rows / plan.global_batch_size)
    return max(1, math.ceil(per_epoch * num_train_epochs))


def adapter_config(job, plan: Plan, data: TrainingSet, model):
    """The PEFT config of `job.peft_method` for this run (cpuft.train.peft_methods)."""
    from cpuft.train.peft_methods import build_peft_config, embedding_rows_to_train

    return build_peft_config(
        job, total_steps=total_optimizer_steps(job.max_steps, job.num_train_epochs, len(data.train), plan),
        task_type=plan.task_type or "CAUSAL_LM",
        trainable_tokens=embedding_rows_to_train(model, data.default_template.token_ids) if data.default_template else None,
    )


def assemble_sft_trainer(job, plan: Plan, data: TrainingSet, tokenizer, model, run_dir: Path, callbacks: list):
    """TRL's SFTTrainer for this run, patched as the plan says (see the module docstring)."""
    from trl import SFTTrainer

    from cpuft.data.packing import order_by_length
    from cpuft.train.model_loading import prepare_quantized_for_training
    from cpuft.train.trainer_args import build_sft_config

    peft_config = adapter_config(job, plan, data, model)
    trainer = SFTTrainer(
        model=prepare_quantized_for_training(model, plan),
        args=build_sft_config(job, plan, run_dir),
        train_dataset=order_by_length(data.train, plan.global_batch_size, job.seed) if plan.length_grouping else data.train,
        eval_dataset=data.eval,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )
    apply_plan_patches(trainer, plan, data)
    return trainer


def apply_plan_patches(trainer, plan: Plan, data: TrainingSet) -> None:
    """What cpuft changes in a constructed trainer, each because the plan or the data asks."""
    from transformers import PrinterCallback, ProgressCallback

    from cpuft.fastpaths import apply_fast_paths
    from cpuft.train.model_loading import keep_adapter_dtype

    keep_adapter_dtype(trainer, plan)
    if plan.cpu_lm_head:  # why: the plan's reasons["cpu_lm_head"]; proof: tests/test_chunked_loss.py
        from cpuft.fastpaths.chunked_loss import use_cpu_lm_head

        use_cpu_lm_head(trainer)
    apply_fast_paths(trainer.model, plan)
    if data.default_template is not None:
        from cpuft.train.peft_methods import let_trl_read_trained_head_rows, save_only_trained_token_rows

        let_trl_read_trained_head_rows(trainer.model)
        save_only_trained_token_rows(trainer.model)
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
