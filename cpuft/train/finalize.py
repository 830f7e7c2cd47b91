"""Finalisation, the last stage of a training run: trained trainer -> artefacts and a `Summary`.

Owns, in this order: the held-out evaluation (unless evaluations during training already measured
the weights adapter/ will hold), saving the adapter and tokenizer atomically (stock PEFT reloads
it), the loss curve, summary.json (cpuft.summary.Summary, its figures measured by
cpuft.train.summary), and with --sync-to the last uploads, waited for within a bound.

Under DDP every rank evaluates (it is a collective); rank 0 alone writes. An interrupted run
writes no adapter: its checkpoint is what --resume continues from.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cpuft.artifacts import write_loss_curve
from cpuft.run_dir import RunDir
from cpuft.summary import Summary

# Bounded waits for the background uploads at the end of a run (seconds): a Spot VM's notice
# gives ~30 s in all; a finished run can afford to wait longer.
SIGNAL_FLUSH_SECONDS = 20.0
FINAL_FLUSH_SECONDS = 600.0


@dataclass(frozen=True)
class RunResult:
    status: str  # "completed" | "interrupted" | "finished" (resumed, found done: left as it was)
    run_dir: Path
    summary: Summary | None = None  # None on a rank other than 0
    model: Any = None  # the trained (PEFT) model, for callers in this process


def finalize_run(run, trainer, metrics, interrupted: bool, trainable_params: int, uploader=None, log=print) -> RunResult:
    """Evaluate, save and summarise the trained `run` (cpuft.train.prepared.PreparedRun); `metrics`
    is its MetricsCallback, `uploader` its BackgroundUploader with --sync-to."""
    from cpuft.config.passthrough import loads_best_checkpoint
    from cpuft.train.summary import measured_eval_loss, preference_record, run_summary

    run_dir: RunDir = run.run_dir
    eval_loss = None
    if not interrupted and run.data.eval is not None:
        # Evaluations during training may have measured the saved weights already.
        eval_loss = measured_eval_loss(trainer.state, loads_best_checkpoint(run.job))
        if eval_loss is None:
            eval_loss = trainer.evaluate().get("eval_loss")  # every rank: it is a collective
    status = "interrupted" if interrupted else "completed"
    if not run.world.is_main:
        return RunResult(status, run_dir.path, model=trainer.model)
    if not interrupted:
        with run_dir.write_adapter() as tmp:
            trainer.model.save_pretrained(tmp)
            run.tokenizer.save_pretrained(tmp)
    logged = run_dir.read_metrics()
    write_loss_curve(logged, run_dir.loss_curve_file)
    summary = run_summary(
        interrupted=interrupted, run_dir=run_dir.path, config=run.job, data=run.data, plan=run.plan,
        trainer_state=trainer.state, metrics=metrics, logged=logged, eval_loss=eval_loss,
        wall_seconds=time.perf_counter() - run.started, model_facts=run.model_facts,
        trainable_params=trainable_params, memory_plan=run.preflight.memory_plan, time_estimate=run.time_estimate,
        loss_masks=run.data.loss_masks, default_template=run.data.default_template,
    )
    if run.job.kind == "dpo":
        summary = replace(summary, job="dpo", preference=preference_record(trainer, run.job))
    run_dir.write_summary(summary)
    if uploader is not None:
        _make_durable(run_dir, uploader, interrupted, log)
    return RunResult(status, run_dir.path, summary, trainer.model)


def _make_durable(run_dir: RunDir, uploader, interrupted: bool, log) -> None:
    """Upload the run's last files and wait, bounded, for every queued upload (--sync-to)."""
    if not interrupted:
        uploader.upload_directory(run_dir.adapter_dir)
    for path in (run_dir.metrics_file, run_dir.summary_file):
        uploader.upload_file(path)
    timeout = SIGNAL_FLUSH_SECONDS if interrupted else FINAL_FLUSH_SECONDS
    if uploader.close(timeout):
        log(f"synced to {uploader.store.url}")
    else:
        log(
            f"cpuft: warning: uploads to {uploader.store.url} not finished after {timeout:g} s"
            f" (pending: {', '.join(uploader.pending)}); the store keeps its older complete copies."
        )
