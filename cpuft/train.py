"""The `cpuft sft` recipe: LoRA / QLoRA supervised fine-tuning with TRL's SFTTrainer.

Flow: validate everything (config, data, model files, plan) before the run directory is touched,
then train, then write the artefacts atomically.

Run directory:
    adapter/            LoRA adapter + tokenizer (stock PEFT: AutoPeftModelForCausalLM.from_pretrained)
    config.yaml         the resolved job config (defaults < YAML < CLI)
    plan.json           the machine facts and the plan, with reasons
    metrics.jsonl       one line per log: loss, lr, grad norm, tokens, tokens/s
    tensorboard/        TensorBoard event files
    loss_curve.png      train (and eval) loss by step
    summary.json        status, steps, losses, wall time, tokens/s, peak RSS, FLOP/s, MFU
    checkpoint-N/       trainer checkpoints (every save_steps, and on SIGTERM/SIGINT)

Limits: single process (multi-process via `accelerate launch -m cpuft.cli sft ...`); rows are
length-grouped by cpuft.packing (or, with packing, packed by TRL with samples kept apart).

Raises UserError (exit 2) for bad input; a run stopped by a signal returns status "interrupted".
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from cpuft.artifacts import atomic_directory, atomic_write_json, write_loss_curve
from cpuft.config import SFTJobConfig, write_config_file
from cpuft.data import PreparedData, prepare_dataset
from cpuft.errors import UserError
from cpuft.plan import Plan, plan_for
from cpuft.probe import Machine
from cpuft.report import format_env_table

TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass
class RunResult:
    status: str  # "completed" | "interrupted"
    run_dir: Path
    summary: dict[str, Any] = field(default_factory=dict)


def default_run_dir() -> Path:
    return Path("runs") / datetime.now().strftime("sft-%Y%m%d-%H%M%S")


def read_model_config(model: str):
    """The model's config.json only (no weights): enough to size the plan and catch typos early."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model)
    except Exception as exc:  # OSError for missing files, ValueError for bad configs, hub errors
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(
            f"cannot load model config for '{model}': {first_line}. Pass --model a local model"
            " directory (config.json + weights + tokenizer) or a Hub id you can reach; offline,"
            " `cpuft tiny-model --out models/tiny` builds a small model to try cpuft with."
        ) from None


def estimate_param_count(model_config) -> int | None:
    """Parameters from the config alone (Llama-style decoder), for the plan's memory decision."""
    try:
        h = model_config.hidden_size
        layers = model_config.num_hidden_layers
        inter = model_config.intermediate_size
        vocab = model_config.vocab_size
        heads = model_config.num_attention_heads
        kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
        head_dim = getattr(model_config, "head_dim", None) or h // heads
    except AttributeError:
        return None
    attention = h * heads * head_dim * 2 + h * kv_heads * head_dim * 2
    mlp = 3 * h * inter
    embeddings = vocab * h * (1 if getattr(model_config, "tie_word_embeddings", False) else 2)
    return layers * (attention + mlp) + embeddings


