"""Held-out loss: cpuft's one evaluator, used by `cpuft eval`, the bench and the tests; and the
prompt/reference split `cpuft eval` writes sample generations from.

The trainer's own end-of-run `eval_loss` comes from TRL; this scorer is built to match it on the
same rows (same tokenisation), so a reloaded adapter can be checked against the run that made it.

Limits: rows are scored in full (truncated to `max_length`), no sliding window; the logits of a
batch are held in fp32 at once (batch x length x vocabulary floats).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cpuft.errors import UserError
from cpuft.inference.loading import device_of


@dataclass(frozen=True)
class LossResult:
    loss: float  # mean next-token cross-entropy per scored token (nats)
    perplexity: float
    tokens: int  # tokens scored
    rows: int


def evaluate_loss(model, tokenizer, rows, max_length: int = 512, batch_size: int = 4,
                  assistant_only: bool = False, progress=None) -> LossResult:
    """Token-weighted mean loss and perplexity over conversational ({"messages"}) or {"text"} rows.

    Tokenised the way TRL's SFTTrainer does (chat template, no extra special tokens, truncated to
    `max_length`), so with all tokens scored it matches the trainer's eval loss on the same rows.
    `assistant_only` scores the assistant turns alone (needs `{% generation %}` in the template).
    """
    import torch

    sequences = [_tokenize_row(tokenizer, row, assistant_only, max_length) for row in rows]
    total_loss, total_tokens = 0.0, 0
    device = device_of(model)
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start:start + batch_size]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        for i, (ids, scored) in enumerate(batch):
            input_ids[i, :len(ids)] = torch.tensor(ids)
            attention[i, :len(ids)] = 1
            labels[i, :len(ids)] = torch.tensor([t if keep else -100 for t, keep in zip(ids, scored)])
        with torch.inference_mode():
            logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits.float()
        shifted = labels[:, 1:].to(device)
        loss_sum = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), shifted.reshape(-1), ignore_index=-100, reduction="sum"
        )
        total_loss += loss_sum.item()
        total_tokens += int((shifted != -100).sum())
        if progress is not None:
            progress(len(batch))
    if total_tokens == 0:
        raise UserError("no tokens to score: every row is empty after tokenisation (or has no assistant turn).")
    mean = total_loss / total_tokens
    return LossResult(mean, math.exp(mean), total_tokens, len(sequences))


def _tokenize_row(tokenizer, row: dict, assistant_only: bool, max_length: int) -> tuple[list[int], list[bool]]:
    if "messages" in row:
        out = tokenizer.apply_chat_template(
            row["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=assistant_only
        )
        ids = list(out["input_ids"])
        scored = [bool(m) for m in out["assistant_masks"]] if assistant_only else [True] * len(ids)
    else:
        ids = tokenizer(row["text"], add_special_tokens=False)["input_ids"]
        scored = [True] * len(ids)
    return ids[:max_length], scored[:max_length]


def split_prompt_reference(messages: list[dict]) -> tuple[list[dict], str]:
    """A conversation -> (everything before the last assistant turn, that turn's text)."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]
