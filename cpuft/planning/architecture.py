"""Per-architecture facts a plan needs before any weight loads: the model class transformers builds
for the config, the PEFT task type, the attention implementation and the adapter's target modules.

Each answer is a `Decision` (value + reason), read from the installed libraries rather than from a
table of model names, so a new transformers release that adds SDPA to a class changes the plan:
- model class: transformers' causal-LM mapping for decoder-only configs, its seq2seq mapping when
  `config.is_encoder_decoder` (T5, mT5, BART...);
- task type: PEFT's CAUSAL_LM or SEQ_2_SEQ_LM, from `config.is_encoder_decoder`;
- attention: "sdpa" where the class sets `_supports_sdpa` (transformers 5's own flag; Gemma 2 does
  not, for its logit soft-capping, nor does BLOOM, whose ALiBi attention has no attention
  interface), otherwise "eager", which every model has; a requested implementation is checked
  against the class's flags before anything loads;
- LoRA-family targets: PEFT's "all-linear" (every nn.Linear/Conv1D but the output layer, which
  PEFT finds through `get_output_embeddings()`), or the blocks' linear layer names when the model
  exposes no output layer; IA3 targets: PEFT's per-architecture table, or cpuft's entries for
  architectures PEFT lacks (Phi-3).

Limits: models with remote code (`auto_map`) are not looked up; flash-attention's run-time needs
(CUDA, the flash_attn package) are the planner's to check, not this module's.
"""

from __future__ import annotations

from dataclasses import dataclass

from cpuft.errors import UserError

ALL_LINEAR = "all-linear"
# attn_implementation -> the class flag transformers checks before dispatching to it.
ATTENTION_FLAGS = {
    "sdpa": "_supports_sdpa",
    "eager": None,  # every PreTrainedModel has its eager attention path
    "flex_attention": "_supports_flex_attn",
    "flash_attention_2": "_supports_flash_attn",
    "flash_attention_3": "_supports_flash_attn",
}
# IA3 needs to know which targets are feed-forward (scaled on their input, not their output).
# PEFT ships a table for most architectures; these fill its gaps, chosen as PEFT does for Llama
# (attention keys/values, the MLP down-projection as the feed-forward layer).
IA3_MODULES_PEFT_LACKS = {
    "phi3": (("qkv_proj", "down_proj"), ("down_proj",)),  # fused q/k/v: PEFT 0.21 has no phi3 entry
}


@dataclass(frozen=True)
class Decision:
    value: str
    reason: str


@dataclass(frozen=True)
class Ia3Modules:
    target_modules: tuple[str, ...]
    feedforward_modules: tuple[str, ...]
    reason: str


@dataclass(frozen=True)
class ArchitectureFacts:
    """What the plan prints and the trainer and loaders use, for one model config."""

    model_type: str
    model_class: str
    task_type: str  # PEFT TaskType name: CAUSAL_LM or SEQ_2_SEQ_LM
    attention: Decision
    target_modules: Decision
    linear_names: tuple[str, ...]  # leaf names of the blocks' linear layers (output head excluded)

    def rows(self) -> list[tuple[str, str, str]]:
        """(setting, value, reason) rows for the plan table."""
        return [
            ("model_class", self.model_class, f"transformers' class for model_type {self.model_type}"),
            ("task_type", self.task_type, "encoder-decoder" if self.task_type == "SEQ_2_SEQ_LM" else "decoder-only"),
            ("attn_implementation", self.attention.value, self.attention.reason),
            ("target_modules", self.target_modules.value, self.target_modules.reason),
        ]


def architecture_facts(config, requested_attention: str | None = None, requested_targets: str = ALL_LINEAR) -> ArchitectureFacts:
    """Every fact of this module for `config` (a transformers PretrainedConfig); builds on the meta device."""
    cls = model_class(config)
    model = _meta_model(cls, config)
    return ArchitectureFacts(
        model_type=config.model_type,
        model_class=cls.__name__,
        task_type=task_type(config),
        attention=attention_implementation(cls, requested_attention),
        target_modules=_target_modules(model, requested_targets),
        linear_names=tuple(_block_linear_names(model)),
    )


def decoder_layers_path(model) -> str | None:
    """The dotted path of `model`'s stack of decoder blocks: the first ModuleList as long as the
    config's layer count (model.layers for Llama, gpt_neox.layers, model.decoder.layers for OPT,
    transformer.h for BLOOM and Falcon); None when no ModuleList has that length. Encoder-decoder
    models have two such stacks; this names the first (the encoder's)."""
    import torch

    count = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and count and len(module) == count:
            return name
    return None


def task_type(config) -> str:
    """PEFT's task type: SEQ_2_SEQ_LM for encoder-decoder configs, CAUSAL_LM otherwise."""
    return "SEQ_2_SEQ_LM" if getattr(config, "is_encoder_decoder", False) else "CAUSAL_LM"


