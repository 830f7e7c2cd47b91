"""Measuring what a training run did, and how much of the machine it used (MFU), for summary.json.

Owns: the base model's facts that FLOP counting needs (taken before PEFT adds its layers), the
useful FLOPs per trained token, and measuring the figures of the Summary (cpuft.summary, the file
format) `cpuft sft` writes and prints.

MFU counts useful work only: the forward, backward and adapter-gradient matmuls and attention
(cpuft.planning.flops), not gradient checkpointing's recompute, against the plan's peak FLOP/s.
Tokens are non-padding tokens (TRL's `num_tokens`) of this process's steps, so a resumed run
reports its own throughput: prompt tokens included, as the model reads them, though with
loss_on assistant only the replies carry loss (`loss_mask` counts those).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cpuft.checkpoints import checkpoint_step
from cpuft.run_dir import RunDir
from cpuft.summary import DefaultChatTemplateRecord, EvaluationRecord, LossMaskRecord, PreferenceRecord, Summary


@dataclass(frozen=True)
class ModelFacts:
    linear_params: int  # weights in matmuls, the output head included (cpuft.planning.flops)
    total_params: int
    num_layers: int
    hidden_size: int

    @classmethod
    def of(cls, model) -> "ModelFacts":
        """The facts of a base model; call it before PEFT wraps the model (or LoRA counts twice)."""
        from cpuft.planning.flops import linear_parameter_count

        return cls(
            linear_params=linear_parameter_count(model),
            total_params=sum(p.numel() for p in model.parameters()),
            num_layers=model.config.num_hidden_layers,
            hidden_size=model.config.hidden_size,
        )


def trainable_parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def useful_flops_per_token(facts: ModelFacts, trainable_params: int, mean_seq_len: float) -> float:
    """Matmul FLOPs per trained token of an adapter run, checkpointing's recompute left out."""
    from cpuft.planning.flops import training_flops_per_token

    return training_flops_per_token(
        facts.linear_params, trainable_params, facts.num_layers, facts.hidden_size, mean_seq_len,
        full_finetune=False, gradient_checkpointing=False,
    )


def evaluation_summary(config, trainer_state, interrupted: bool) -> EvaluationRecord | None:
    """What evaluation during training (eval_steps) found: the best checkpoint (lowest eval_loss)
    and its loss, whether adapter/ holds it, and whether early stopping ended the run. None
    without eval_steps."""
    from cpuft.config.passthrough import loads_best_checkpoint

    if config.eval_steps is None:
        return None
    best = trainer_state.best_model_checkpoint
    loads_best = loads_best_checkpoint(config)
    return EvaluationRecord(
        eval_steps=config.eval_steps,
        evaluations=len(logged_eval_losses(trainer_state)),
        best_checkpoint=best,
        best_eval_loss=logged_eval_losses(trainer_state).get(checkpoint_step(Path(best).name)) if best else None,
        adapter_is_best_checkpoint=bool(loads_best and best and not interrupted),
        # Before max_steps without a stop signal: only the EarlyStoppingCallback ends a run so.
        stopped_early=bool(config.early_stopping_patience is not None and not interrupted
                           and trainer_state.global_step < trainer_state.max_steps),
    )


def logged_eval_losses(trainer_state) -> dict[int, float]:
    """{step: eval_loss} of the evaluations the Trainer ran (its log_history: every rank has it)."""
    return {entry["step"]: entry["eval_loss"] for entry in trainer_state.log_history if "eval_loss" in entry}


def measured_eval_loss(trainer_state, loads_best: bool) -> float | None:
    """The saved adapter's eval loss when training already measured it (so the run need not
    evaluate again): the best checkpoint's when it is loaded at the end, else the last step's
    evaluation; None when no evaluation measured those weights."""
    losses = logged_eval_losses(trainer_state)
    best = trainer_state.best_model_checkpoint
    if loads_best and best:
        return losses.get(checkpoint_step(Path(best).name))
    return losses.get(trainer_state.global_step)


def loss_counted(loss_on: str, task_type: str | None, loss_masks: dict, has_eval: bool) -> dict:
    """Which tokens the train (and eval) loss counted, and how many: the Summary's loss_counted,
    loss_mask, eval_loss_counted and eval_loss_mask fields."""
    if task_type == "SEQ_2_SEQ_LM":
        counted = "target tokens"  # the decoder writes only the target (cpuft.train.seq2seq)
    elif "train" not in loss_masks:
        counted = "all tokens (plain text rows)"
    else:
        counted = "assistant tokens" if loss_on == "assistant" else "all tokens"
    return {
        "loss_counted": counted,
        "loss_mask": LossMaskRecord.from_dict(loss_masks["train"].to_dict()) if "train" in loss_masks else None,
        # trainer.evaluate() scores the held-out rows tokenised and masked like the training rows
        "eval_loss_counted": counted if has_eval else None,
        "eval_loss_mask": LossMaskRecord.from_dict(loss_masks["eval"].to_dict()) if "eval" in loss_masks else None,
    }


