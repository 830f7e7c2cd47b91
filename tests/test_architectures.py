"""The architecture matrix: tiny random models of the families users fine-tune, built from the real
transformers config classes, and the per-architecture facts cpuft plans with.

Expected values are written by hand from the transformers 5.24 model classes (`_supports_sdpa`)
and the architectures' module names, and the full-size parameter counts are the publishers'.
"""

from __future__ import annotations

import math

import pytest
import torch

from cpuft.errors import UserError
from cpuft.planning.architecture import (
    architecture_facts,
    attention_implementation,
    auto_model_class,
    ia3_modules,
    lora_target_modules,
    model_class,
)
from cpuft.planning.memory import model_shape
from cpuft.testing.architectures import (
    PUBLISHED_MODELS,
    TINY_ARCHITECTURES,
    build_architecture,
)

LLAMA_LINEARS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
NEOX_LINEARS = {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}  # GPT-NeoX, BLOOM, Falcon
T5_LINEARS = {"q", "k", "v", "o", "wi_0", "wi_1", "wo"}  # gated-GELU feed-forward (T5 v1.1, Flan-T5, mT5)

# name -> (PEFT task type, attention cpuft should choose, leaf names of the blocks' linear layers)
EXPECTED = {
    "llama": ("CAUSAL_LM", "sdpa", LLAMA_LINEARS),
    "qwen2": ("CAUSAL_LM", "sdpa", LLAMA_LINEARS),
    "qwen3": ("CAUSAL_LM", "sdpa", LLAMA_LINEARS),
    "mistral": ("CAUSAL_LM", "sdpa", LLAMA_LINEARS),
    "gemma2": ("CAUSAL_LM", "eager", LLAMA_LINEARS),  # Gemma2PreTrainedModel: _supports_sdpa = False
    "gemma3": ("CAUSAL_LM", "sdpa", LLAMA_LINEARS),
    "phi3": ("CAUSAL_LM", "sdpa", {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}),  # fused projections
    "gpt_neox": ("CAUSAL_LM", "sdpa", NEOX_LINEARS),
    "opt": ("CAUSAL_LM", "sdpa", {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}),
    "bloom": ("CAUSAL_LM", "eager", NEOX_LINEARS),  # BloomPreTrainedModel sets no _supports_sdpa
    "falcon": ("CAUSAL_LM", "sdpa", NEOX_LINEARS),
    "t5": ("SEQ_2_SEQ_LM", "sdpa", T5_LINEARS),
    "mt5": ("SEQ_2_SEQ_LM", "sdpa", T5_LINEARS),
}


