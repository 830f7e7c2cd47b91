"""The adapter: `peft_method` -> PEFT's own config object, and the glue a method needs to train.

Which cpuft keys set which PEFT fields, cpuft's deviations from PEFT's defaults and the
pass-through fields (`use_dora`, `use_rslora`, `modules_to_save`, ...) are
cpuft.config.peft_config's (`cpuft sft --help-peft METHOD` lists them). In short:
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

Tokens added to the vocabulary (cpuft's default chat template on a base model) have untrained
embedding rows: `embedding_rows_to_train` names them for PEFT's `trainable_token_indices`, which
trains and saves just those rows. Chosen over `modules_to_save=[embeddings, head]` because that
copies and trains the whole vocabulary x hidden matrices (and saves them: ~1 GB at Qwen2.5-0.5B
in fp32), and with tied embeddings (most small models) it trains two copies that drift apart;
PEFT ties the trainable rows of the input embedding to a tied output head itself, and an untied
head gets its own rows. Only methods whose config has the field (LoRA, AdaLoRA) can do this.
"""

from __future__ import annotations

from transformers import TrainerCallback

from cpuft.config.choices import PeftMethod, values
from cpuft.config.library_fields import build_library_config
from cpuft.config.peft_config import peft_config_class, peft_config_kwargs, peft_fields
from cpuft.errors import UserError

PEFT_METHODS = values(PeftMethod)


def build_peft_config(
    config, total_steps: int | None = None, task_type: str = "CAUSAL_LM",
    trainable_tokens: dict[str, list[int]] | None = None,
):
    """PEFT config object for `config.peft_method` (a cpuft.config.job.SFTJobConfig).

    `total_steps` is required for AdaLoRA, whose rank schedule is laid out over the whole run;
    `task_type` is the model's (cpuft.planning.architecture.task_type: SEQ_2_SEQ_LM for T5/mT5);
    `trainable_tokens` ({embedding module: token ids}, `embedding_rows_to_train`) trains those rows too.
    """
    method = config.peft_method
    if method not in PEFT_METHODS:
        raise UserError(f"unknown peft_method {method!r}: choose one of {', '.join(PEFT_METHODS)}.")
    if method == "adalora" and (not total_steps or total_steps < 1):
        raise UserError("peft_method adalora needs the run's total steps: set max_steps (or epochs with a dataset).")
    kwargs, source = peft_config_kwargs(config, total_steps or 0)
    kwargs["task_type"] = task_type
    if trainable_tokens:
        check_can_train_new_tokens(config)
        kwargs["trainable_token_indices"] = trainable_tokens
    return build_library_config(peft_config_class(method), kwargs, source, config.origins)


def check_can_train_new_tokens(config) -> None:
    """UserError unless `config.peft_method` can train the embedding rows of added tokens."""
    method = config.peft_method
    if "trainable_token_indices" not in peft_fields(method):
        raise UserError(
            f"the tokenizer has no chat template, so cpuft adds its default ChatML template and two"
            f" tokens whose embedding rows must be trained; peft_method {method} cannot train them"
            " (PEFT's trainable_token_indices is a LoRA/AdaLoRA field). Use --peft-method lora, a"
            " model with a chat template, or plain text data (--dataset-format text)."
        )
    if config.peft_args.get("trainable_token_indices") is not None:
        where = config.origins.get("trainable_token_indices", "trainable_token_indices")
        raise UserError(
            f"{where}: cpuft sets trainable_token_indices itself here, for the tokens its default chat"
            " template adds; remove the key (or use a model with a chat template to set it yourself)."
        )


def embedding_rows_to_train(model, token_ids) -> dict[str, list[int]]:
    """{module name: ids} for `trainable_token_indices`: the input embedding's rows, and the
    output head's too when it is not tied to the embedding (PEFT follows a tied head itself)."""
    names = {module: name for name, module in model.named_modules()}
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    rows = {names[embedding]: list(token_ids)}
    if head is not None and head.weight is not embedding.weight:
        rows[names[head]] = list(token_ids)
    return rows


def let_trl_read_trained_head_rows(model) -> None:
    """Give a head wrapped for trainable token rows the `bias` attribute TRL 1.16 reads.

    TRL's SFTTrainer computes the loss from `lm_head.weight` and `lm_head.bias` directly (its
    chunked "fused LM head"). PEFT's TrainableTokensWrapper answers `.weight` with the merged,
    differentiable weight (the trained rows included), but has no `.bias`, so training fails; the
    wrapped head's own bias (None for most models) is the right answer.
    """
    from peft.utils.other import TrainableTokensWrapper

    head = model.get_output_embeddings()
    if isinstance(head, TrainableTokensWrapper) and "bias" not in head.__dict__:
        head.bias = head.original_module.bias


def save_only_trained_token_rows(peft_model) -> None:
    """Make every save of `peft_model` (checkpoints and the final adapter) leave the resized
    embedding out.

    PEFT's save_embedding_layers="auto" saves the whole embedding and head once the vocabulary
    has grown (vocabulary x hidden floats, hundreds of MB per checkpoint at Pythia or BLOOM
    sizes); the trainable token rows hold the full trained values, not deltas, and the base's
    other rows are unchanged, so the rows are all a reload needs. The Trainer's checkpoint save
    offers no way to pass the option, hence the bound default.
    """
    import functools

    peft_model.save_pretrained = functools.partial(peft_model.save_pretrained, save_embedding_layers=False)


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