class SFTRecipe:
    """One fine-tuning job: `setup()` validates and loads, `train()` runs, `finalize()` writes."""

    def __init__(self, config: SFTJobConfig, machine: Machine, resume: bool = False, show_progress: bool = True, log=print):
        self.config = config
        self.machine = machine
        self.resume = resume
        self.show_progress = show_progress
        self.log = log
        self.run_dir = Path(config.output_dir) if config.output_dir else default_run_dir()
        self.plan: Plan | None = None
        self.data: PreparedData | None = None
        self.memory_plan = None
        self.time_estimate = None
        self.started = time.perf_counter()

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        """Validate and load everything; raises UserError before writing anything on bad input."""
        self._check_run_dir()
        if Path(self.config.model).expanduser().is_dir():
            # adapter_config.json records this path; absolute keeps the adapter loadable from any cwd.
            self.config.model = str(Path(self.config.model).expanduser().resolve())
        model_config = read_model_config(self.config.model)
        self.model_shape = _model_shape_or_none(model_config)
        self.model_params_estimate = (
            self.model_shape.total_params if self.model_shape else estimate_param_count(model_config)
        )
        self.plan = plan_for(self.machine, self.config.plan_request(self.model_params_estimate))
        # The plan first, then what it costs in memory and time: read top to bottom before loading.
        self.log(format_env_table(self.machine, self.plan) + "\n")
        self.memory_plan = self._check_memory()
        self._apply_threads()
        self.data = prepare_dataset(
            self.config.dataset,
            row_format=self.config.dataset_format,
            split=self.config.dataset_split,
            eval_fraction=self.config.eval_fraction,
            max_samples=self.config.max_samples,
            seed=self.config.seed,
        )
        self.tokenizer = self._load_tokenizer()
        self.time_estimate = self._estimate_time()
        self.model = self._load_model(model_config)

    def _check_memory(self):
        """Size the run from the config alone and stop before loading weights if it cannot fit."""
        from cpuft.memory import plan_memory, settings_for_plan, usable_capacity

        if self.model_shape is None:
            return None
        self.run_settings = settings_for_plan(self.plan, **run_settings_overrides(self.config))
        memory = plan_memory(self.model_shape, self.run_settings, *usable_capacity(self.machine, self.plan.device))
        self.log(memory.format())
        if memory.fits is False:
            options = "\n".join(f"  - {s}" for s in memory.suggestions)
            raise UserError(
                f"this run needs about {memory.total_bytes / 2**30:.1f} GiB but {memory.capacity_label}"
                f" is {memory.capacity_bytes / 2**30:.1f} GiB; nothing was loaded. Options that would"
                f" fit (`cpuft plan` with the same flags shows the whole estimate):\n{options}"
            )
        return memory

    def _estimate_time(self):
        """Print the expected training time (and cost on --machine-type) before loading weights."""
        from cpuft.cloud import MACHINE_TYPES, planned_epochs, time_for_run, tokens_per_epoch

        if self.memory_plan is None:
            return None
        train = self.data.train
        tokens, tokens_per_row = tokens_per_epoch(train, self.tokenizer, self.config.max_length)
        epochs = planned_epochs(
            self.config.max_steps, self.plan.effective_batch_size, len(train), self.config.num_train_epochs
        )
        machine_type = MACHINE_TYPES[self.config.machine_type] if self.config.machine_type else None
        estimate = time_for_run(
            self.model_shape, self.run_settings, self.memory_plan.trainable_params, tokens, epochs,
            tokens_per_row, machine_type, self.plan.threads, datasheet_flops=self.plan.peak_flops,
        )
        self.log(estimate.format())
        return estimate

    def _check_run_dir(self) -> None:
        run_dir = self.run_dir
        if self.resume:
            if not (run_dir / "config.yaml").is_file():
                raise UserError(f"--resume: {run_dir} is not a cpuft run directory (no config.yaml).")
            return
        if run_dir.exists() and any(run_dir.iterdir()):
            raise UserError(
                f"output directory {run_dir} already holds files; cpuft will not overwrite a run."
                " Pass --resume to continue it, or choose another --output-dir."
            )

    def _apply_threads(self) -> None:
        import torch

        torch.set_num_threads(self.plan.threads)

    def _load_tokenizer(self):
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(self.config.model)
        except Exception as exc:
            raise UserError(f"cannot load the tokenizer of '{self.config.model}': {exc}") from None
        if self.data.row_format != "text" and not tokenizer.chat_template:
            raise UserError(
                f"the tokenizer of '{self.config.model}' has no chat template, so conversational"
                f" data ({self.data.row_format}) cannot be formatted. Use an instruct/chat model,"
                " or plain text data with --dataset-format text."
            )
        if tokenizer.pad_token is None:
            # Padding is masked out of the loss and attention; reusing EOS is the common choice.
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer

    def _load_model(self, model_config):
        import torch
        from transformers import AutoModelForCausalLM

        plan = self.plan
        kwargs: dict[str, Any] = {
            "dtype": getattr(torch, TORCH_DTYPES[plan.weights_dtype]),
            "attn_implementation": plan.attn_implementation,
        }
        if plan.quantization != "none":
            kwargs["quantization_config"] = quantization_config_for(plan)
            kwargs["device_map"] = {"": 0} if plan.device == "cuda" else {"": "cpu"}
        try:
            model = AutoModelForCausalLM.from_pretrained(self.config.model, **kwargs)
        except Exception as exc:
            raise UserError(f"cannot load model weights of '{self.config.model}': {exc}") from None
        if plan.device == "cuda" and plan.quantization == "none":
            model = model.to("cuda")
        from cpuft.metrics import linear_parameter_count

        self.linear_params = linear_parameter_count(model)
        self.total_params = sum(p.numel() for p in model.parameters())
        self.model_config = model.config
        return model

    # ------------------------------------------------------------------ train

    def build_trainer(self):
        from transformers import PrinterCallback, ProgressCallback
        from trl import SFTConfig, SFTTrainer

        from cpuft.callbacks import CheckpointOnSignal, MetricsCallback
        from cpuft.memory import default_optimizer
        from cpuft.packing import order_by_length
        from cpuft.peft_methods import build_peft_config, method_callbacks

        config, plan = self.config, self.plan
        adapter_config = build_peft_config(config, total_steps=self._total_steps())
        if plan.quantization != "none":
            # TRL 1.16's SFTTrainer does not call this for quantised models (it only casts the
            # adapter to bf16): freeze the base, upcast norms/embeddings to fp32 for stable
            # training, and make checkpointing work through the frozen 4/8-bit layers.
            from peft import prepare_model_for_kbit_training

            self.model = prepare_model_for_kbit_training(
                self.model, use_gradient_checkpointing=plan.gradient_checkpointing
            )
        optimizer = default_optimizer(plan.device, plan.quantization) if config.optimizer == "auto" else config.optimizer
        # TensorBoard's writer reads its directory from the environment in transformers 5.
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(self.run_dir / "tensorboard")
        args = SFTConfig(
            output_dir=str(self.run_dir),
            max_steps=config.max_steps,
            num_train_epochs=config.num_train_epochs,
            per_device_train_batch_size=plan.per_device_batch_size,
            per_device_eval_batch_size=plan.per_device_batch_size,
            gradient_accumulation_steps=plan.gradient_accumulation_steps,
            learning_rate=config.learning_rate,
            lr_scheduler_type=config.lr_scheduler_type,
            warmup_steps=config.warmup_steps,
            weight_decay=config.weight_decay,
            seed=config.seed,
            data_seed=config.seed,
            logging_steps=config.logging_steps,
            save_strategy="steps",
            save_steps=config.save_steps,
            save_total_limit=config.save_total_limit,
            report_to=["tensorboard"],
            # TRL turns these on by default; the plan decides them (see plan.py for why).
            use_cpu=plan.device == "cpu",
            bf16=plan.compute_dtype == "bf16",
            fp16=plan.compute_dtype == "fp16",
            activation_checkpointing=plan.gradient_checkpointing,
            packing=plan.packing,  # TRL's "bfd": whole samples per row, padding-free batches
            torch_compile=plan.torch_compile,
            # Length grouping is cpuft's own order (cpuft.packing): transformers' sampler groups
            # too few batches on short runs to remove the padding.
            train_sampling_strategy="sequential" if plan.length_grouping else "random",
            max_length=config.max_length,
            assistant_only_loss=config.assistant_only_loss,
            eval_strategy="no",
            dataloader_pin_memory=plan.device == "cuda",
            disable_tqdm=True,  # MetricsCallback draws the bar, with tokens/s
            optim=optimizer,
        )
        self.metrics = MetricsCallback(self.run_dir / "metrics.jsonl", show_progress=self.show_progress)
        self.signals = CheckpointOnSignal()
        trainer = SFTTrainer(
            model=self.model,
            args=args,
            train_dataset=(
                order_by_length(self.data.train, plan.per_device_batch_size, config.seed)
                if plan.length_grouping else self.data.train
            ),
            eval_dataset=self.data.eval,
            processing_class=self.tokenizer,
            peft_config=adapter_config,
            callbacks=[self.metrics, self.signals, *method_callbacks(config)],
        )
        if plan.quantization != "none" and plan.device == "cpu":
            # TRL casts a quantised model's adapter to bf16. On a CPU keep the adapter, its
            # gradients and AdamW state in fp32: with fp32 compute (AVX2, where bf16 is emulated)
            # bf16 would only be slower; with bf16 compute autocast still runs its matmuls in bf16,
            # and the fp32 master copy (a few MB) keeps small updates from rounding away.
            for param in trainer.model.parameters():
                if param.requires_grad:
                    param.data = param.data.float()
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        return trainer

    def _total_steps(self) -> int:
        """Optimizer steps the run will take (AdaLoRA lays its rank schedule over them)."""
        if self.config.max_steps > 0:
            return self.config.max_steps
        per_epoch = math.ceil(len(self.data.train) / self.plan.effective_batch_size)
        return max(1, math.ceil(per_epoch * self.config.num_train_epochs))

    def train(self) -> RunResult:
        from transformers.trainer_utils import get_last_checkpoint

        resume_from = None
        if self.resume:
            resume_from = get_last_checkpoint(str(self.run_dir))
            if resume_from is None:
                raise UserError(f"--resume: no checkpoint-N directory in {self.run_dir} to resume from.")
            self.log(f"resuming from {resume_from}")
            _drop_metrics_after(self.run_dir / "metrics.jsonl", _checkpoint_step(resume_from))
        self._write_run_header()
        self.trainer = self.build_trainer()
        self.trainable_params = sum(p.numel() for p in self.trainer.model.parameters() if p.requires_grad)
        self.signals.install()
        try:
            self.trainer.train(resume_from_checkpoint=resume_from)
        finally:
            self.signals.uninstall()
        return self.finalize()

    def _write_run_header(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_config_file(self.config, self.run_dir / "config.yaml")
        atomic_write_json(
            self.run_dir / "plan.json", {"machine": self.machine.to_dict(), "plan": self.plan.to_dict()}
        )

    # ------------------------------------------------------------------ finalize

    def finalize(self) -> RunResult:
        interrupted = self.signals.interrupted
        eval_loss = None
        if not interrupted and self.data.eval is not None:
            eval_loss = self.trainer.evaluate().get("eval_loss")
        if not interrupted:
            with atomic_directory(self.run_dir / "adapter") as tmp:
                self.trainer.model.save_pretrained(tmp)
                self.tokenizer.save_pretrained(tmp)
        all_metrics = _read_metrics(self.run_dir / "metrics.jsonl")
        write_loss_curve(all_metrics, self.run_dir / "loss_curve.png")
        summary = self._summary(interrupted, eval_loss, all_metrics)
        atomic_write_json(self.run_dir / "summary.json", summary)
        return RunResult("interrupted" if interrupted else "completed", self.run_dir, summary)

    def _summary(self, interrupted: bool, eval_loss: float | None, all_metrics: list[dict]) -> dict:
        from cpuft.metrics import lora_flops_per_token, peak_rss_bytes

        state = self.trainer.state
        metrics = self.metrics
        losses = [(m["step"], m["loss"]) for m in all_metrics if "loss" in m]
        steps_this_run = max(1, state.global_step - metrics.start_step)
        samples = steps_this_run * self.plan.effective_batch_size
        tokens = metrics.train_tokens
        mean_seq_len = tokens / samples if samples else 0.0
        flops_per_token = lora_flops_per_token(
            self.linear_params, self.trainable_params, self.model_config.num_hidden_layers,
            self.model_config.hidden_size, mean_seq_len,
        )
        seconds = metrics.train_seconds or 1e-9
        achieved = flops_per_token * tokens / seconds
        summary = {
            "status": "interrupted" if interrupted else "completed",
            "run_dir": str(self.run_dir),
            "model": self.config.model,
            "dataset": self.config.dataset,
            "dataset_format": self.data.row_format,
            "train_rows": len(self.data.train),
            "eval_rows": len(self.data.eval) if self.data.eval is not None else 0,
            "device": self.plan.device,
            "dtype": self.plan.compute_dtype,
            "quantization": self.plan.quantization,
            "threads": self.plan.threads,
            "steps": state.global_step,
            "max_steps": state.max_steps,
            "steps_this_run": state.global_step - metrics.start_step,
            "first_loss": losses[0][1] if losses else None,
            "final_loss": losses[-1][1] if losses else None,
            "eval_loss": eval_loss,
            "wall_seconds": round(time.perf_counter() - self.started, 2),
            "train_seconds": round(metrics.train_seconds, 2),
            "train_tokens": tokens,
            "train_tokens_per_second": round(tokens / seconds, 1),
            "peak_rss_bytes": peak_rss_bytes(),
            "peak_rss_mib": round(peak_rss_bytes() / 2**20, 1),
            "total_params": self.total_params,
            "trainable_params": self.trainable_params,
            "flops_per_token": flops_per_token,
            "achieved_flops_per_second": achieved,
            "peak_flops_per_second": self.plan.peak_flops,
            "mfu": achieved / self.plan.peak_flops if self.plan.peak_flops else None,
            "adapter_dir": None if interrupted else str(self.run_dir / "adapter"),
        }
        if self.memory_plan is not None:
            # Predicted next to measured, so users can see how far to trust `cpuft plan`.
            summary["planned_memory_bytes"] = self.memory_plan.total_bytes
        if self.time_estimate is not None:
            summary["planned_train_seconds"] = round(self.time_estimate.total_seconds, 1)
        if self.plan.device == "cuda":
            import torch

            summary["peak_gpu_memory_bytes"] = torch.cuda.max_memory_allocated()
        return summary


def _model_shape_or_none(model_config):
    """The memory estimator's view of the model; None for architectures it cannot build."""
    from cpuft.memory import model_shape

    try:
        return model_shape(model_config)
    except Exception:  # an architecture transformers cannot instantiate from its config alone
        return None


def run_settings_overrides(config: SFTJobConfig) -> dict:
    """The job-config fields the memory estimate reads beyond the Plan."""
    return {
        "peft_method": config.peft_method,
        "seq_len": config.max_length,
        "lora_r": config.lora_r,
        "lora_dropout": config.lora_dropout,
        "target_modules": config.lora_target_modules,
        "num_virtual_tokens": config.num_virtual_tokens,
        "optimizer": None if config.optimizer == "auto" else config.optimizer,
    }


def quantization_config_for(plan: Plan):
    """bitsandbytes config for QLoRA: NF4 + double quantisation, or LLM.int8."""
    import torch
    from transformers import BitsAndBytesConfig

    if plan.quantization == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=getattr(torch, TORCH_DTYPES[plan.compute_dtype]),
        )
    if plan.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"no quantization config for {plan.quantization!r}")


def _checkpoint_step(checkpoint_dir: str) -> int:
    return int(Path(checkpoint_dir).name.rsplit("-", 1)[-1])


def _drop_metrics_after(path: Path, step: int) -> None:
    """A hard kill can log steps past the last checkpoint; the resumed run logs them again."""
    from cpuft.artifacts import atomic_write_text

    kept = [r for r in _read_metrics(path) if r.get("step", 0) <= step]
    atomic_write_text(path, "".join(json.dumps(r, default=str) + "\n" for r in kept))


def _read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a hard kill; the rest are whole
    return records
