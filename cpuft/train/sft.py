"""The `cpuft sft` recipe: supervised fine-tuning of a PEFT adapter (LoRA, QLoRA and the other
PEFT methods) with TRL's SFTTrainer, planned for this machine. Read top to bottom, it is the job.

    prepare_run(job, machine)  validate and load everything; nothing is written
      1. the run directory may be used (empty, or a run to --resume); the --sync-to store is writable
      2. preflight (cpuft.planning.preflight): plan, memory and its check, printed before loading
      3. data (cpuft.data.prepare, then the variant's tokenisation: cpuft.data.training_set for
         causal LMs, cpuft.train.seq2seq for T5/mT5) and the time estimate for its tokens
      4. the base model as planned (cpuft.train.model_loading), grown for added chat tokens
    train_run(run)             write the header, assemble the trainer, train, finalise
      5. config.yaml and plan.json (cpuft.run_dir), uploads started with --sync-to
      6. trainer assembly (cpuft.train.assembly: PEFT config, SFTConfig, the plan's patches)
      7. trainer.train(), SIGTERM/SIGINT turned into a checkpoint and a stop
      8. finalisation (cpuft.train.finalize): eval, adapter, loss curve, summary.json, last uploads

Features: the loss on the assistant's replies for any chat template (`loss_on`); cpuft's ChatML
template for base models without one; a run that cannot fit refused before the weights load;
QLoRA on CUDA and CPU; length-grouped or packed rows; --resume logs every step once; DDP through
torchrun (rank 0 alone writes; a stop signal on any rank stops all at the same step).
Limits: --resume across machines needs the run directory on a shared filesystem.

Errors: UserError (exit 2) for bad input (an occupied output directory, --resume without a run or
a checkpoint, bad config or data, a model or tokenizer that will not load, a chat template cpuft
cannot mask faithfully, added tokens with a PEFT method that cannot train their rows, a run that
cannot fit), always before anything is written. Anything else is a failed run (exit 1).
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from cpuft.config.job import SFTJobConfig
from cpuft.data.prepare import PreparedData, prepare_dataset
from cpuft.data.training_set import TrainingSet
from cpuft.errors import RunFailed
from cpuft.hardware.probe import Machine
from cpuft.planning.preflight import Preflight, check_fits, estimate_time, preflight
from cpuft.run_dir import RunDir
from cpuft.storage import open_writable_store
from cpuft.train import resume as resuming
from cpuft.train.distributed import World, bind_to_numa_node
from cpuft.train.finalize import RunResult, finalize_run
from cpuft.train.model_loading import fit_model_to_tokenizer, load_model, resolve_model_path
from cpuft.train.prepared import PreparedRun, quiet
from cpuft.train.summary import ModelFacts, trainable_parameter_count


def prepare_run(job: SFTJobConfig, machine: Machine, resume: bool = False, log=print) -> PreparedRun:
    """Steps 1-4 of the module docstring; UserError on bad input, before anything is written."""
    import torch

    started, world = time.perf_counter(), World.from_env()
    log = log if world.is_main else quiet
    run_dir = RunDir(job.output_dir) if job.output_dir else RunDir.default()
    if world.is_main:  # the others would see rank 0's files as an occupied directory
        run_dir.check_usable(resume)
    store = open_writable_store(job.sync_to)
    job = replace(job, model=resolve_model_path(job.model))
    if world.distributed and (bound := bind_to_numa_node(world)):  # the plan gives threads per rank and why
        log(f"rank {world.rank} of {world.size}: bound to CPUs {bound[0]}-{bound[-1]}")

    checked = preflight(job, machine, world.local_size, world.nodes)
    if resume:
        checked = resuming.keep_dtype(checked, lambda pinned: preflight(pinned, machine, world.local_size, world.nodes),
                                      job, run_dir, machine, log)
        checked = resuming.keep_global_batch(checked, run_dir, job, log)
    log(checked.describe() + "\n")
    check_fits(checked)
    torch.set_num_threads(checked.plan.threads)

    rows = prepare_dataset(job.dataset, row_format=job.dataset_format, split=job.dataset_split,
                           eval_fraction=job.eval_fraction, max_samples=job.max_samples, seed=job.seed,
                           revision=job.dataset_revision)
    prepare_data = _seq2seq_data if checked.plan.task_type == "SEQ_2_SEQ_LM" else _causal_data
    tokenizer, data = prepare_data(job, checked, rows, log)
    time_estimate = estimate_time(checked, data.tokens_per_epoch, data.mean_tokens_per_row)
    if time_estimate is not None:
        log(time_estimate.format())

    model = load_model(job.model, checked.plan, checked.model_config, revision=job.revision,
                       trust_remote_code=job.trust_remote_code)
    if data.default_template is not None:
        fit_model_to_tokenizer(model, tokenizer, job.seed)
    return PreparedRun(job, machine, world, run_dir, resume, checked, data, tokenizer, model, ModelFacts.of(model),
                       time_estimate, store, started)


def train_run(run: PreparedRun, show_progress: bool = True, log=print) -> RunResult:
    """Steps 5-8 of the module docstring. A resumed run that is already finished is reported and
    left as it is; one whose last checkpoint holds every planned step trains nothing and writes
    that checkpoint's adapter; a run whose weights turn NaN/inf stops with RunFailed, its last
    good checkpoint kept."""
    from cpuft.storage import BackgroundUploader
    from cpuft.train import callbacks as cb
    from cpuft.train.peft_methods import method_callbacks

    main = run.world.is_main
    log, show_progress = (log, show_progress) if main else (quiet, False)
    metrics = cb.MetricsCallback(run.run_dir.metrics_file, show_progress=show_progress)
    signals, finite = cb.CheckpointOnSignal(), cb.StopOnNonFiniteWeights()
    callbacks = [metrics, signals, *method_callbacks(run.job), *cb.evaluation_callbacks(run.job), finite]
    trainer = build_trainer(run, callbacks)  # writes nothing: a finished run stays as it was
    resume_from = None
    if run.resume:
        finished = resuming.finished_run(run, trainer)
        if finished is not None:
            return finished
        resume_from = resuming.checkpoint_to_resume(run, log)
    uploader = None
    if main:
        run.run_dir.write_header(run.job, run.machine, run.plan)  # the plan holds the world
        uploader = BackgroundUploader.for_run(run.store, run.run_dir, run.job.save_total_limit) if run.store else None
        if uploader is not None:
            trainer.add_callback(cb.SyncToStore(uploader, run.run_dir.path))
    trainable_params = trainable_parameter_count(trainer.model)
    if resume_from is not None and resuming.steps_done(resume_from) >= (planned := resuming.planned_optimizer_steps(trainer)):
        log(f"{resume_from} holds all {planned} planned steps: nothing to train; its adapter becomes the run's.")
        resuming.load_finished_checkpoint(trainer, resume_from, metrics)
        return finalize_run(run, trainer, metrics, False, trainable_params, uploader, log)
    signals.install()
    try:
        trainer.train(resume_from_checkpoint=resume_from)
    finally:
        signals.uninstall()
    if finite.failure is not None:
        if uploader is not None:
            uploader.close(0)
        raise RunFailed(finite.failure + resuming.resume_hint(run))
    return finalize_run(run, trainer, metrics, signals.interrupted, trainable_params, uploader, log)


def build_trainer(run: PreparedRun, callbacks: list):
    """Step 6: TRL's SFTTrainer, Seq2SeqTrainer (seq2seq), or DPOTrainer (cpuft.train.dpo)."""
    if run.job.kind == "dpo":
        from cpuft.train.dpo import assemble_dpo_trainer as assemble
    elif run.plan.task_type == "SEQ_2_SEQ_LM":
        from cpuft.train.seq2seq import assemble_seq2seq_trainer as assemble
    else:
        from cpuft.train.assembly import assemble_sft_trainer as assemble
    return assemble(run.job, run.plan, run.data, run.tokenizer, run.model, run.run_dir.path, callbacks)


