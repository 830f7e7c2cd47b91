"""Assistant-only loss for chat templates without generation markers (cpuft/data/loss_mask.py).

Released templates (ChatML/Qwen2.5, Llama-3, Gemma 3, plus Gemma 2, Phi-3 and Mistral) on tiny
tokenizers with their special tokens. The check is independent of the code under test: the
trained token spans, decoded, must be exactly the replies written below, each followed by its
end-of-turn token, and nothing else; the token ids must be the tokenizer's own chat encoding.
"""

from __future__ import annotations

import pytest

from cpuft.data.loss_mask import mask_assistant_tokens, tokenize_conversations
from cpuft.errors import UserError
from cpuft.testing.chat_templates import (
    CHATML,
    FAMILIES,
    GEMMA3,
    LLAMA3,
    chat_tokenizer,
)
from cpuft.testing.tiny_model import sample_texts, train_tokenizer

SYSTEM = "You answer in one short sentence."
QUESTION_1 = "What is the capital of France?"
REPLY_1 = "The capital of France is Paris."
QUESTION_2 = "And how many people live there?"
REPLY_2 = "About 2.1 million people live in Paris itself."
CONVERSATION = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": QUESTION_1},
    {"role": "assistant", "content": REPLY_1},
    {"role": "user", "content": QUESTION_2},
    {"role": "assistant", "content": REPLY_2},
]


@pytest.fixture(scope="module")
def texts():
    return sample_texts()


def trained_spans(tokenizer, ids, mask) -> list[str]:
    """The decoded runs of consecutive trained tokens."""
    spans, run = [], []
    for token, trained in zip(ids, mask, strict=True):
        if trained:
            run.append(token)
        elif run:
            spans.append(tokenizer.decode(run))
            run = []
    if run:
        spans.append(tokenizer.decode(run))
    return spans


@pytest.mark.parametrize("family", [CHATML, LLAMA3, GEMMA3], ids=lambda f: f.name)
def test_only_replies_and_their_end_of_turn_tokens_are_trained(texts, family):
    tokenizer = chat_tokenizer(family, texts)
    rows, counts = tokenize_conversations([CONVERSATION], tokenizer)
    ids, mask = rows[0]["input_ids"], rows[0]["assistant_masks"]

    assert ids == tokenizer.apply_chat_template(CONVERSATION, tokenize=True)["input_ids"]
    expected = [REPLY_1 + family.end_of_turn, REPLY_2 + family.end_of_turn]
    assert trained_spans(tokenizer, ids, mask) == expected
    # Everything else — system, user turns, role headers, BOS, newlines after the end of turn — is masked.
    masked_text = tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if not m])
    for text in (SYSTEM, QUESTION_1, QUESTION_2):
        assert text in masked_text
    assert REPLY_1 not in masked_text and REPLY_2 not in masked_text
    expected_tokens = sum(len(tokenizer(span, add_special_tokens=False)["input_ids"]) for span in expected)
    assert (counts.loss_tokens, counts.tokens, counts.conversations) == (expected_tokens, len(ids), 1)
    assert counts.turns_without_end_token == 0


@pytest.mark.parametrize("name", ["gemma2", "phi3", "mistral"])
def test_other_released_templates(texts, name):
    """Gemma 2 and Mistral take no system turn; Mistral has no generation prompt; Phi-3 ends a
    finished conversation with <|endoftext|>, which is not part of any reply."""
    family = FAMILIES[name]
    tokenizer = chat_tokenizer(family, texts)
    conversation = CONVERSATION if family.supports_system else CONVERSATION[1:]
    masked = mask_assistant_tokens(conversation, tokenizer)
    assert masked.input_ids == tokenizer.apply_chat_template(conversation, tokenize=True)["input_ids"]
    assert trained_spans(tokenizer, masked.input_ids, masked.assistant_masks) == [
        REPLY_1 + family.end_of_turn, REPLY_2 + family.end_of_turn,
    ]


def test_agrees_with_transformers_generation_markers(texts):
    """cpuft's tiny-model template has {% generation %} markers around reply + <|im_end|>: transformers'
    own assistant mask is then an independent oracle for the turn-by-turn mask."""
    tokenizer = train_tokenizer(texts, 512)
    oracle = tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_assistant_tokens_mask=True)
    masked = mask_assistant_tokens(CONVERSATION, tokenizer)
    assert masked.input_ids == oracle["input_ids"]
    assert masked.assistant_masks == oracle["assistant_masks"]
    assert sum(masked.assistant_masks) > 0


