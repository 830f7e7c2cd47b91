"""TrainerCallbacks: progress with tokens/s, metrics.jsonl (training and evaluation logs alike),
early stopping, checkpoint-on-signal, a stop when the weights turn NaN/inf, store sync.

A spot VM's preemption notice gives about 30 seconds: on SIGTERM or SIGINT the trainer stops
after the current micro-batch (not the whole optimizer step: with gradient accumulation a step
can take a minute), saves a checkpoint of the last completed optimizer step and stops; the
micro-batches of the unfinished step are discarded and redone on resume. The run exits with
status 75 and `cpuft sft --resume` continues from that checkpoint. A second SIGINT aborts at once.

SyncToStore hands every saved checkpoint and each metrics.jsonl update to a
cpuft.storage.BackgroundUploader (`--sync-to`); it never waits for the upload.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm
from transformers import TrainerCallback

from cpuft.artifacts import append_jsonl
from cpuft.run_dir import RunDir
from cpuft.storage.uploader import BackgroundUploader
from cpuft.train.distributed import any_rank


class MetricsCallback(TrainerCallback):
    """Appends every log to metrics.jsonl, adds tokens/s, and drives a progress bar.

    Tokens are TRL's `num_tokens` (the attention-mask sum: padding excluded). Throughput counts
    only this process's steps, so a resumed run reports its own speed.
    """

    def __init__(self, metrics_path: Path, show_progress: bool = True):
        self.metrics_path = metrics_path
        self.show_progress = show_progress
        self.records: list[dict] = []
        self.bar = None
        self.train_start = None
        self.train_seconds = 0.0
        self.start_step = 0
        self.tokens_at_start = None
        self.last_tokens = None
        self._last_log = None  # (time, tokens) of the previous log, for the instantaneous rate

    def on_train_begin(self, args, state, control, **kwargs):
        self.train_start = time.perf_counter()
        self.start_step = state.global_step
        if self.show_progress:
            self.bar = tqdm(
                total=state.max_steps, initial=state.global_step, desc="training", unit="step",
                dynamic_ncols=True, file=sys.stderr,
            )

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = dict(logs or {})
        now = time.perf_counter()
        record = {"step": state.global_step, "epoch": state.epoch, **logs}
        tokens = logs.get("num_tokens")
        if tokens is not None:
            if self.tokens_at_start is None:
                # TRL counts from zero in each process; the first log covers steps since start.
                self.tokens_at_start = 0
            self.last_tokens = tokens
            if self._last_log is not None and now > self._last_log[0]:
                record["tokens_per_second"] = (tokens - self._last_log[1]) / (now - self._last_log[0])
            elif now > self.train_start:
                record["tokens_per_second"] = tokens / (now - self.train_start)
            self._last_log = (now, tokens)
        record["elapsed_seconds"] = now - self.train_start if self.train_start else 0.0
        self.records.append(record)
        if state.is_world_process_zero:  # one metrics.jsonl for the job, however many ranks
            append_jsonl(self.metrics_path, record)
        if self.bar is not None:
            postfix = {}
            if "loss" in logs:
                postfix["loss"] = f"{logs['loss']:.4f}"
            if "tokens_per_second" in record:
                postfix["tok/s"] = f"{record['tokens_per_second']:.0f}"
            if "eval_loss" in logs:
                postfix["eval_loss"] = f"{logs['eval_loss']:.4f}"
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.train_start is not None:
            self.train_seconds = time.perf_counter() - self.train_start
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)
            self.bar.close()

    @property
    def train_tokens(self) -> int:
        return int(self.last_tokens or 0)

    @property
    def losses(self) -> list[tuple[int, float]]:
        return [(r["step"], r["loss"]) for r in self.records if "loss" in r]


def evaluation_callbacks(config) -> list[TrainerCallback]:
    """transformers' EarlyStoppingCallback when `early_stopping_patience` is set: it stops the run
    after that many evaluations in a row without an eval_loss lower than the best by more than
    `early_stopping_threshold` (cpuft.config.job checks that eval_steps is set)."""
    if config.early_stopping_patience is None:
        return []
    from transformers import EarlyStoppingCallback

    return [EarlyStoppingCallback(config.early_stopping_patience, config.early_stopping_threshold)]


class CheckpointOnSignal(TrainerCallback):
    """Turns SIGTERM/SIGINT into 'stop after this micro-batch, save a checkpoint, then stop'."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def install(self) -> None:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: the user means it
        self.received = signum
        print(
            f"\ncpuft: received {signal.Signals(signum).name}; saving a checkpoint after this micro-batch,"
            " then stopping (resume with --resume).",
            file=sys.stderr, flush=True,
        )

    @property
    def interrupted(self) -> bool:
        return self.received is not None

    def on_step_end(self, args, state, control, **kwargs):
        # Under DDP every rank must stop at the same micro-batch (or the others hang in the next
        # all-reduce): one flag all-reduced across the ranks; a no-op in one process.
        if any_rank(self.interrupted):
            if self.received is None:
                self.received = signal.SIGTERM  # another rank's signal
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_substep_end(self, args, state, control, **kwargs):
        # Between micro-batches of one optimizer step: the Trainer's inner loop breaks on
        # should_training_stop and its end-of-epoch save writes checkpoint-<global_step>, the last
        # completed step; the gradients accumulated so far are dropped, and resume redoes them.
        return self.on_step_end(args, state, control, **kwargs)


class StopOnNonFiniteWeights(TrainerCallback):
    """Stops the run at the first optimizer step that leaves a trainable weight NaN or infinite
    (a loss or gradient that overflowed, a learning rate too high), before that step's checkpoint
    is saved: the checkpoints already on disk are the last good ones, and no NaN adapter is
    written. `failure` then says which step and weight; cpuft.train.sft raises it as RunFailed.

    The weights, not the logged loss, are checked because they are what a checkpoint keeps, and
    a non-finite loss or gradient reaches them in the same step (AdamW and gradient clipping both
    propagate NaN); logs come only every logging_steps. The check costs one isfinite per trainable
    tensor (the adapter: a few MB) per optimizer step. Under DDP every rank holds the same weights,
    so every rank stops at the same step.
    """

    def __init__(self):
        self.failure: str | None = None
        self._trainable: list[tuple[str, object]] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self._trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]

    def on_step_end(self, args, state, control, **kwargs):
        import torch

        if self.failure is None:
            bad = next((name for name, p in self._trainable if not torch.isfinite(p.detach()).all()), None)
            if bad is not None:
                self.failure = (f"step {state.global_step}: the weights turned NaN/inf ({bad}): the loss or a"
                                " gradient overflowed, most often from a learning rate too high; this step was not saved.")
        if self.failure is not None:
            control.should_save = False
            control.should_training_stop = True
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.failure is not None:
            control.should_save = False  # an epoch-end save would keep the non-finite weights
        return control


class SyncToStore(TrainerCallback):
    """Queues each checkpoint (as the Trainer saves it) and metrics.jsonl for upload."""

    def __init__(self, uploader: BackgroundUploader, run_dir: Path):
        self.uploader = uploader
        self.run = RunDir(run_dir)

    def on_save(self, args, state, control, **kwargs):
        checkpoint = self.run.checkpoint_dir(state.global_step)
        if checkpoint.is_dir():
            self.uploader.upload_checkpoint(checkpoint)
        self.uploader.upload_file(self.run.metrics_file)

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.uploader.upload_file(self.run.metrics_file)
