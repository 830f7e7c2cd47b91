"""The adapter: `peft_method` -> PEFT's own config object, and the glue a method needs to train.

Which cpuft keys set which PEFT fields, cpuft's deviations from PEFT's defaults and the
pass-through fields (`use_dora`, `use_rslora`, `modules_to_save`, ...) are
cpuft.config.passthrough's (`cpuft sft --help-peft METHOD` lists them). In short:
- lora      lora_r, lora_alpha, lora_dropout, lora_target_modules (LoraConfig)
- loha      lora_r, lora_alpha, lora_target_modules (LoHaConfig: Hadamard product of two low-rank pairs)
- lokr      lora_r, lora_alpha, lora_target_modules (LoKrConfig: Kronecker product)
- adalora   target rank lora_r (starts at 1.5 lora_r), lora_alpha, lora_dropout, lora_target_modules;
            needs the run's total steps and `AdaLoraRankAllocation`, which TRL and transformers
            do not call for you
- ia3       lora_target_modules; 'all-linear' means PEFT's per-architecture default (keys, values
            and the MLP down-projection, as in the IA3 paper), since IA3 must know which layers
            are feed-forward
- prompt_tuning, prefix_tuning, p_tuning   num_virtual_tokens

LoHa and LoKr have no input dropout (their rank/module dropouts are left at PEFT's 0).
Every method saves with `save_pretrained` and reloads with `PeftModel.from_pretrained`.
"""

from __future__ import annotations

from transformers import TrainerCallback

from cpuft.config.choices import PeftMethod, values
from cpuft.config.passthrough import (
    build_library_config,
    peft_config_class,
    peft_config_kwargs,
)
from cpuft.errors import UserError

PEFT_METHODS = values(PeftMethod)


def build_peft_config(config, total_steps: int | None = None, task_type: str = "CAUSAL_LM"):
    """PEFT config object for `config.peft_method` (a cpuft.config.job.SFTJobConfig).

    `total_steps` is required for AdaLoRA, whose rank schedule is laid out over the whole run;
    `task_type` is the model's (cpuft.planning.architecture.task_type: SEQ_2_SEQ_LM for T5/mT5).
    """
    method = config.peft_method
    if method not in PEFT_METHODS:
        raise UserError(f"unknown peft_method {method!r}: choose one of {', '.join(PEFT_METHODS)}.")
    if method == "adalora" and (not total_steps or total_steps < 1):
        raise UserError("peft_method adalora needs the run's total steps: set max_steps (or epochs with a dataset).")
    kwargs, source = peft_config_kwargs(config, total_steps or 0)
    kwargs["task_type"] = task_type
    return build_library_config(peft_config_class(method), kwargs, source, config.origins)


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
