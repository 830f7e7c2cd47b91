"""Training one bench variant and measuring it, the same way for every variant.

Measured: non-padding tokens/s (TRL's `num_tokens`: the attention-mask sum), the median
optimizer-step time (the first step excluded: warm-up), peak RSS, the padding fraction of the
training batches, the final train loss (mean of the last quarter of steps), the held-out loss
(cpuft.inference.evaluate, sample by sample in fp32 with autocast off, so no variant's dtype or
padding changes the yardstick) and the useful FLOP/s (cpuft.train.summary).

`--job dpo` (spec "job": "dpo"): tokens are both sequences of every pair (TRL's `num_tokens`
counts prompt + chosen and prompt + rejected), useful FLOPs add the reference forward to the
policy's training step, and the held-out measure is TRL's own: `trainer.evaluate` on the
held-out pairs (eval_rewards/accuracies, eval_rewards/margins and the DPO loss), each trainer
in the dtype it trained in (what its user would see), at the same eval batch.

Limits: step times come from the log timestamps (logging every step), so they include the
callbacks' own small cost. A DPO run that precomputes its reference log-probs does so before
training, outside train_seconds (the bench's one-epoch runs do not: the plan turns it on from
more than one pass, and the record says which).
"""

from __future__ import annotations

import statistics
from pathlib import Path


class CountingCollator:
    """Wraps the trainer's collator to count padded and real tokens in every training batch."""

    def __init__(self, inner):
        self.inner = inner
        self.slots = 0
        self.real = 0

    def __call__(self, examples):
        batch = self.inner(examples)
        self.slots += batch["input_ids"].numel()
        if "attention_mask" in batch:
            self.real += int(batch["attention_mask"].sum())
        else:  # padding-free: one flattened row, padded only to pad_to_multiple_of
            self.real += int(sum(len(e["input_ids"]) for e in examples))
        return batch

    @property
    def padding_fraction(self) -> float | None:
        return 1.0 - self.real / self.slots if self.slots else None


def train_and_measure(trainer, spec: dict, model_facts: dict, plan_facts: dict) -> dict:
    """Train `trainer` for the spec's steps; the variant's measured numbers (bench.json's per-run record)."""
    import torch

    from cpuft.bench.data import read_jsonl
    from cpuft.hardware.usage import peak_rss_bytes
    from cpuft.inference.evaluate import evaluate_loss
    from cpuft.train.callbacks import MetricsCallback
    from cpuft.train.summary import (
        ModelFacts,
        trainable_parameter_count,
        useful_flops_per_token,
    )

    run_dir = Path(spec["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics = MetricsCallback(run_dir / "bench_metrics.jsonl", show_progress=False)
    trainer.add_callback(metrics)
    counter = CountingCollator(trainer.data_collator)
    trainer.data_collator = counter
    trainer.train()

    trainable = trainable_parameter_count(trainer.model)
    logs = [r for r in metrics.records if "loss" in r]
    step_times = [b["elapsed_seconds"] - a["elapsed_seconds"] for a, b in zip(logs, logs[1:])]
    tokens = metrics.train_tokens
    seconds = metrics.train_seconds
    dpo = spec.get("job") == "dpo"
    # Sequences trained: a DPO pair is two (prompt + chosen, prompt + rejected).
    sequences = trainer.state.global_step * spec["batch_size"] * spec["accumulation"] * (2 if dpo else 1)
    mean_seq_len = tokens / max(1, sequences)
    facts = ModelFacts(**model_facts)
    flops_per_token = useful_flops_per_token(facts, trainable, mean_seq_len)
    if dpo and not plan_facts.get("precompute_ref_log_probs"):
        flops_per_token += reference_forward_flops_per_token(facts, mean_seq_len)
    tail = [r["loss"] for r in logs[-max(1, len(logs) // 4):]]
    if dpo:
        held_out = held_out_preference_metrics(trainer, spec["eval"])
    else:
        # One sample at a time (no padding), eval mode (no LoRA dropout), fp32 (autocast off): the
        # same yardstick for every variant, whatever dtype it trained in.
        trainer.model.eval()
        with torch.autocast("cpu", enabled=False):
            held_out = {"eval_loss": evaluate_loss(trainer.model, trainer.processing_class, read_jsonl(spec["eval"]),
                                                   spec["max_length"], batch_size=1).loss}
    return {
        "variant": spec["variant"], **plan_facts, **model_facts, "trainable_params": trainable,
        "steps": trainer.state.global_step, "epochs": trainer.state.epoch, "train_tokens": tokens, "train_seconds": seconds,
        "tokens_per_second": tokens / seconds,
        "median_step_seconds": statistics.median(step_times) if step_times else seconds,
        "first_step_seconds": logs[0]["elapsed_seconds"] if logs else None,
        "padding_fraction": counter.padding_fraction,
        "first_loss": logs[0]["loss"] if logs else None,
        "final_loss": statistics.fmean(tail) if tail else None,
        **held_out,
        "flops_per_token": flops_per_token,
        "achieved_flops_per_second": flops_per_token * tokens / seconds,
        "peak_rss_bytes": peak_rss_bytes(),
        "torch_threads": torch.get_num_threads(),
    }



def reference_forward_flops_per_token(facts, mean_seq_len: float) -> float:
    """Matmul FLOPs per token of the DPO reference's forward (cpuft.planning.flops' convention:
    2 per weight, attention 4 * L * h * s)."""
    return 2.0 * facts.linear_params + 4.0 * facts.num_layers * facts.hidden_size * mean_seq_len


def held_out_preference_metrics(trainer, eval_path: str) -> dict:
    """TRL's own evaluation of the trained DPO adapter on the held-out pairs: reward accuracy (the
    share of pairs whose implicit reward ranks chosen above rejected), reward margin, DPO loss."""
    from datasets import Dataset

    from cpuft.bench.data import read_jsonl

    rows = read_jsonl(eval_path)
    if trainer.args.train_sampling_strategy == "group_by_length":  # transformers groups the eval batches too
        from cpuft.bench.baselines import pair_token_count

        rows = [{**row, "length": pair_token_count(row, trainer.processing_class)} for row in rows]
    metrics = trainer.evaluate(eval_dataset=Dataset.from_list(rows))
    return {"eval_reward_accuracy": metrics["eval_rewards/accuracies"],
            "eval_reward_margin": metrics["eval_rewards/margins"],
            "eval_loss": metrics["eval_loss"], "eval_pairs": len(rows)}