def test_matrix_is_the_issue_list():
    assert set(TINY_ARCHITECTURES) == set(EXPECTED)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Every tiny architecture, built once: name -> model directory."""
    root = tmp_path_factory.mktemp("architectures")
    return {name: build_architecture(name, root / name) for name in TINY_ARCHITECTURES}


def _batch(tokenizer):
    text = "The capital of France is Paris."
    return torch.tensor([tokenizer(text)["input_ids"]])


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_chosen_attention_loads_trains_and_targets_every_block_linear(built, name):
    import peft
    from transformers import AutoConfig, AutoTokenizer

    expected_task, expected_attention, expected_linears = EXPECTED[name]
    path = built[name]
    config = AutoConfig.from_pretrained(path)
    facts = architecture_facts(config)
    assert (facts.task_type, facts.attention.value) == (expected_task, expected_attention)
    assert set(facts.linear_names) == expected_linears
    assert facts.target_modules.value == "all-linear"

    model = auto_model_class(config).from_pretrained(path, attn_implementation=facts.attention.value)
    assert model.config._attn_implementation == facts.attention.value
    # Every linear layer of the blocks is a multiple of 32 wide (bitsandbytes' CPU NF4 kernel).
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module is not model.get_output_embeddings():
            assert module.in_features % 32 == 0 and module.out_features % 32 == 0

    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = _batch(tokenizer)
    peft_model = peft.get_peft_model(
        model, peft.LoraConfig(r=4, target_modules=facts.target_modules.value, task_type=facts.task_type)
    )
    wrapped = {n.rsplit(".", 1)[-1] for n, m in peft_model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert wrapped == expected_linears  # all-linear: every block linear, never the output head
    output = peft_model(input_ids=ids, labels=ids)
    # A random model predicts about uniformly: loss near ln(vocab).
    assert abs(output.loss.item() - math.log(len(tokenizer))) < 1.0
    output.loss.backward()
    lora_grads = [p.grad for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert lora_grads and all(g is not None for g in lora_grads)


@pytest.mark.parametrize("name", ["gemma2", "bloom"])
def test_sdpa_is_refused_by_the_class_and_eager_is_chosen(built, name):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(built[name])
    cls = model_class(config)
    with pytest.raises(ValueError, match="scaled_dot_product_attention"):
        auto_model_class(config).from_pretrained(built[name], attn_implementation="sdpa")
    choice = attention_implementation(cls)
    assert choice.value == "eager"
    assert "does not support SDPA" in choice.reason and cls.__name__ in choice.reason
    with pytest.raises(UserError, match="supports eager"):
        attention_implementation(cls, "sdpa")


def test_requested_attention_is_checked_before_loading(built):
    from transformers import AutoConfig

    llama = model_class(AutoConfig.from_pretrained(built["llama"]))
    t5 = model_class(AutoConfig.from_pretrained(built["t5"]))
    assert attention_implementation(llama, "eager").value == "eager"
    with pytest.raises(UserError, match="T5ForConditionalGeneration does not support attn_implementation 'flash_attention_2'"):
        attention_implementation(t5, "flash_attention_2")
    with pytest.raises(UserError, match="not one cpuft knows"):
        attention_implementation(llama, "fastest")


@pytest.mark.parametrize("name", ["t5", "mt5"])
def test_seq2seq_tiny_models_are_untied_and_append_eos(built, name):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    model = AutoModelForSeq2SeqLM.from_pretrained(built[name])
    assert model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    tokenizer = AutoTokenizer.from_pretrained(built[name])
    assert tokenizer("hello")["input_ids"][-1] == tokenizer.convert_tokens_to_ids("</s>")
    assert tokenizer.chat_template is None


@pytest.mark.parametrize("name", [n for n, a in TINY_ARCHITECTURES.items() if not a.encoder_decoder])
def test_decoder_tiny_models_carry_their_family_chat_template(built, name):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(built[name])
    family = TINY_ARCHITECTURES[name].chat_family
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert "Hello." + family.end_of_turn in text
    assert tokenizer.convert_tokens_to_ids(family.end_of_turn) in tokenizer(text, add_special_tokens=False)["input_ids"]


def test_ia3_gets_explicit_modules_where_peft_has_no_default(built):
    import peft
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(built["phi3"])
    model = AutoModelForCausalLM.from_pretrained(built["phi3"])
    with pytest.raises(ValueError, match="target_modules"):
        peft.get_peft_model(model, peft.IA3Config(task_type="CAUSAL_LM"))  # PEFT 0.21 lacks phi3
    modules = ia3_modules(config)
    model = AutoModelForCausalLM.from_pretrained(built["phi3"])
    peft_model = peft.get_peft_model(model, peft.IA3Config(
        task_type="CAUSAL_LM", target_modules=list(modules.target_modules),
        feedforward_modules=list(modules.feedforward_modules),
    ))
    wrapped = {n.rsplit(".", 1)[-1] for n, m in peft_model.named_modules() if isinstance(m, peft.tuners.ia3.IA3Layer)}
    assert wrapped == {"qkv_proj", "down_proj"}


def test_requested_target_modules_are_checked_against_the_model(built):
    from transformers import AutoConfig

    llama = AutoConfig.from_pretrained(built["llama"])
    assert lora_target_modules(llama, "q_proj, v_proj").value == "q_proj,v_proj"
    with pytest.raises(UserError, match="query_key_value not among LlamaForCausalLM's linear layers"):
        lora_target_modules(llama, "query_key_value")


def test_config_without_a_language_model_class_is_a_short_user_error():
    from transformers import ViTConfig

    with pytest.raises(UserError, match="model_type 'vit'") as excinfo:
        model_class(ViTConfig())
    assert len(str(excinfo.value)) < 400  # not transformers' page-long list of config classes


@pytest.mark.parametrize("published", [pytest.param(m, id=m.hub_id) for m in PUBLISHED_MODELS])
def test_parameter_count_from_config_alone_matches_the_published_count(published):
    counted = model_shape(published.config()).total_params
    assert abs(counted - published.parameters) <= 0.01 * published.parameters, (counted, published.source)

