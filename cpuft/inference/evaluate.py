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

    Tokenised the way `cpuft sft` hands rows to TRL's SFTTrainer (chat template, no extra special
    tokens, truncated to `max_length`), so it matches the trainer's eval loss on the same rows:
    `assistant_only` scores each reply and its end-of-turn token alone, masked as training masks
    them with the default loss_on (cpuft.data.loss_mask: any chat template, no `{% generation %}`
    markers needed); otherwise every token.
    """
    import torch

    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):  # T5/mT5: the target, given the prompt
        return _seq2seq_loss(model, tokenizer, rows, max_length, batch_size, progress)
    sequences = [_tokenize_row(tokenizer, row, assistant_only, max_length, f"row {i}") for i, row in enumerate(rows, 1)]
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
        # Prompt and p-tuning adapters put virtual tokens before the row, and their logits too: the
        # last virtual token predicts the row's first token, which PEFT's own loss counts as well.
        virtual = logits.shape[1] - width
        predicted, targets = (logits[:, virtual - 1:-1], labels) if virtual else (logits[:, :-1], labels[:, 1:])
        targets = targets.to(device)
        loss_sum = torch.nn.functional.cross_entropy(
            predicted.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
        )
        total_loss += loss_sum.item()
        total_tokens += int((targets != -100).sum())
        if progress is not None:
            progress(len(batch))
    if total_tokens == 0:
        raise UserError("no tokens to score: every row is empty after tokenisation (or has no assistant turn).")
    mean = total_loss / total_tokens
    return LossResult(mean, math.exp(mean), total_tokens, len(sequences))


def _tokenize_row(tokenizer, row: dict, assistant_only: bool, max_length: int, where: str) -> tuple[list[int], list[bool]]:
    if "messages" in row:
        from cpuft.data.loss_mask import tokenize_conversations

        loss_on = "assistant" if assistant_only else "all"
        rows, _ = tokenize_conversations([row["messages"]], tokenizer, loss_on, where=[where])
        ids, scored = rows[0]["input_ids"], [bool(m) for m in rows[0]["assistant_masks"]]
    else:
        ids = tokenizer(row["text"], add_special_tokens=False)["input_ids"]
        scored = [True] * len(ids)
    return ids[:max_length], scored[:max_length]


def _seq2seq_loss(model, tokenizer, rows, max_length: int, batch_size: int, progress) -> LossResult:
    """Mean loss per target token of an encoder-decoder: each row's prompt and target tokenised and
    padded as `cpuft sft` trains them (cpuft.data.seq2seq, DataCollatorForSeq2Seq), every target
    token scored (EOS included)."""
    import torch
    from transformers import DataCollatorForSeq2Seq

    from cpuft.data.seq2seq import LABEL_PAD_ID, tokenize_pairs

    pairs = tokenize_pairs(rows, tokenizer, max_length)
    collate = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=LABEL_PAD_ID)
    total_loss, total_tokens = 0.0, 0
    device = device_of(model)
    for start in range(0, len(pairs), batch_size):
        batch = {k: v.to(device) for k, v in collate(pairs[start:start + batch_size]).items()}
        with torch.inference_mode():  # the model shifts the labels right into its decoder inputs
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).logits
        total_loss += torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1),
            ignore_index=LABEL_PAD_ID, reduction="sum",
        ).item()
        total_tokens += int((batch["labels"] != LABEL_PAD_ID).sum())
        if progress is not None:
            progress(len(batch["labels"]))
    if total_tokens == 0:
        raise UserError("no tokens to score: no row has a target.")
    mean = total_loss / total_tokens
    return LossResult(mean, math.exp(mean), total_tokens, len(pairs))


def split_prompt_reference(messages: list[dict]) -> tuple[list[dict], str]:
    """A conversation -> (everything before the last assistant turn, that turn's text)."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]