def test_trl_turns_the_masks_into_labels(texts, tmp_path):
    """The rows go to TRL 1.16's SFTTrainer as pre-tokenised data: -100 exactly where the mask is 0."""
    import torch
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    tokenizer = chat_tokenizer(LLAMA3, texts)
    rows, _ = tokenize_conversations([CONVERSATION, CONVERSATION[:3]], tokenizer)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, pad_token_id=tokenizer.pad_token_id,
    ))
    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[], max_length=512)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    prepared = {tuple(row["input_ids"]): row["labels"] for row in trainer.train_dataset}
    for row in rows:
        labels = prepared[tuple(row["input_ids"])]
        assert labels == [t if m else -100 for t, m in zip(row["input_ids"], row["assistant_masks"], strict=True)]


def test_loss_on_all_and_truncation_counts(texts):
    tokenizer = chat_tokenizer(CHATML, texts)
    full_length = len(tokenizer.apply_chat_template(CONVERSATION, tokenize=True)["input_ids"])
    rows, counts = tokenize_conversations([CONVERSATION], tokenizer, loss_on="all")
    assert rows[0]["assistant_masks"] == [1] * full_length
    assert (counts.loss_tokens, counts.tokens) == (full_length, full_length)

    # Cut inside the system turn: no reply token is left, TRL will drop the row.
    rows, counts = tokenize_conversations([CONVERSATION], tokenizer, max_length=5)
    assert len(rows[0]["input_ids"]) == 5
    assert counts.to_dict() == {
        "loss_on": "assistant", "conversations": 1, "tokens": 5, "loss_tokens": 0, "loss_token_fraction": 0.0,
        "conversations_without_loss_tokens": 1, "truncated_conversations": 1, "turns_without_end_token": 0,
    }


def test_template_without_end_of_turn_token_trains_what_the_turn_adds(texts):
    tokenizer = chat_tokenizer(CHATML, texts)
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] + ':\\n' + m['content'] + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant:\\n' }}{% endif %}"
    )
    masked = mask_assistant_tokens(CONVERSATION, tokenizer)
    assert trained_spans(tokenizer, masked.input_ids, masked.assistant_masks) == [REPLY_1 + "\n", REPLY_2 + "\n"]
    assert masked.turns_without_end_token == 2


def test_generation_prompt_that_merges_with_the_reply_is_refused(texts):
    # "assistant: " + "The" tokenises as "assistant:" + " The" inside the conversation: the prompt
    # the model sees at inference (ending in " ") would differ from the one it was trained on.
    tokenizer = chat_tokenizer(CHATML, texts)
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    with pytest.raises(UserError, match="message 3 \\(assistant\\): the generation prompt .* tokenises differently alone"):
        mask_assistant_tokens(CONVERSATION, tokenizer)


def test_template_that_is_not_prefix_stable_is_refused(texts):
    # Modelled on Qwen3 with enable_thinking=False: the generation prompt opens an empty think
    # block, but earlier replies are rendered without one.
    tokenizer = chat_tokenizer(CHATML, texts)
    tokenizer.chat_template = (
        "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    )
    with pytest.raises(UserError, match=r"chat\.jsonl:7, message 3 \(assistant\): the chat template is not prefix-stable"):
        tokenize_conversations([CONVERSATION], tokenizer, where=["chat.jsonl:7"])


def test_template_errors_and_rewritten_replies_are_user_errors(texts):
    gemma2 = chat_tokenizer(FAMILIES["gemma2"], texts)
    with pytest.raises(UserError, match="conversation 1: the chat template failed on the whole conversation: System role not supported"):
        tokenize_conversations([CONVERSATION], gemma2)

    shouting = chat_tokenizer(CHATML, texts)
    shouting.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] | upper + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    with pytest.raises(UserError, match="message 3 \\(assistant\\): the chat template does not render this reply's text verbatim"):
        mask_assistant_tokens(CONVERSATION, shouting)

    with pytest.raises(UserError, match="message 2 \\(user\\): 'content' must be a string"):
        mask_assistant_tokens([{"role": "system", "content": "x"}, {"role": "user", "content": None}], shouting)


def base_tokenizer(texts):
    """A base model's tokenizer: no chat template, and none of ChatML's tokens."""
    from cpuft.testing.tiny_model import train_bpe_tokenizer

    return train_bpe_tokenizer(texts, 512, ["<|endoftext|>"], pad_token="<|endoftext|>", eos_token="<|endoftext|>")


