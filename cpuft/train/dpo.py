"""The `cpuft dpo` recipe: preference tuning (DPO) of a PEFT adapter with TRL's DPOTrainer, built
from the stages of `cpuft sft` (cpuft.train.sft). Read top to bottom, it is the job.

    prepare_dpo_run(job, machine)  validate and load everything; nothing is written
      1. the run directory may be used; the --sync-to store is writable (as sft)
      2. the starting point: a base model, or a cpuft SFT run directory (`starting_point`): its
         base, revision and adapter, merged into the base in memory, so the policy starts from the
         SFT model and the reference is that same model (StackLLaMA's order)
      3. preflight in pairs (cpuft.planning.preference): a pair is two sequences in memory and time
      4. preference data (cpuft.data.preference), its tokens, the reference log-probs planned
         (precomputed when the run passes over its rows more than once) and the time estimate
      5. the base model as planned, the SFT adapter merged into it
    train_run(run)                 cpuft.train.sft's, unchanged: header, trainer, train, finalise;
                                   its trainer is `assemble_dpo_trainer`

The reference is the policy with its adapter disabled (TRL does this for a PEFT model): no second
copy of the weights. cpuft's fused LoRA applies (it falls back to PEFT's own forward with the
adapter disabled and in evaluation); the compact CPU head does not (DPO needs every completion
token's log-prob). Artefacts are sft's, with TRL's rewards/accuracies and margins in
metrics.jsonl and summary.json's `preference` record (held-out reward accuracy and margin).

Limits: causal LMs only (T5 is refused); QLoRA on CUDA as in sft; from an SFT run, the run's own
adapter must be a LoRA-family adapter PEFT can merge; the DPO adapter sits on the SFT-merged
model, so loading it needs the SFT run as well (`starting_point` records it in config.yaml, and
cpuft's inference commands follow it).

Errors: UserError (exit 2) before anything is written: bad preference rows (file, line, field),
an SFT run directory without an adapter, everything `cpuft sft` refuses.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cpuft.data.training_set import TrainingSet
from cpuft.errors import UserError
from cpuft.planning.preference import estimate_preference_time, preference_preflight, with_reference_plan
from cpuft.planning.preflight import check_fits
from cpuft.run_dir import RunDir
from cpuft.storage import open_writable_store
from cpuft.train.distributed import World, bind_to_numa_node
from cpuft.train.model_loading import fit_model_to_tokenizer, load_model, load_tokenizer, resolve_model_path
from cpuft.train.prepared import PreparedRun, quiet
from cpuft.train.summary import ModelFacts


@dataclass(frozen=True)
class StartingPoint:
    """Where the policy starts: a base model, or a cpuft SFT run (its base, and its adapter merged)."""

    base_model: str
    revision: str | None
    trust_remote_code: bool
    sft_run: Path | None = None

    @property
    def adapter_dir(self) -> Path | None:
        return RunDir(self.sft_run).adapter_dir if self.sft_run else None

    def describe(self) -> str:
        if self.sft_run is None:
            return f"starting point: the base model {self.base_model}"
        return f"starting point: the SFT run {self.sft_run} (its adapter merged into {self.base_model})"


def starting_point(job) -> StartingPoint:
    """The job's `model` read as a base model, or as a cpuft SFT run directory (config.yaml and
    adapter/): then its base model, revision and trust_remote_code are the SFT run's."""
    from cpuft.config.yaml_file import read_mapping

    run = RunDir(Path(job.model).expanduser())
    if not run.config_file.is_file():
        return StartingPoint(resolve_model_path(job.model), job.revision, job.trust_remote_code)
    if not (run.adapter_dir / "adapter_config.json").is_file():
        raise UserError(f"--model {job.model} is a cpuft run directory without a finished adapter"
                        f" ({RunDir.ADAPTER}/adapter_config.json): finish it (cpuft sft --output-dir {job.model}"
                        " --resume) or pass a base model.")
    saved, _ = read_mapping(run.config_file)
    return StartingPoint(resolve_model_path(str(saved.get("model"))), saved.get("revision"),
                         bool(saved.get("trust_remote_code", False)), run.path.resolve())


def prepare_dpo_run(job, machine, resume: bool = False, log=print) -> PreparedRun:
    """Steps 1-5 of the module docstring; UserError on bad input, before anything is written."""
    import torch

    from cpuft.data.preference import prepare_preferences
    from cpuft.train.resume import keep_dtype, keep_global_batch

    started, world = time.perf_counter(), World.from_env()
    log = log if world.is_main else quiet
    run_dir = RunDir(job.output_dir) if job.output_dir else RunDir.default()
    if world.is_main:
        run_dir.check_usable(resume)
    store = open_writable_store(job.sync_to)
    job = replace(job, model=resolve_model_path(job.model))  # config.yaml keeps it usable from anywhere
    start = starting_point(job)
    log(start.describe())
    base_job = replace(job, model=start.base_model, revision=start.revision, trust_remote_code=start.trust_remote_code)
    if world.distributed and (bound := bind_to_numa_node(world)):
        log(f"rank {world.rank} of {world.size}: bound to CPUs {bound[0]}-{bound[-1]}")

    checked = preference_preflight(base_job, machine, world.local_size, world.nodes)
    if resume:
        checked = keep_dtype(checked, lambda pinned: preference_preflight(pinned, machine, world.local_size, world.nodes),
                             base_job, run_dir, machine, log)
        checked = keep_global_batch(checked, run_dir, job, log)
    if checked.plan.task_type == "SEQ_2_SEQ_LM":
        raise UserError(f"cpuft dpo trains causal LMs; {start.base_model} is an encoder-decoder (seq2seq) model.")
    check_fits(checked)
    torch.set_num_threads(checked.plan.threads)

    rows = prepare_preferences(job.dataset, split=job.dataset_split, eval_fraction=job.eval_fraction,
                               max_samples=job.max_samples, seed=job.seed, revision=job.dataset_revision)
    tokenizer = load_tokenizer(str(start.adapter_dir or start.base_model), revision=None if start.sft_run else start.revision,
                               trust_remote_code=start.trust_remote_code)
    if rows.row_format.startswith("conversational") and not tokenizer.chat_template:
        raise UserError(f"{job.dataset}: conversational preference rows need a chat template, and the tokenizer of"
                        f" {start.base_model} has none: start from a cpuft SFT run of it (which adds one), or use"
                        " plain-text prompt/chosen/rejected rows.")
    data = preference_set(rows, tokenizer, job.max_length)
    checked = with_reference_plan(checked, len(data.train), job)
    log(checked.describe() + "\n")
    time_estimate = estimate_preference_time(checked, data.tokens_per_epoch, data.mean_tokens_per_row, len(data.train))
    if time_estimate is not None:
        log(time_estimate.format())

    model = load_model(start.base_model, checked.plan, checked.model_config, revision=start.revision,
                       trust_remote_code=start.trust_remote_code)
    if start.sft_run is not None:
        model = merged_sft_model(model, tokenizer, start, job.seed)
    return PreparedRun(job, machine, world, run_dir, resume, checked, data, tokenizer, model, ModelFacts.of(model),
                       time_estimate, store, started)


