"""Chat templates of released models, copied from their tokenizer_config.json, with the special
tokens each one needs: fixtures for the tiny architecture models and the loss-mask tests.

None of them has `{% generation %}` markers, as none of the released ones do; that is what makes
them a fair test of cpuft's own assistant-token mask (cpuft/data/loss_mask.py).
Each template is the published text, tool-calling branches included: the template users train with.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ChatFamily:
    """A released chat format: its Jinja template and the tokens the tokenizer must know whole."""

    name: str
    source: str  # the model whose tokenizer_config.json the template was copied from
    template: str
    special_tokens: tuple[str, ...]
    pad_token: str
    eos_token: str  # the token that ends an assistant turn, so generation stops there
    bos_token: str | None = None
    end_of_turn: str = ""  # the token the template writes after each assistant reply
    supports_system: bool = True


# Qwen/Qwen2.5-0.5B-Instruct (ChatML with Qwen's default system prompt and tool calls).
QWEN25_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# meta-llama/Meta-Llama-3-8B-Instruct.
LLAMA3_TEMPLATE = (
    r"""{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"""
)

# google/gemma-2-2b-it: no system role, strict user/model alternation.
GEMMA2_TEMPLATE = (
    r"""{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"""
)

# google/gemma-3-1b-it: the system message is folded into the first user turn.
GEMMA3_TEMPLATE = r"""{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

# microsoft/Phi-3-mini-4k-instruct: a finished conversation ends with <|endoftext|>, which the
# same conversation followed by another turn does not have.
PHI3_TEMPLATE = (
    r"""{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"""
)

# mistralai/Mistral-7B-Instruct-v0.1: no generation prompt (a prompt ends with [/INST]), no system role.
MISTRAL_TEMPLATE = (
    r"""{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"""
)

CHATML = ChatFamily(
    name="chatml", source="Qwen/Qwen2.5-0.5B-Instruct", template=QWEN25_TEMPLATE,
    special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
    pad_token="<|endoftext|>", eos_token="<|im_end|>", end_of_turn="<|im_end|>",
)
LLAMA3 = ChatFamily(
    name="llama3", source="meta-llama/Meta-Llama-3-8B-Instruct", template=LLAMA3_TEMPLATE,
    special_tokens=("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                    "<|eot_id|>", "<|finetune_right_pad_id|>"),
    pad_token="<|finetune_right_pad_id|>", eos_token="<|eot_id|>", bos_token="<|begin_of_text|>",
    end_of_turn="<|eot_id|>",
)
GEMMA2 = ChatFamily(
    name="gemma2", source="google/gemma-2-2b-it", template=GEMMA2_TEMPLATE,
    special_tokens=("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"),
    pad_token="<pad>", eos_token="<end_of_turn>", bos_token="<bos>", end_of_turn="<end_of_turn>",
    supports_system=False,
)
GEMMA3 = ChatFamily(
    name="gemma3", source="google/gemma-3-1b-it", template=GEMMA3_TEMPLATE,
    special_tokens=("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"),
    pad_token="<pad>", eos_token="<end_of_turn>", bos_token="<bos>", end_of_turn="<end_of_turn>",
)
PHI3 = ChatFamily(
    name="phi3", source="microsoft/Phi-3-mini-4k-instruct", template=PHI3_TEMPLATE,
    special_tokens=("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
    # Phi-3's eos_token is <|endoftext|>; its generation config also stops at <|end|>.
    pad_token="<|endoftext|>", eos_token="<|endoftext|>", end_of_turn="<|end|>",
)
MISTRAL = ChatFamily(
    name="mistral", source="mistralai/Mistral-7B-Instruct-v0.1", template=MISTRAL_TEMPLATE,
    special_tokens=("<unk>", "<s>", "</s>"),
    pad_token="<unk>", eos_token="</s>", bos_token="<s>", end_of_turn="</s>", supports_system=False,
)

FAMILIES = {family.name: family for family in (CHATML, LLAMA3, GEMMA2, GEMMA3, PHI3, MISTRAL)}


def chat_tokenizer(family: ChatFamily, texts, vocab_size: int = 512):
    """A tiny byte-level BPE tokenizer with `family`'s special tokens and chat template."""
    from cpuft.testing.tiny_model import train_bpe_tokenizer

    return train_bpe_tokenizer(
        texts, vocab_size, special_tokens=list(family.special_tokens), pad_token=family.pad_token,
        eos_token=family.eos_token, bos_token=family.bos_token, chat_template=family.template,
    )