def auto_model_class(config):
    """The transformers Auto class that loads this config: AutoModelForSeq2SeqLM or AutoModelForCausalLM."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM if task_type(config) == "SEQ_2_SEQ_LM" else AutoModelForCausalLM


def model_class(config):
    """The model class transformers builds for `config`; a UserError when it has none for text generation."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING,
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING,
    )

    seq2seq = task_type(config) == "SEQ_2_SEQ_LM"
    mapping = MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING if seq2seq else MODEL_FOR_CAUSAL_LM_MAPPING
    auto_name = auto_model_class(config).__name__
    remote = getattr(config, "auto_map", None) or {}
    if auto_name in remote and type(config) not in mapping:
        # The repository's own class (--trust-remote-code): reading the config already allowed it.
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        return get_class_from_dynamic_module(remote[auto_name], config._name_or_path)
    try:
        return mapping[type(config)]
    except KeyError:
        kind = "encoder-decoder (seq2seq)" if seq2seq else "causal (decoder-only)"
        raise UserError(
            f"model_type '{getattr(config, 'model_type', '?')}' ({type(config).__name__}) has no"
            f" {kind} language-model class in the installed transformers, so cpuft cannot fine-tune"
            " it for text generation. Use a causal or seq2seq language model (Llama, Qwen, Gemma,"
            " Phi, OPT, BLOOM, T5, ...)."
        ) from None


def supported_attention(cls) -> tuple[str, ...]:
    """The attn_implementation values `cls` accepts, from the flags transformers checks."""
    return tuple(name for name, flag in ATTENTION_FLAGS.items() if flag is None or getattr(cls, flag, False) is True)


def attention_implementation(cls, requested: str | None = None) -> Decision:
    """SDPA where the model class supports it, eager otherwise; a requested value is checked."""
    import transformers

    supported = supported_attention(cls)
    version = transformers.__version__
    if requested is not None:
        if requested not in ATTENTION_FLAGS:
            raise UserError(
                f"attn_implementation {requested!r} is not one cpuft knows; choose one of"
                f" {', '.join(ATTENTION_FLAGS)}."
            )
        if requested not in supported:
            raise UserError(
                f"{cls.__name__} does not support attn_implementation {requested!r} in transformers"
                f" {version}; it supports {', '.join(supported)}. Leave attn_implementation unset"
                " to get the best of those."
            )
        return Decision(requested, "requested")
    if "sdpa" in supported:
        return Decision("sdpa", f"{cls.__name__} supports PyTorch SDPA: fused attention on CPU and CUDA without extra packages")
    return Decision(
        "eager",
        f"{cls.__name__} does not support SDPA in transformers {version} (_supports_sdpa is False);"
        " eager attention, which every model has, keeps the sequence x sequence scores: more"
        " activation memory",
    )


def lora_target_modules(config, requested: str = ALL_LINEAR) -> Decision:
    """The LoRA-family target_modules for `config` (builds the model on the meta device)."""
    return _target_modules(_meta_model(model_class(config), config), requested)


def ia3_modules(config) -> Ia3Modules:
    """IA3's target and feed-forward modules: PEFT's defaults where it has them, cpuft's otherwise."""
    from peft.utils import (
        TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING,
        TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
    )

    model_type = config.model_type
    if model_type in TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING:
        return Ia3Modules(
            tuple(TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING[model_type]),
            tuple(TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(model_type, ())),
            f"PEFT's IA3 defaults for {model_type}",
        )
    if model_type in IA3_MODULES_PEFT_LACKS:
        targets, feedforward = IA3_MODULES_PEFT_LACKS[model_type]
        return Ia3Modules(targets, feedforward, f"PEFT has no IA3 defaults for {model_type}: cpuft's (keys/values + MLP output)")
    names = ", ".join(_block_linear_names(_meta_model(model_class(config), config)))
    raise UserError(
        f"PEFT has no IA3 defaults for model_type '{model_type}' and neither has cpuft: set"
        f" lora_target_modules to the attention key/value and MLP output layers (this model's"
        f" linear layers: {names})."
    )


def _target_modules(model, requested: str) -> Decision:
    names = _block_linear_names(model)
    if requested != ALL_LINEAR:
        wanted = [name.strip() for name in requested.split(",") if name.strip()]
        unknown = [name for name in wanted if name not in names]
        if not wanted or unknown:
            raise UserError(
                f"lora_target_modules {requested!r}: {', '.join(unknown) or 'no names'} not among"
                f" {type(model).__name__}'s linear layers ({', '.join(names)}); list some of those"
                f" or use {ALL_LINEAR}."
            )
        return Decision(",".join(wanted), "requested")
    if model.get_output_embeddings() is not None:
        return Decision(ALL_LINEAR, f"PEFT wraps every linear layer but the output head: {', '.join(names)}")
    # PEFT finds the output layer to leave out through get_output_embeddings(); without it
    # all-linear would wrap the head too, so name the blocks' layers instead.
    return Decision(",".join(names), f"{type(model).__name__} exposes no output layer to PEFT; its blocks' linear layers")


def _meta_model(cls, config):
    import copy

    import torch

    with torch.device("meta"):  # shapes only: no storage, even for a 70B model
        return cls._from_config(copy.deepcopy(config))  # building sets fields on the config it is given


def _block_linear_names(model) -> list[str]:
    """Leaf names of the model's linear layers (nn.Linear and GPT-2's Conv1D), the output head excluded."""
    import torch
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    return sorted({
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, (torch.nn.Linear, Conv1D)) and module is not head
    })
