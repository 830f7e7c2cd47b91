"""Planning a `cpuft dpo` run: what a preference pair costs on top of an SFT row.

A DPO micro-batch of B pairs is one forward and backward over 2B sequences (prompt + chosen,
prompt + rejected, concatenated by TRL), plus the reference model's log-probs of the same 2B
sequences: with a PEFT adapter the reference is the base with the adapter disabled, so it costs a
forward, not a second copy of the weights. So:
- memory: the run is planned (and fitted) in sequences, 2 per pair, then cut back to pairs: the
  micro-batch the memory plan sized holds half as many pairs as it would SFT rows;
- time: the policy's steps over both sequences, plus the reference forward, about a third of a
  training step on the same tokens (a backward costs two forwards). Precomputed
  (`precompute_ref_log_probs`, TRL's one pass over the rows before training) it is paid once
  instead of once per epoch: it pays when the run passes over its rows more than once, and costs
  more when the run ends before one pass (it scores rows never trained). The plan decides by that
  and says why; the job's own `precompute_ref_log_probs` overrides it.

Limits: the one-third rule is FLOP-based (the measured step parts time forward and backward
together); the compact CPU head (cpu_lm_head) is SFT's loss only: DPO needs every completion
token's log-prob, which TRL computes itself.
"""

from __future__ import annotations

from dataclasses import replace

from cpuft.planning.preflight import Preflight, estimate_time, preflight

# A forward is a third of a training step's FLOPs: the backward costs two forwards.
REFERENCE_FORWARD_SHARE = 1 / 3
SEQUENCES_PER_PAIR = 2


def preference_preflight(job, machine, ranks_per_node: int = 1, nodes: int = 1) -> Preflight:
    """The preflight of a DPO job: planned and fitted in sequences, then stated in pairs."""
    asked = job.per_device_batch_size
    in_sequences = replace(job, per_device_batch_size=asked * SEQUENCES_PER_PAIR if asked else None)
    checked = preflight(in_sequences, machine, ranks_per_node, nodes)
    plan = checked.plan
    pairs = max(1, plan.per_device_batch_size // SEQUENCES_PER_PAIR)
    reasons = dict(plan.reasons)
    reasons["batch"] = (f"{pairs} pair(s) = {pairs * SEQUENCES_PER_PAIR} sequences (chosen and rejected) per"
                        f" micro-batch; {plan.reasons.get('batch', '')}").rstrip("; ")
    reasons["cpu_lm_head"] = "off: DPO scores every completion token's log-prob (TRL's own), not SFT's loss"
    plan = replace(plan, job="dpo", per_device_batch_size=pairs, cpu_lm_head=False, reasons=reasons)
    return replace(checked, plan=plan)


def with_reference_plan(checked: Preflight, train_pairs: int, job) -> Preflight:
    """`checked` with the reference log-probs planned for a run over `train_pairs` pairs: precomputed
    when the run passes over its rows more than once (the job's own precompute_ref_log_probs wins)."""
    plan = checked.plan
    passes = planned_passes(checked, train_pairs)
    if "precompute_ref_log_probs" in job.trl_args:
        precompute = bool(job.trl_args["precompute_ref_log_probs"])
        why = f"{'on' if precompute else 'off'}: set by the job"
    elif passes > 1:
        precompute = True
        why = (f"precomputed: the run passes over its rows {passes:.1f} times, so one reference pass before"
               " training replaces one per pass")
    else:
        precompute = False
        why = (f"a forward each step (adapter disabled): the run covers {passes:.2f} of a pass over its rows,"
               " so precomputing would score rows it never trains")
    reasons = {**plan.reasons, "reference": why}
    return replace(checked, plan=replace(plan, precompute_ref_log_probs=precompute, reasons=reasons))


def planned_passes(checked: Preflight, train_pairs: int) -> float:
    """How many times the run passes over its training pairs (max_steps, else num_train_epochs)."""
    if checked.max_steps > 0:
        return checked.max_steps * checked.plan.global_batch_size / max(1, train_pairs)
    return checked.num_train_epochs


def estimate_preference_time(checked: Preflight, tokens: int, mean_seq_len: float, train_pairs: int):
    """The DPO run's time: the policy's steps over `tokens` (both sequences of every pair, per pass;
    `mean_seq_len` per sequence) plus the reference forward, per pass or once when precomputed;
    None without a memory plan."""
    # Timed in sequences: a micro-batch of P pairs is 2P rows of mean_seq_len tokens.
    plan = checked.plan
    in_sequences = replace(plan, per_device_batch_size=plan.per_device_batch_size * SEQUENCES_PER_PAIR)
    estimate = estimate_time(replace(checked, plan=in_sequences), tokens, mean_seq_len)
    if estimate is None:
        return None
    passes = planned_passes(checked, train_pairs)
    reference_passes = 1.0 if checked.plan.precompute_ref_log_probs else passes
    # seconds_per_epoch is the policy's; the reference adds a third of an epoch per reference pass.
    extra_per_epoch = REFERENCE_FORWARD_SHARE * reference_passes / max(estimate.epochs, 1e-9)
    note = (f"reference log-probs: {'one pass before training' if checked.plan.precompute_ref_log_probs else 'a forward each step'}"
            f" (+{extra_per_epoch:.0%} of the policy's time)")
    return replace(estimate, seconds_per_epoch=estimate.seconds_per_epoch * (1 + extra_per_epoch),
                   notes=(*estimate.notes, note))
