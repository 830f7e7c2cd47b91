"""cpuft's default chat template, for base models whose tokenizer has none.

A base model (Pythia, OPT, BLOOM, Falcon, a Llama base checkpoint, ...) has no chat template, so
conversational data could not be formatted. cpuft then uses ChatML, the layout Qwen and many
fine-tunes use:

    <|im_start|>system\\n{content}<|im_end|>\\n      (only when the conversation has one)
    <|im_start|>user\\n{content}<|im_end|>\\n
    <|im_start|>assistant\\n{content}<|im_end|>\\n
    <|im_start|>assistant\\n                         (the generation prompt)

`<|im_start|>` and `<|im_end|>` are added to the tokenizer as special tokens where it lacks them,
and `<|im_end|>` becomes its EOS, so generation stops at the end of a reply (the old EOS stays the
pad token when there was none). The trainer (cpuft.train) resizes the embedding for the new ids
and trains the two tokens' rows with the adapter (PEFT's `trainable_token_indices`); the
tokenizer, with the template, is saved with the adapter. The template has `{% generation %}` markers around each
reply and its `<|im_end|>`, so transformers' own `return_assistant_tokens_mask` agrees with
cpuft's mask (cpuft.data.loss_mask).

Limits: a tokenizer with a chat template keeps its own (never replaced). Roles are written as
given (system, user, assistant).
"""

from __future__ import annotations

from dataclasses import dataclass

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
DEFAULT_TEMPLATE_TOKENS = (IM_START, IM_END)

# transformers renders with trim_blocks: newlines are emitted inside expressions, not after tags.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class DefaultTemplate:
    """What installing the default template changed in a tokenizer."""

    added_tokens: tuple[str, ...]  # special tokens the tokenizer did not have
    token_ids: tuple[int, ...]  # ids of <|im_start|> and <|im_end|>: embedding rows to train, since
    # a base model never saw them (even where its vocabulary already had them)
    eos_token: str  # the tokenizer's EOS now (<|im_end|>)
    previous_eos_token: str | None

    def describe(self) -> str:
        added = f"added {len(self.added_tokens)} tokens ({', '.join(self.added_tokens)})" if self.added_tokens else "added 0 tokens"
        return f"no chat template: using cpuft's default ChatML template, {added}; EOS is now {self.eos_token}"


def install_default_chat_template(tokenizer) -> DefaultTemplate | None:
    """Give `tokenizer` cpuft's ChatML template (and its special tokens) if it has no template;
    None, and nothing changed, when it has one."""
    from transformers import AddedToken

    if tokenizer.chat_template:
        return None
    vocabulary = tokenizer.get_vocab()
    missing = [token for token in DEFAULT_TEMPLATE_TOKENS if token not in vocabulary]
    # normalized=False: the markers must match verbatim, never be split or lower-cased.
    tokenizer.add_tokens([AddedToken(token, special=True, normalized=False) for token in missing], special_tokens=True)
    previous_eos = tokenizer.eos_token
    if tokenizer.pad_token is None and previous_eos is not None:
        tokenizer.pad_token = previous_eos  # padding is masked; keep it off the new end-of-turn token
    tokenizer.eos_token = IM_END
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return DefaultTemplate(
        added_tokens=tuple(missing),
        token_ids=tuple(tokenizer.convert_tokens_to_ids(list(DEFAULT_TEMPLATE_TOKENS))),
        eos_token=IM_END,
        previous_eos_token=previous_eos,
    )
