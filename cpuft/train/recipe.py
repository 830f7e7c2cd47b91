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
length-grouped by cpuft.data.packing (or, with packing, packed by TRL with samples kept apart).

Raises UserError (exit 2) for bad input; a run stopped by a signal returns status "interrupted".
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from cpuft.artifacts import atomic_directory, atomic_write_json, write_loss_curve
from cpuft.config.job import SFTJobConfig, write_config_file
from cpuft.data.prepare import PreparedData, prepare_dataset
from cpuft.dtypes import torch_dtype
from cpuft.errors import UserError
from cpuft.hardware.probe import Machine
from cpuft.modeling import bitsandbytes_config, read_model_config
from cpuft.planning.plan import Plan, PlanRequest, plan_for
from cpuft.planning.report import format_env_table


@dataclass
class RunResult:
    status: str  # "completed" | "interrupted"
    run_dir: Path
    summary: dict[str, Any] = field(default_factory=dict)


def default_run_dir() -> Path:
    return Path("runs") / datetime.now().strftime("sft-%Y%m%d-%H%M%S")


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
        self.model_params_estimate = self.model_shape.total_params if self.model_shape else None
        self.plan = plan_for(self.machine, PlanRequest.from_job(self.config, self.model_params_estimate))
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
        from cpuft.planning.memory import plan_memory, settings_for_job, usable_capacity

        if self.model_shape is None:
            return None
        self.run_settings = settings_for_job(self.plan, self.config)
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
        from cpuft.planning.cloud import (
            MACHINE_TYPES,
            planned_epochs,
            time_for_run,
            tokens_per_epoch,
        )

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
        from transformers import AutoModelForCausalLM

        plan = self.plan
        kwargs: dict[str, Any] = {
            "dtype": torch_dtype(plan.weights_dtype),
            "attn_implementation": plan.attn_implementation,
        }
        if plan.quantization != "none":
            kwargs["quantization_config"] = bitsandbytes_config(plan.quantization, plan.compute_dtype)
            kwargs["device_map"] = {"": 0} if plan.device == "cuda" else {"": "cpu"}
        try:
            model = AutoModelForCausalLM.from_pretrained(self.config.model, **kwargs)
        except Exception as exc:
            raise UserError(f"cannot load model weights of '{self.config.model}': {exc}") from None
        if plan.device == "cuda" and plan.quantization == "none":
            model = model.to("cuda")
        from cpuft.planning.flops import linear_parameter_count

        self.linear_params = linear_parameter_count(model)
        self.total_params = sum(p.numel() for p in model.parameters())
        self.model_config = model.config
        return model

    # ------------------------------------------------------------------ train

    def build_trainer(self):
        from transformers import PrinterCallback, ProgressCallback
        from trl import SFTTrainer

        from cpuft.data.packing import order_by_length
        from cpuft.train.callbacks import CheckpointOnSignal, MetricsCallback
        from cpuft.train.peft_methods import build_peft_config, method_callbacks
        from cpuft.train.trainer_args import build_sft_config

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
        args = build_sft_config(config, plan, self.run_dir)
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
        from cpuft.hardware.usage import peak_rss_bytes
        from cpuft.planning.flops import training_flops_per_token

        state = self.trainer.state
        metrics = self.metrics
        losses = [(m["step"], m["loss"]) for m in all_metrics if "loss" in m]
        steps_this_run = max(1, state.global_step - metrics.start_step)
        samples = steps_this_run * self.plan.effective_batch_size
        tokens = metrics.train_tokens
        mean_seq_len = tokens / samples if samples else 0.0
        # Useful work only (checkpointing's recompute is not counted): that is what MFU measures.
        flops_per_token = training_flops_per_token(
            self.linear_params, self.trainable_params, self.model_config.num_hidden_layers,
            self.model_config.hidden_size, mean_seq_len, full_finetune=False, gradient_checkpointing=False,
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
    from cpuft.planning.memory import model_shape

    try:
        return model_shape(model_config)
    except Exception:  # an architecture transformers cannot instantiate from its config alone
        return None


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
