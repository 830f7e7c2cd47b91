"""Data preparation, the stage between the preflight and the trainer: rows -> tokenised train and
eval sets with their loss masks.

Owns, for a causal LM (`tokenize_for_causal_lm`):
- tokenising conversations with the loss mask `loss_on` asks for (cpuft.data.loss_mask), train
  and eval alike, so the end-of-run eval loss scores the same tokens; plain text rows, which TRL
  tokenises itself, pass through cut short where they run far past max_length (TRL truncates
  them to it anyway, after tokenising the whole row: a 50 MB row would take gigabytes);
- refusing a run that would train on nothing (every reply past max_length) and saying what the
  loss counts and what in the data stops it;
- the token count the time plan needs (tokens per epoch, mean tokens per row).

Inputs: the validated, split rows (cpuft.data.prepare.PreparedData), the tokenizer (given cpuft's
default ChatML template by cpuft.data.chat_template when it had none: `default_template`) and the
two data keys that shape tokens (loss_on, max_length). It neither loads a model nor writes a file.
The seq2seq variant tokenises prompt/target pairs instead (cpuft.train.seq2seq).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cpuft.data.loss_mask import longest_token_chars, text_start
from cpuft.data.prepare import PreparedData
from cpuft.errors import UserError


@dataclass(frozen=True)
class TrainingSet:
    """What a trainer reads: tokenised (or TRL-ready) train and eval rows, with their facts."""

    train: Any  # datasets.Dataset
    eval: Any | None
    source: str  # the dataset as given (a path, a Hub id, 'sample')
    row_format: str
    num_rows: int  # rows read, before the split
    tokens_per_epoch: int  # trained tokens in one pass over `train` (truncated to max_length)
    mean_tokens_per_row: float
    # "train"/"eval" -> cpuft.data.loss_mask.LossMaskCounts, for conversational rows.
    loss_masks: dict[str, Any] = field(default_factory=dict)
    default_template: Any = None  # cpuft.data.chat_template.DefaultTemplate the tokenizer was given, or None

    def describe(self) -> str:
        held_out = len(self.eval) if self.eval is not None else 0
        return f"data: {self.source} ({self.row_format}), {len(self.train)} train / {held_out} eval rows"


def is_conversational(rows: PreparedData) -> bool:
    return "messages" in rows.train.column_names


def _cut_long_texts(dataset, tokenizer, max_length: int):
    """`dataset` (plain text rows) with each text cut past what its first max_length tokens come
    from (cpuft.data.loss_mask.text_start): the tokens training sees are unchanged, and tokenising
    a huge row costs what max_length tokens cost. The same dataset when no row is that long."""
    if dataset is None or max_length is None or "text" not in dataset.column_names:
        return dataset
    from datasets import Dataset

    token_chars = longest_token_chars(tokenizer)
    texts = list(dataset["text"])
    cut = [text_start(tokenizer, text, max_length, token_chars) for text in texts]
    if all(a is b for a, b in zip(cut, texts, strict=True)):
        return dataset
    columns = dataset.to_dict()
    columns["text"] = cut
    return Dataset.from_dict(columns, features=dataset.features)


def tokenize_for_causal_lm(rows: PreparedData, tokenizer, loss_on: str, max_length: int, default_template=None,
                           log=print) -> TrainingSet:
    """`rows` ready for TRL's SFTTrainer on a causal LM (see the module docstring); UserError when
    no conversation keeps a token to train on after truncation."""
    from datasets import Dataset

    from cpuft.data.loss_mask import tokenize_conversations

    train, held_out, loss_masks = rows.train, rows.eval, {}
    if is_conversational(rows):
        tokenized = {}
        for split, split_rows, where in (("train", rows.train, rows.train_where), ("eval", rows.eval, rows.eval_where)):
            if split_rows is None:
                continue
            records, loss_masks[split] = tokenize_conversations(
                split_rows["messages"], tokenizer, loss_on, max_length, where=where,
            )
            tokenized[split] = Dataset.from_list(records)
        train, held_out = tokenized["train"], tokenized.get("eval")
        counts = loss_masks["train"]
        if counts.conversations and counts.loss_tokens == 0:  # the run would take 0 steps
            raise UserError(
                f"{rows.source}: no conversation has a token to train on after truncation to"
                f" max_length {max_length} (loss_on: {loss_on}); every reply lies"
                " past it. Raise --max-length, shorten the prompts, or pass --loss-on all."
            )
        log(counts.describe())
        for line in counts.warnings():
            log(f"cpuft: warning: {line}")
    else:
        train, held_out = (_cut_long_texts(split, tokenizer, max_length) for split in (rows.train, rows.eval))
    tokens, per_row = tokens_per_epoch(train, tokenizer, max_length)
    return TrainingSet(
        train=train, eval=held_out, source=rows.source, row_format=rows.row_format, num_rows=rows.num_rows,
        tokens_per_epoch=tokens, mean_tokens_per_row=per_row, loss_masks=loss_masks,
        default_template=default_template,
    )


def count_training_tokens(dataset, tokenizer, max_length: int) -> int:
    """Tokens the trainer will see in one epoch: each conversation through the chat template (or
    its pre-tokenised `input_ids`), truncated to max_length (as TRL truncates). Padding is not
    counted: it is not trained on."""
    token_chars = longest_token_chars(tokenizer)
    total = 0
    for row in dataset:
        if "input_ids" in row:
            total += min(len(row["input_ids"]), max_length)
            continue
        if "messages" in row and row["messages"] is not None and tokenizer.chat_template:
            text = tokenizer.apply_chat_template(row["messages"], tokenize=False)
        else:
            text = row.get("text", "")
        # Only the first max_length tokens count: a 50 MB row is cut before it is tokenised.
        ids = tokenizer(text_start(tokenizer, text, max_length, token_chars), add_special_tokens=False)["input_ids"]
        total += min(len(ids), max_length)
    return total


# Rows tokenized to size an epoch before training; the rest is extrapolated (tokenizing every row
# of a large dataset would delay the start for a planning figure).
TOKEN_COUNT_SAMPLE_ROWS = 2000


def tokens_per_epoch(dataset, tokenizer, max_length: int) -> tuple[int, float]:
    """(trained tokens per epoch, mean tokens per row), from the first TOKEN_COUNT_SAMPLE_ROWS rows."""
    sample = dataset.select(range(min(len(dataset), TOKEN_COUNT_SAMPLE_ROWS)))
    per_row = count_training_tokens(sample, tokenizer, max_length) / max(1, len(sample))
    return round(per_row * len(dataset)), per_row