def run_summary(
    *, interrupted: bool, run_dir: Path, config, data, plan, trainer_state, metrics, logged: list[dict],
    eval_loss: float | None, wall_seconds: float, model_facts: ModelFacts, trainable_params: int,
    memory_plan=None, time_estimate=None, loss_masks: dict | None = None, default_template=None,
) -> Summary:
    """The run's Summary (summary.json). `metrics` is the run's MetricsCallback, `logged` every
    record of metrics.jsonl (earlier processes of a resumed run included); `loss_masks` the train/eval
    cpuft.data.loss_mask.LossMaskCounts of conversational rows, `default_template` the
    cpuft.data.chat_template.DefaultTemplate a tokenizer without a template got."""
    from cpuft.hardware.usage import peak_rss_bytes

    losses = [(m["step"], m["loss"]) for m in logged if "loss" in m]
    steps_this_run = trainer_state.global_step - metrics.start_step
    samples = max(1, steps_this_run) * plan.effective_batch_size
    tokens = metrics.train_tokens
    flops_per_token = useful_flops_per_token(model_facts, trainable_params, tokens / samples)
    seconds = metrics.train_seconds or 1e-9
    achieved = flops_per_token * tokens / seconds
    peak_rss = peak_rss_bytes()
    return Summary(
        status="interrupted" if interrupted else "completed",
        run_dir=str(run_dir),
        model=config.model,
        dataset=config.dataset,
        dataset_format=data.row_format,
        train_rows=len(data.train),
        eval_rows=len(data.eval) if data.eval is not None else 0,
        device=plan.device,
        dtype=plan.compute_dtype,
        quantization=plan.quantization,
        threads=plan.threads,
        steps=trainer_state.global_step,
        max_steps=trainer_state.max_steps,
        steps_this_run=steps_this_run,
        first_loss=losses[0][1] if losses else None,
        final_loss=losses[-1][1] if losses else None,
        eval_loss=eval_loss,
        wall_seconds=round(wall_seconds, 2),
        train_seconds=round(metrics.train_seconds, 2),
        train_tokens=tokens,
        train_tokens_per_second=round(tokens / seconds, 1),
        peak_rss_bytes=peak_rss,
        peak_rss_mib=round(peak_rss / 2**20, 1),
        total_params=model_facts.total_params,
        trainable_params=trainable_params,
        flops_per_token=flops_per_token,
        achieved_flops_per_second=achieved,
        peak_flops_per_second=plan.peak_flops,
        mfu=achieved / plan.peak_flops if plan.peak_flops else None,
        adapter_dir=None if interrupted else str(RunDir(run_dir).adapter_dir),
        revision=config.revision,
        dataset_revision=config.dataset_revision,
        trust_remote_code=config.trust_remote_code,
        evaluation=evaluation_summary(config, trainer_state, interrupted),
        **loss_counted(config.loss_on, plan.task_type, loss_masks or {}, data.eval is not None),
        default_chat_template=DefaultChatTemplateRecord(
            added_tokens=tuple(default_template.added_tokens),
            trained_token_ids=tuple(default_template.token_ids),
            eos_token=default_template.eos_token,
        ) if default_template is not None else None,
        # Predicted next to measured, so users can see how far to trust `cpuft plan`.
        planned_memory_bytes=memory_plan.total_bytes if memory_plan is not None else None,
        planned_train_seconds=round(time_estimate.total_seconds, 3) if time_estimate is not None else None,
        peak_gpu_memory_bytes=_peak_gpu_memory_bytes() if plan.device == "cuda" else None,
    )


def _peak_gpu_memory_bytes() -> int:
    import torch

    return torch.cuda.max_memory_allocated()


def preference_record(trainer, job):
    """summary.json's `preference` record of a `cpuft dpo` run: the last held-out evaluation's
    reward accuracy and margin (TRL's eval_rewards/*), beta, the loss, and where the policy started."""
    evaluated = [entry for entry in trainer.state.log_history if "eval_rewards/accuracies" in entry]
    last = evaluated[-1] if evaluated else {}
    loss_type = trainer.args.loss_type
    from_run = RunDir(job.model).config_file.is_file()  # cpuft.train.dpo.starting_point reads it so too
    return PreferenceRecord(
        eval_reward_accuracy=last.get("eval_rewards/accuracies"), eval_reward_margin=last.get("eval_rewards/margins"),
        beta=trainer.args.beta, loss_type=",".join(loss_type) if isinstance(loss_type, list) else str(loss_type),
        starting_point=str(Path(job.model).resolve()) if from_run else "base model",
    )