def test_default_template_for_a_base_tokenizer(texts):
    from cpuft.data.chat_template import install_default_chat_template

    tokenizer = base_tokenizer(texts)
    assert tokenizer.chat_template is None and len(tokenizer) == 512
    installed = install_default_chat_template(tokenizer)
    assert installed.added_tokens == ("<|im_start|>", "<|im_end|>")
    assert installed.token_ids == (512, 513) and len(tokenizer) == 514
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert installed.describe().startswith("no chat template: using cpuft's default ChatML template, added 2 tokens")

    rendered = tokenizer.apply_chat_template(CONVERSATION[1:3], tokenize=False, add_generation_prompt=False)
    assert rendered == (f"<|im_start|>user\n{QUESTION_1}<|im_end|>\n<|im_start|>assistant\n{REPLY_1}<|im_end|>\n")
    # Each marker is one token, whole, wherever it stands.
    assert tokenizer("<|im_start|>user", add_special_tokens=False)["input_ids"][0] == 512

    rows, counts = tokenize_conversations([CONVERSATION], tokenizer)
    ids, mask = rows[0]["input_ids"], rows[0]["assistant_masks"]
    assert trained_spans(tokenizer, ids, mask) == [REPLY_1 + "<|im_end|>", REPLY_2 + "<|im_end|>"]
    # The template's {% generation %} markers make transformers' own mask an independent oracle.
    oracle = tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_assistant_tokens_mask=True)
    assert ids == oracle["input_ids"] and mask == oracle["assistant_masks"]
    assert counts.turns_without_end_token == 0

    chat = chat_tokenizer(CHATML, texts)  # a tokenizer with a template keeps it, unchanged
    before = (chat.chat_template, len(chat), chat.eos_token)
    assert install_default_chat_template(chat) is None
    assert (chat.chat_template, len(chat), chat.eos_token) == before


def test_counts_describe_what_the_loss_counts(texts):
    tokenizer = chat_tokenizer(CHATML, texts)
    _, assistant = tokenize_conversations([CONVERSATION], tokenizer)
    _, everything = tokenize_conversations([CONVERSATION], tokenizer, loss_on="all")
    share = 100 * assistant.loss_tokens / assistant.tokens
    assert assistant.describe() == f"loss on: assistant tokens ({assistant.loss_tokens} of {assistant.tokens} tokens, {share:.1f} %)"
    assert everything.describe() == f"loss on: all tokens ({everything.tokens} tokens in 1 conversations)"
    assert assistant.warnings() == []
    _, cut = tokenize_conversations([CONVERSATION], tokenizer, max_length=5)
    assert cut.warnings() == [
        "1 of 1 conversations have no assistant token left after truncation to max_length, so they"
        " train nothing; raise max_length or shorten their prompts"
    ]


class UniformLogits:
    """A stand-in model whose logits are all 0: every token costs ln(vocabulary) nats."""

    VOCAB = 600
    config = type("Config", (), {"is_encoder_decoder": False})()

    def parameters(self):
        import torch

        yield torch.zeros(1)

    def __call__(self, input_ids, attention_mask):
        import torch

        return type("Out", (), {"logits": torch.zeros(*input_ids.shape, self.VOCAB)})()


def test_cpuft_eval_assistant_only_scores_the_training_mask(texts):
    """`cpuft eval --assistant-only` scores each reply and its end-of-turn token: the tokens the
    Llama-3 template (no generation markers) gives the replies, counted here by hand."""
    import math

    from cpuft.inference.evaluate import evaluate_loss

    tokenizer = chat_tokenizer(LLAMA3, texts)
    rows = [{"messages": CONVERSATION}, {"messages": CONVERSATION[:3]}]
    reply_tokens = [len(tokenizer(reply, add_special_tokens=False)["input_ids"]) + 1 for reply in (REPLY_1, REPLY_2)]
    scored = evaluate_loss(UniformLogits(), tokenizer, rows, assistant_only=True)
    assert scored.tokens == sum(reply_tokens) + reply_tokens[0]
    assert scored.loss == pytest.approx(math.log(UniformLogits.VOCAB))
    every = evaluate_loss(UniformLogits(), tokenizer, rows)
    lengths = [len(tokenizer.apply_chat_template(r["messages"], tokenize=True)["input_ids"]) for r in rows]
    assert every.tokens == sum(n - 1 for n in lengths)  # every token but each row's first is predicted
