"""The bench's baselines: plain TRL SFTTrainer + PEFT, as a user writes it from TRL's docs.

- trl_defaults: TRL's SFTConfig defaults, as a newcomer runs them on a CPU: bf16 autocast and
  gradient checkpointing on (bf16 is emulated on CPUs without AMX/AVX512-BF16, and
  checkpointing recomputes the forward pass).
- trl_tuned: tuned by hand for this CPU: fp32 where bf16 is not native, gradient checkpointing
  off, one thread per physical core.
- trl_best: the strongest plain-TRL setup we know: trl_tuned plus bf16 base weights where bf16
  is native, transformers' fused AdamW (`optim="adamw_torch_fused"`: 1.0 s against 5.9 s per
  step over Qwen2.5-0.5B's LoRA tensors on 2 cores, docs/speed.md), and TRL's own answer to
  padding, `packing=True, packing_strategy="bfd"` (which turns on padding-free batches; TRL 1.16
  refuses padding_free with max_length unless packing).
  Packing fills each row to max_length, so the batch is resized to keep one epoch of the same
  rows in at most the bench's step count (`fit_packed_batch`): every variant trains the same
  tokens. With a `trl_micro_batch` in the spec (`cpuft bench --trl-micro-batches`) the rows of
  each optimizer step stay the same and are trained `trl_micro_batch` packed rows at a time,
  accumulated: TRL flattens a padding-free micro-batch into one sequence, so its size is the
  knob that trades GEMM size against attention length.

Limits: trl_defaults and trl_tuned do no length grouping or packing (TRL's random sampler), as
plain TRL does by default.

`--job dpo` (`plain_trl_dpo_trainer`): plain TRL DPOTrainer + PEFT, the reference being the
policy with its adapter disabled (TRL's own choice with a PEFT model), on the same pairs, batch
and accumulation as cpuft's DPO variant:
- trl_defaults: TRL's DPOConfig defaults (bf16 autocast, gradient checkpointing on, random order).
- trl_best: the strongest plain DPOTrainer we can build: bf16 base weights and autocast where bf16
  is native (fp32 otherwise), checkpointing off, one thread per physical core, fused AdamW, and
  TRL's length grouping (`train_sampling_strategy="group_by_length"`). DPOTrainer has no packing,
  and its `padding_free` is disabled in TRL 1.16 (it warns and pads), so grouping is what TRL
  allows against padding. Its sampler needs each row's length: a `length` column (prompt +
  chosen + rejected tokens) with `remove_unused_columns=False`, so the column reaches the
  sampler (DPO's collator reads only its id columns). transformers groups within mega-batches of
  min(50, rows // (4 x global batch)) batches: on the bench's short runs that is 1-2 batches.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

from cpuft.bench.sizes import DPO_TRL_VARIANTS, TRL_VARIANTS


def plain_trl_trainer(spec: dict, variant: str):
    """(trainer, base-model facts, the settings it runs with) for a worker spec and TRL variant."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from cpuft.bench.data import read_jsonl
    from cpuft.train.summary import ModelFacts

    if variant not in TRL_VARIANTS:
        raise ValueError(f"unknown TRL variant {variant!r}")
    tuned = variant != "trl_defaults"
    best = variant == "trl_best"
    if tuned:
        torch.set_num_threads(spec["threads"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    weights_dtype = torch.bfloat16 if best and spec["native_bf16"] else torch.float32
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=weights_dtype)
    facts = asdict(ModelFacts.of(model))
    kwargs: dict[str, Any] = dict(
        output_dir=spec["run_dir"], max_steps=spec["steps"], per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=spec["accumulation"], learning_rate=spec["learning_rate"],
        lr_scheduler_type=spec["lr_scheduler_type"], warmup_steps=spec["warmup_steps"],
        weight_decay=spec["weight_decay"], seed=spec["seed"], max_length=spec["max_length"],
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
    )
    if tuned:
        kwargs.update(bf16=spec["native_bf16"], gradient_checkpointing=False)
    if best:
        kwargs.update(packing=True, packing_strategy="bfd", optim="adamw_torch_fused")
    args = SFTConfig(**kwargs)
    lora = LoraConfig(r=spec["lora_r"], lora_alpha=spec["lora_alpha"], lora_dropout=spec["lora_dropout"],
                      target_modules=spec["lora_target_modules"], task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(read_jsonl(spec["train"])),
                         processing_class=tokenizer, peft_config=lora)
    if best:
        fit_packed_batch(trainer, spec["steps"], spec["accumulation"], spec.get("trl_micro_batch"))
    plan = {"compute_dtype": "bf16" if args.bf16 else "fp32", "gradient_checkpointing": bool(args.gradient_checkpointing),
            "threads": torch.get_num_threads(), "sampling": args.train_sampling_strategy, "packing": bool(args.packing),
            "padding_free": bool(getattr(trainer, "padding_free", False)),
            "weights_dtype": str(weights_dtype).removeprefix("torch."),
            "batch_size": trainer.args.per_device_train_batch_size,
            "accumulation": trainer.args.gradient_accumulation_steps,
            "optimizer": getattr(args.optim, "value", args.optim)}
    return trainer, facts, plan


def fit_packed_batch(trainer, steps: int, accumulation: int, micro_batch: int | None = None) -> None:
    """Packed rows per batch so one epoch of the packed dataset takes at most `steps` steps.

    Packing turns N conversations into fewer, full rows; with the unpacked batch size and
    max_steps the trainer would loop over the data again and train on more tokens than the
    other variants. One epoch, in ceil(rows / (steps * accumulation)) rows per micro-batch; with
    `micro_batch`, the same rows per optimizer step (or the next multiple of `micro_batch`), in
    micro-batches of `micro_batch` rows (at most a step's rows) and accumulation for the rest.
    """
    rows = len(trainer.train_dataset)
    per_step = math.ceil(rows / (steps * accumulation)) * accumulation
    batch = min(micro_batch, per_step) if micro_batch else per_step // accumulation
    trainer.args.per_device_train_batch_size = batch
    trainer.args.gradient_accumulation_steps = math.ceil(per_step / batch)  # the Trainer reads it each step
    # The Trainer copied the batch size at construction; its dataloader reads that copy.
    trainer._train_batch_size = trainer.args.train_batch_size
    trainer.args.num_train_epochs = 1
    trainer.args.max_steps = math.ceil(rows / (batch * trainer.args.gradient_accumulation_steps))


def plain_trl_dpo_trainer(spec: dict, variant: str):
    """(DPOTrainer, base-model facts, the settings it runs with) for a `--job dpo` worker spec."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from cpuft.bench.data import read_jsonl
    from cpuft.train.summary import ModelFacts

    if variant not in DPO_TRL_VARIANTS:
        raise ValueError(f"unknown TRL DPO variant {variant!r}")
    best = variant == "trl_best"
    if best:
        torch.set_num_threads(spec["threads"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    weights_dtype = torch.bfloat16 if best and spec["native_bf16"] else torch.float32
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=weights_dtype)
    facts = asdict(ModelFacts.of(model))
    pairs = read_jsonl(spec["train"])
    kwargs: dict[str, Any] = dict(
        output_dir=spec["run_dir"], max_steps=spec["steps"], per_device_train_batch_size=spec["batch_size"],
        per_device_eval_batch_size=spec["batch_size"], gradient_accumulation_steps=spec["accumulation"],
        learning_rate=spec["learning_rate"], lr_scheduler_type=spec["lr_scheduler_type"],
        warmup_steps=spec["warmup_steps"], weight_decay=spec["weight_decay"], seed=spec["seed"],
        max_length=spec["max_length"], logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
        disable_tqdm=True,
    )
    if best:
        kwargs.update(bf16=spec["native_bf16"], gradient_checkpointing=False, optim="adamw_torch_fused",
                      train_sampling_strategy="group_by_length", remove_unused_columns=False)
        pairs = [{**pair, "length": pair_token_count(pair, tokenizer)} for pair in pairs]
    args = DPOConfig(**kwargs)
    lora = LoraConfig(r=spec["lora_r"], lora_alpha=spec["lora_alpha"], lora_dropout=spec["lora_dropout"],
                      target_modules=spec["lora_target_modules"], task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, ref_model=None, args=args, train_dataset=Dataset.from_list(pairs),
                         processing_class=tokenizer, peft_config=lora)
    plan = {"compute_dtype": "bf16" if args.bf16 else "fp32", "gradient_checkpointing": bool(args.gradient_checkpointing),
            "threads": torch.get_num_threads(), "sampling": args.train_sampling_strategy, "packing": False,
            "weights_dtype": "bf16" if weights_dtype == torch.bfloat16 else "fp32",  # the plan's names, as cpuft's
            "batch_size": args.per_device_train_batch_size, "accumulation": args.gradient_accumulation_steps,
            "optimizer": getattr(args.optim, "value", args.optim),
            "precompute_ref_log_probs": bool(args.precompute_ref_log_probs), "beta": args.beta,
            "loss_type": list(args.loss_type)}
    return trainer, facts, plan


def pair_token_count(pair: dict, tokenizer) -> int:
    """Tokens of prompt + chosen and prompt + rejected (what one pair costs), for the length sampler."""
    def count(completion) -> int:
        if isinstance(completion, list):  # conversational: the chat template renders the turns
            return len(tokenizer.apply_chat_template(pair["prompt"] + completion, tokenize=True, return_dict=False))
        return len(tokenizer(pair["prompt"] + completion)["input_ids"])

    return count(pair["chosen"]) + count(pair["rejected"])