def merged_sft_model(model, tokenizer, start: StartingPoint, seed: int):
    """`model` (the SFT run's base) with the run's adapter merged in: the SFT model, as one set of
    weights, that DPO's adapter trains on and its reference scores with."""
    from peft import PeftModel

    fit_model_to_tokenizer(model, tokenizer, seed)  # the SFT run's tokenizer may have added tokens
    try:
        return PeftModel.from_pretrained(model, str(start.adapter_dir)).merge_and_unload()
    except Exception as exc:  # a non-mergeable method, or an adapter of another base
        raise UserError(f"cannot merge the SFT adapter {start.adapter_dir} into {start.base_model}: {exc}") from None


def preference_set(rows, tokenizer, max_length: int) -> TrainingSet:
    """The preference rows as a TrainingSet, with the tokens one pass trains: both sequences of
    every pair (prompt + chosen, prompt + rejected), each cut to max_length. Every text is first cut
    past what its first max_length tokens come from (cpuft.data.loss_mask.text_start): TRL keeps
    only max_length tokens of a sequence, so the cut changes nothing it trains, and a huge row costs
    what max_length tokens cost instead of gigabytes."""
    from cpuft.data.loss_mask import longest_token_chars

    token_chars = longest_token_chars(tokenizer)
    train, held_out = (None if split is None else _cut_texts(split, tokenizer, max_length, token_chars)
                       for split in (rows.train, rows.eval))
    lengths = [length for row in train for length in pair_lengths(row, tokenizer, max_length)]
    return TrainingSet(
        train=train, eval=held_out, source=rows.source, row_format=rows.row_format, num_rows=rows.num_rows,
        tokens_per_epoch=sum(lengths), mean_tokens_per_row=sum(lengths) / max(1, len(lengths)),
    )


def _cut_texts(dataset, tokenizer, max_length: int, token_chars: int):
    """`dataset` with every prompt/chosen/rejected text (or message content) cut by text_start;
    the same dataset when nothing is that long."""
    from datasets import Dataset

    from cpuft.data.loss_mask import text_start

    def cut(value):
        if isinstance(value, str):
            return text_start(tokenizer, value, max_length, token_chars)
        return [dict(message, content=text_start(tokenizer, message["content"], max_length, token_chars))
                for message in value]

    columns = [name for name in ("prompt", "chosen", "rejected") if name in dataset.column_names]
    rows = [{**row, **{name: cut(row[name]) for name in columns}} for row in dataset]
    if rows == list(dataset):
        return dataset
    return Dataset.from_list(rows)


def pair_lengths(row: dict, tokenizer, max_length: int) -> tuple[int, int]:
    """Token counts of prompt + chosen and prompt + rejected (TRL's sequences), cut to max_length."""
    prompt = row.get("prompt")

    def tokens(completion: Any) -> int:
        if isinstance(completion, list):  # conversational: the template renders prompt and reply
            messages = (prompt or []) + completion
            count = len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False))
        else:
            count = len(tokenizer((prompt or "") + completion, add_special_tokens=True)["input_ids"])
        return min(count, max_length)

    return tokens(row["chosen"]), tokens(row["rejected"])


def assemble_dpo_trainer(job, plan, data: TrainingSet, tokenizer, model, run_dir: Path, callbacks: list):
    """TRL's DPOTrainer for this run: the adapter's PEFT config, the DPOConfig the plan and the job
    decide, rows in cpuft's length-grouped order, the plan's patches (cpuft.train.assembly)."""
    from trl import DPOTrainer

    from cpuft.data.packing import order_by_length
    from cpuft.train.assembly import adapter_config, apply_plan_patches
    from cpuft.train.model_loading import prepare_quantized_for_training
    from cpuft.train.trainer_args import build_dpo_config

    trainer = DPOTrainer(
        model=prepare_quantized_for_training(model, plan),
        ref_model=None,  # with a PEFT adapter: the policy with its adapter disabled
        args=build_dpo_config(job, plan, run_dir),
        train_dataset=order_by_length(data.train, plan.global_batch_size, job.seed) if plan.length_grouping else data.train,
        eval_dataset=data.eval,
        processing_class=tokenizer,
        peft_config=adapter_config(job, plan, data, model),
        callbacks=callbacks,
    )
    apply_plan_patches(trainer, plan, data)
    return trainer