def _causal_data(job: SFTJobConfig, checked: Preflight, rows: PreparedData, log) -> tuple[Any, TrainingSet]:
    """The tokenizer, given cpuft's ChatML template when conversations need one it lacks, and the
    rows tokenised with their loss mask."""
    from cpuft.data.chat_template import install_default_chat_template
    from cpuft.data.training_set import is_conversational, tokenize_for_causal_lm
    from cpuft.train.model_loading import load_tokenizer
    from cpuft.train.peft_methods import check_can_train_new_tokens

    tokenizer = load_tokenizer(job.model, revision=job.revision, trust_remote_code=job.trust_remote_code)
    template = install_default_chat_template(tokenizer) if is_conversational(rows) else None
    if template is not None:
        check_can_train_new_tokens(job)
        log(template.describe())
    return tokenizer, tokenize_for_causal_lm(rows, tokenizer, job.loss_on, job.max_length, template, log)


def _seq2seq_data(job: SFTJobConfig, checked: Preflight, rows: PreparedData, log) -> tuple[Any, TrainingSet]:
    """The encoder-decoder variant: prompt/target pairs (cpuft.train.seq2seq)."""
    from cpuft.train.seq2seq import check_seq2seq_job, load_seq2seq_tokenizer, tokenize_for_seq2seq

    check_seq2seq_job(job, rows, checked.model_config.model_type)
    tokenizer = load_seq2seq_tokenizer(job, log)
    return tokenizer, tokenize_for_seq2seq(rows, tokenizer, job.max_length)
