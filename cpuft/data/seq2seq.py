"""Rows as (prompt, target) pairs for encoder-decoder models (T5, mT5, Flan-T5, mt0, ...),
tokenised the way transformers' DataCollatorForSeq2Seq takes them.

An encoder-decoder reads the prompt with its encoder and writes the target with its decoder, so
every row must split into the two (rows as cpuft.data.formats converts them):
- prompt/completion: the prompt and the completion as they are;
- conversations (messages, LIMA): the prompt is the conversation before its last assistant turn,
  the target is that reply; earlier replies are context, not trained;
- alpaca: instruction (+ a blank line + input) and output;
- plain text has no split: refused with a UserError naming the dataset.

The prompt is rendered by the tokenizer's chat template. T5-family tokenizers have none, so
training sets `SEQ2SEQ_CHAT_TEMPLATE` on the tokenizer and saves it with the adapter: `cpuft
generate` / `chat` / `eval`, and anyone loading the adapter's tokenizer, format a prompt exactly
as training did. It renders one user turn as its text alone (a Flan-T5 instruction, a
prompt/completion row as it is); anything longer (a system message, earlier turns) as
"role: content" lines ("system: ...\\nuser: ...\\nassistant: ...\\nuser: ..."); then the
tokenizer's EOS, which T5's tokenizer appends to every input it encodes.

Labels are the target's tokens as the tokenizer encodes a target (`text_target`), ending with
EOS (appended when the tokenizer does not add it) so the model learns to stop; the collator pads
them with -100, which the loss skips. Every label counts: the loss is on the target only, by
construction.

Limits: prompt and target are each truncated to `max_length` tokens, keeping their start (the
target keeps its EOS); a prompt truncated that way loses its end, as TRL truncates causal rows.
"""

from __future__ import annotations

from cpuft.errors import UserError

# One user turn: its text alone; otherwise "role: content" lines; then EOS (see the docstring).
SEQ2SEQ_CHAT_TEMPLATE = (
    "{%- if messages | length == 1 and messages[0]['role'] == 'user' -%}"
    "{{- messages[0]['content'] -}}"
    "{%- else -%}"
    "{%- for message in messages -%}"
    "{{- message['role'] + ': ' + message['content'] -}}"
    "{%- if not loop.last -%}{{- '\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- eos_token -}}"
)
LABEL_PAD_ID = -100  # what the loss ignores (transformers' and DataCollatorForSeq2Seq's default)


def use_seq2seq_template(tokenizer) -> bool:
    """Give `tokenizer` SEQ2SEQ_CHAT_TEMPLATE unless it has a chat template; True when it was set."""
    if tokenizer.chat_template:
        return False
    tokenizer.chat_template = SEQ2SEQ_CHAT_TEMPLATE
    return True


def split_pair(row: dict) -> tuple[list[dict], str]:
    """A converted row -> (the prompt's messages, the target text)."""
    if "prompt" in row and "completion" in row:
        return [{"role": "user", "content": row["prompt"]}], row["completion"]
    messages = row["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]


def check_pairs(row_format: str, source: str) -> None:
    """UserError for data that has no prompt/target split (plain text)."""
    if row_format == "text":
        raise UserError(
            f"{source}: plain text rows ({{\"text\": ...}}) have no prompt and target, which an"
            " encoder-decoder (seq2seq) model trains on: its encoder reads the prompt, its decoder"
            " writes the target. Use prompt/completion, conversation (messages or LIMA) or alpaca"
            " rows, or a decoder-only model for plain text."
        )


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """The prompt text for `messages`: the tokenizer's chat template, SEQ2SEQ_CHAT_TEMPLATE without one."""
    return tokenizer.apply_chat_template(
        messages, chat_template=tokenizer.chat_template or SEQ2SEQ_CHAT_TEMPLATE,
        tokenize=False, add_generation_prompt=True,
    )


def tokenize_pair(tokenizer, messages: list[dict], target: str, max_length: int, token_chars: int | None = None) -> dict:
    """{"input_ids", "attention_mask", "labels"} for one pair, each truncated to `max_length`. Text
    past what the first max_length tokens come from is cut before tokenising (a huge row costs what
    max_length tokens cost; cpuft.data.loss_mask.text_start; `token_chars`: its longest_token_chars)."""
    from cpuft.data.loss_mask import text_start

    prompt_text = text_start(tokenizer, render_prompt(tokenizer, messages), max_length, token_chars)
    prompt = tokenizer(prompt_text, add_special_tokens=False, truncation=True, max_length=max_length)
    target = text_start(tokenizer, target, max_length, token_chars)
    labels = list(tokenizer(text_target=target, truncation=True, max_length=max_length)["input_ids"])
    eos = tokenizer.eos_token_id
    if not labels or labels[-1] != eos:
        labels = labels[: max_length - 1] + [eos]
    return {"input_ids": list(prompt["input_ids"]), "attention_mask": list(prompt["attention_mask"]), "labels": labels}


def tokenize_pairs(rows, tokenizer, max_length: int) -> list[dict]:
    """Every converted row of `rows` as a tokenised pair (see tokenize_pair)."""
    from cpuft.data.loss_mask import longest_token_chars

    token_chars = longest_token_chars(tokenizer) if getattr(tokenizer, "is_fast", False) else None
    return [tokenize_pair(tokenizer, *split_pair(row), max_length, token_chars) for row in rows]
