"""The adapter: one config key (`peft_method`) -> PEFT's own config object, and the glue a method needs.

Methods and which job-config keys they read:
- lora      r, alpha, dropout, target modules (LoraConfig)
- loha      r, alpha, target modules (LoHaConfig: Hadamard product of two low-rank pairs)
- lokr      r, alpha, target modules (LoKrConfig: Kronecker product)
- adalora   target rank r (starts at 1.5 r), alpha, dropout, target modules; needs the run's total
            steps and `AdaLoraRankAllocation`, which TRL and transformers do not call for you
- ia3       target modules; 'all-linear' means PEFT's per-architecture default (keys, values
            and the MLP down-projection, as in the IA3 paper), since IA3 must know which layers
            are feed-forward
- prompt_tuning, prefix_tuning, p_tuning   num_virtual_tokens

LoHa and LoKr have no input dropout (their rank/module dropouts are left at PEFT's 0).
Every method saves with `save_pretrained` and reloads with `PeftModel.from_pretrained`.
"""

from __future__ import annotations

import math

from transformers import TrainerCallback

from cpuft.config.choices import PeftMethod, values
from cpuft.errors import UserError

PEFT_METHODS = values(PeftMethod)


def _target_modules(spec: str):
    return spec if spec == "all-linear" else [name.strip() for name in spec.split(",") if name.strip()]


def build_peft_config(config, total_steps: int | None = None):
    """PEFT config object for `config.peft_method` (a SFTJobConfig or anything with its fields).

    `total_steps` is required for AdaLoRA, whose rank schedule is laid out over the whole run.
    """
    import peft

    method = config.peft_method
    targets = _target_modules(config.lora_target_modules)
    common = {"task_type": "CAUSAL_LM"}
    if method == "lora":
        return peft.LoraConfig(
            r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
            target_modules=targets, **common,
        )
    if method == "loha":
        return peft.LoHaConfig(r=config.lora_r, alpha=config.lora_alpha, target_modules=targets, **common)
    if method == "lokr":
        return peft.LoKrConfig(r=config.lora_r, alpha=config.lora_alpha, target_modules=targets, **common)
    if method == "adalora":
        if not total_steps or total_steps < 1:
            raise UserError("peft_method adalora needs the run's total steps: set max_steps (or epochs with a dataset).")
        # Prune from 1.5x the target rank; warm up for the first 10 % and freeze the ranks for the
        # last 20 % of the run (AdaLoRA's schedule), every ~5 % of the run in between.
        warmup, final = (total_steps // 10, total_steps // 5) if total_steps >= 20 else (0, 0)
        return peft.AdaLoraConfig(
            init_r=math.ceil(1.5 * config.lora_r), target_r=config.lora_r, lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout, target_modules=targets, total_step=total_steps,
            tinit=warmup, tfinal=final, deltaT=max(1, total_steps // 20), **common,
        )
    if method == "ia3":
        if targets == "all-linear":
            return peft.IA3Config(**common)  # PEFT's per-architecture default targets
        return peft.IA3Config(target_modules=targets, feedforward_modules=[], **common)
    if method == "prompt_tuning":
        return peft.PromptTuningConfig(num_virtual_tokens=config.num_virtual_tokens, **common)
    if method == "prefix_tuning":
        return peft.PrefixTuningConfig(num_virtual_tokens=config.num_virtual_tokens, **common)
    if method == "p_tuning":
        return peft.PromptEncoderConfig(num_virtual_tokens=config.num_virtual_tokens, **common)
    raise UserError(f"unknown peft_method {method!r}: choose one of {', '.join(PEFT_METHODS)}.")


def method_callbacks(config) -> list:
    """Trainer callbacks a method needs to train correctly (AdaLoRA's rank allocation)."""
    return [AdaLoraRankAllocation()] if config.peft_method == "adalora" else []


class AdaLoraRankAllocation(TrainerCallback):
    """Calls AdaLoRA's update_and_allocate after each optimizer step, before gradients are zeroed.

    AdaLoRA scores each singular value by its gradient to decide which ranks to keep; neither
    transformers' Trainer nor TRL calls it, and without it AdaLoRA is LoRA with extra parameters.
    """

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        model = _unwrap(model)
        model.base_model.update_and_allocate(state.global_step)


def _unwrap(model):
    while hasattr(model, "module") and not hasattr(model, "base_model"):
        model = model.module
    return model
