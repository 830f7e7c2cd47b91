"""Seq2seq fine-tuning (T5, mT5, Flan-T5, mt0, ...): transformers' `Seq2SeqTrainer` on a PEFT
model with `TaskType.SEQ_2_SEQ_LM`, as PEFT's own seq2seq example trains it.

TRL's SFTTrainer is for causal LMs; for a model whose plan says task_type SEQ_2_SEQ_LM
(cpuft.planning.architecture) the SFT recipe (cpuft.train.sft) takes this variant of two stages:
- data preparation: `check_seq2seq_job` refuses what a seq2seq run cannot take (plain text rows,
  packing, SFTConfig-only pass-through keys) before anything loads; `load_seq2seq_tokenizer`
  (no chat template needed: cpuft.data.seq2seq gives it the plain-text prompt template, saved
  with the adapter); `tokenize_for_seq2seq` tokenises every row into a prompt/target pair
  (labels = target + EOS) -> a TrainingSet;
- trainer assembly: `assemble_seq2seq_trainer`: `peft.get_peft_model`, `DataCollatorForSeq2Seq`
  (pads labels with -100, builds decoder_input_ids from the labels), Seq2SeqTrainingArguments
  from the same plan facts as SFTConfig (cpuft.train.trainer_args), rows in cpuft's
  length-grouped order, the recipe's callbacks and the plan's patches (cpuft.train.assembly).
  Artefacts, checkpoints and --resume are the recipe's, as for causal LMs.

The loss is on the target tokens only (the decoder writes nothing else); loss_on does not apply.
Tokens counted for tokens/s (`num_tokens`, as TRL logs it) are the prompt's non-padding tokens
plus the target tokens: the encoder reads the one, the decoder the other.

Limits: no packing (an encoder-decoder pair does not split into packed rows); the time estimate
and summary.json's FLOP/s count every parameter for every prompt and target token, while each
passes through one of the two stacks, so both overstate the work by up to ~2x.
"""

from __future__ import annotations

from cpuft.data.prepare import PreparedData
from cpuft.data.seq2seq import (
    LABEL_PAD_ID,
    check_pairs,
    tokenize_pairs,
    use_seq2seq_template,
)
from cpuft.data.training_set import TrainingSet
from cpuft.errors import UserError
from cpuft.train.trainer_args import build_seq2seq_args, seq2seq_refusal


def check_seq2seq_job(job, rows: PreparedData, model_type: str) -> None:
    """UserError for what an encoder-decoder run cannot take, before anything is loaded or written."""
    refusal = seq2seq_refusal(job)
    if refusal:
        raise UserError(refusal)
    if job.packing:
        raise UserError(
            f"{job.origins.get('packing', 'packing')}: packing is for decoder-only models; an"
            f" encoder-decoder ({model_type}) trains on padded prompt/target"
            " pairs. Turn packing off."
        )
    check_pairs(rows.row_format, rows.source)


def tokenize_for_seq2seq(rows: PreparedData, tokenizer, max_length: int) -> TrainingSet:
    """Every row as a prompt/target pair (labels = target + EOS), train and eval."""
    from datasets import Dataset

    from cpuft.data.training_set import tokens_per_epoch

    tokens, per_row = tokens_per_epoch(rows.train, tokenizer, max_length)
    return TrainingSet(
        train=Dataset.from_list(tokenize_pairs(rows.train, tokenizer, max_length)),
        eval=Dataset.from_list(tokenize_pairs(rows.eval, tokenizer, max_length)) if rows.eval is not None else None,
        source=rows.source, row_format=rows.row_format, num_rows=rows.num_rows,
        tokens_per_epoch=tokens, mean_tokens_per_row=per_row,
    )


def load_seq2seq_tokenizer(config, log=print):
    """The base model's tokenizer (train.model_loading), checked for an EOS and given cpuft's
    seq2seq prompt template when it has no chat template."""
    from cpuft.train.model_loading import load_tokenizer

    tokenizer = load_tokenizer(config.model, revision=config.revision, trust_remote_code=config.trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise UserError(f"the tokenizer of '{config.model}' has no EOS token, which ends every seq2seq target.")
    if use_seq2seq_template(tokenizer):
        log("prompt format: one user turn as its text, longer conversations as 'role: content' lines"
            " (cpuft's seq2seq template, saved with the adapter's tokenizer)")
    return tokenizer


def assemble_seq2seq_trainer(job, plan, data: TrainingSet, tokenizer, model, run_dir, callbacks):
    """The Seq2SeqTrainer for this run: `model` (the loaded base) wrapped by PEFT with the job's
    adapter config (cpuft.train.assembly), patched as the plan says."""
    from peft import get_peft_model
    from transformers import DataCollatorForSeq2Seq

    from cpuft.data.packing import length_grouped_order
    from cpuft.train.assembly import adapter_config, apply_plan_patches

    peft_config = adapter_config(job, plan, data, model)
    args = build_seq2seq_args(job, plan, run_dir)
    if plan.gradient_checkpointing:
        model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need a grad path
    peft_model = get_peft_model(model, peft_config)
    train = data.train
    if plan.length_grouping:
        lengths = [len(row["input_ids"]) + len(row["labels"]) for row in train]
        train = train.select(length_grouped_order(lengths, plan.global_batch_size, job.seed))
    collator = DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=LABEL_PAD_ID)
    trainer = _trainer_class()(
        model=peft_model, args=args, data_collator=collator, train_dataset=train, eval_dataset=data.eval,
        processing_class=tokenizer, callbacks=callbacks,
    )
    apply_plan_patches(trainer, plan, data)
    return trainer


def _trainer_class():
    from transformers import Seq2SeqTrainer

    class TokenCountingSeq2SeqTrainer(Seq2SeqTrainer):
        """Seq2SeqTrainer that logs `num_tokens` (prompt + target tokens trained so far in this
        process's run), as TRL's SFTTrainer does: cpuft's metrics and summary read it."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.trained_tokens = 0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                tokens = inputs["attention_mask"].sum() + (inputs["labels"] != LABEL_PAD_ID).sum()
                self.trained_tokens += int(self.accelerator.gather_for_metrics(tokens.reshape(1)).sum().item())
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

        def log(self, logs, start_time=None):
            if "loss" in logs:
                logs = {**logs, "num_tokens": float(self.trained_tokens)}
            super().log(logs, start_time)

    return TokenCountingSeq2SeqTrainer
