"""--resume's decisions: which checkpoint a run continues from, whether there is anything left to
train, and what a failed run tells the user to resume from.

Owns: a finished run resumed is reported and left as it was (summary.json completed, adapter/
present, every planned step taken); a checkpoint that already holds every planned step (a run
killed after its last checkpoint, before its adapter was written) trains nothing and gives that
checkpoint's adapter, never step max_steps + 1; the checkpoint to continue from (rank 0 sets
aside the cut-short or corrupt ones, cpuft.run_dir); the hint a failed run prints.

The planned step count is the Trainer's own (max_steps, or the epochs' steps of this world size's
dataloader), so a config that asks for more steps continues a finished run instead. A run
resumed on another number of processes keeps its global batch (`keep_global_batch`), and a run
whose dtype the plan chose keeps the one it trained in (`keep_dtype`).
"""

from __future__ import annotations

import json
from pathlib import Path

from cpuft.train.finalize import RunResult


def planned_optimizer_steps(trainer) -> int:
    """The optimizer steps the trainer will run in all (its own count: max_steps, or the epochs'
    steps for this world size's dataloader)."""
    return trainer.set_initial_training_values(trainer.args, trainer.get_train_dataloader())[-1]


def checkpoint_to_resume(run, log) -> str | None:
    """The checkpoint --resume continues from: rank 0 picks it (setting cut-short ones aside and
    trimming metrics.jsonl); the other ranks take the newest complete one, the same."""
    if run.world.is_main:
        checkpoint = run.run_dir.checkpoint_to_resume()
        log(f"resuming from {checkpoint}")
        return checkpoint
    from cpuft.checkpoints import newest_complete_checkpoint

    complete, _ = newest_complete_checkpoint(run.run_dir.path)
    return str(complete) if complete else None


def finished_run(run, trainer) -> RunResult | None:
    """The run's result when --resume finds it already finished (summary.json says completed, its
    adapter is there, and it took every step this config plans, or early stopping ended it):
    reported, nothing written. None when there is training left."""
    summary = run.run_dir.read_summary()
    if summary is None or summary.status != "completed" or not run.run_dir.adapter_dir.is_dir():
        return None
    stopped_early = summary.evaluation is not None and summary.evaluation.stopped_early
    if summary.steps < planned_optimizer_steps(trainer) and not stopped_early:
        return None  # a longer run asked for (e.g. a higher max_steps): continue it
    return RunResult("finished", run.run_dir.path, summary if run.world.is_main else None)


def steps_done(checkpoint: str) -> int:
    """The optimizer steps a checkpoint holds (its trainer_state.json's global_step)."""
    from transformers import TrainerState

    return TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json")).global_step


def load_finished_checkpoint(trainer, checkpoint: str, metrics) -> None:
    """Put the weights and state of a checkpoint that holds every planned step into `trainer`, as
    if train() had just ended there (the best checkpoint's weights when the run keeps the best)."""
    from peft.utils import load_peft_weights, set_peft_model_state_dict
    from transformers import TrainerState

    state = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))
    weights_from = checkpoint
    if trainer.args.load_best_model_at_end and state.best_model_checkpoint and Path(state.best_model_checkpoint).is_dir():
        weights_from = state.best_model_checkpoint
    set_peft_model_state_dict(trainer.model, load_peft_weights(weights_from, device="cpu"))
    trainer.state = state
    metrics.start_step = state.global_step  # this process trained no step


def resume_hint(run) -> str:
    """What to do after a run failed mid-way: the checkpoint kept and the command that resumes."""
    from cpuft.checkpoints import newest_complete_checkpoint

    complete, _ = newest_complete_checkpoint(run.run_dir.path)
    if complete is None:
        return " No checkpoint was saved before it: start again with a lower learning_rate in a new --output-dir."
    return (f" The last good checkpoint, {complete.name}, is kept: continue from it with a lower learning rate,"
            f" e.g. cpuft sft --output-dir {run.run_dir} --resume --learning-rate {run.job.learning_rate / 10:g}")


def keep_global_batch(checked, run_dir, job, log):
    """`checked` (a Preflight) with the accumulation that keeps the resumed run's global batch
    (plan.json's) on this world size: optimizer step k trains the same rows only at the same global
    batch (cpuft.data.packing), and the Trainer skips global_step x accumulation micro-batches per
    rank. A Spot VM resumed with fewer or more processes or nodes so continues the same run.
    UserError when no whole accumulation gives it, or the job's own batch flags give another."""
    from dataclasses import replace

    from cpuft.errors import UserError

    saved = _saved_plan_value(run_dir, "global_batch_size")
    if saved is None:
        return checked  # a run from before plan.json recorded it: nothing to keep
    plan = checked.plan
    if plan.global_batch_size == saved:
        return checked
    per_step = plan.per_device_batch_size * plan.world_size
    if job.gradient_accumulation_steps is not None or saved % per_step:
        raise UserError(
            f"--resume: the run's global batch is {saved} (its {run_dir.PLAN}), but {plan.per_device_batch_size}"
            f" x {plan.gradient_accumulation_steps} accumulation x {plan.world_size} rank(s) is"
            f" {plan.global_batch_size}; the steps would train other rows. Pass --per-device-batch-size and"
            f" --gradient-accumulation-steps whose product times the ranks is {saved}."
        )
    accumulation = saved // per_step
    reason = f"{accumulation} accumulation keeps the resumed run's global batch of {saved} on {plan.world_size} rank(s)"
    log(f"resume: {reason}")
    plan = replace(plan, gradient_accumulation_steps=accumulation, reasons={**plan.reasons, "batch": reason})
    return replace(checked, plan=plan)


def _saved_plan_value(run_dir, key: str):
    """The resumed run's plan.json value of `key`; None where the file or the key is missing or unreadable."""
    try:
        return json.loads(run_dir.plan_file.read_text())["plan"][key]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def keep_dtype(checked, plan_again, job, run_dir, machine, log):
    """`checked` (a Preflight), or the job planned again by `plan_again(job)` with `dtype: auto`
    pinned to the compute dtype the resumed run trained in (its plan.json). On a native-bf16 CPU
    a small model's dtype is chosen by timing both (cpuft.planning.dtype_choice), and a busier
    moment, or DDP ranks (which keep the fixed rule), could otherwise pick the other one halfway
    through a run. Kept only where this machine runs that dtype natively: a bf16 run resumed on a
    CPU without native bf16 takes what the plan picks there."""
    from dataclasses import replace

    saved = _saved_plan_value(run_dir, "compute_dtype")
    if saved is None:
        return checked  # a run from before plan.json recorded it: the plan decides
    native = {"fp32"} | ({"bf16"} if machine.native_bf16 or machine.cuda_devices else set())
    native |= {"fp16"} if machine.cuda_devices else set()
    if job.dtype != "auto" or saved == checked.plan.compute_dtype or saved not in native:
        return checked
    reason = f"resume: {saved}, the dtype the run trained in so far (its {run_dir.PLAN}); this plan alone would pick {checked.plan.compute_dtype}"
    log(reason)
    pinned = plan_again(replace(job, dtype=saved))
    return replace(pinned, plan=replace(pinned.plan, reasons={**pinned.plan.reasons, "compute_dtype": reason}))
