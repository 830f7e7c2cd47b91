"""The bench's baselines: plain TRL SFTTrainer + PEFT, as a user writes it from TRL's docs.

- trl_defaults: TRL's SFTConfig defaults, as a newcomer runs them on a CPU: bf16 autocast and
  gradient checkpointing on (bf16 is emulated on CPUs without AMX/AVX512-BF16, and
  checkpointing recomputes the forward pass).
- trl_tuned: tuned by hand for this CPU: fp32 where bf16 is not native, gradient checkpointing
  off, one thread per physical core.

Limits: no length grouping or packing (TRL's random sampler), as plain TRL does by default.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any


def plain_trl_trainer(spec: dict, tuned: bool):
    """(trainer, base-model facts, the settings it runs with) for a worker spec."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from cpuft.bench.data import read_jsonl
    from cpuft.train.summary import ModelFacts

    if tuned:
        torch.set_num_threads(spec["threads"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"])
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
    args = SFTConfig(**kwargs)
    lora = LoraConfig(r=spec["lora_r"], lora_alpha=spec["lora_alpha"], lora_dropout=spec["lora_dropout"],
                      target_modules=spec["lora_target_modules"], task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(read_jsonl(spec["train"])),
                         processing_class=tokenizer, peft_config=lora)
    plan = {"compute_dtype": "bf16" if args.bf16 else "fp32", "gradient_checkpointing": bool(args.gradient_checkpointing),
            "threads": torch.get_num_threads(), "sampling": args.train_sampling_strategy, "packing": bool(args.packing)}
    return trainer, facts, plan
