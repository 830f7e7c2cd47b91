"""TrainerCallbacks: progress with tokens/s, metrics.jsonl, and checkpoint-on-signal.

A spot VM's preemption notice gives about 30 seconds: on SIGTERM or SIGINT the trainer finishes
the current optimizer step, saves a checkpoint and stops; the run exits with status 75 and
`cpuft sft --resume` continues from that checkpoint. A second SIGINT aborts at once.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm
from transformers import TrainerCallback

from cpuft.artifacts import append_jsonl


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


class CheckpointOnSignal(TrainerCallback):
    """Turns SIGTERM/SIGINT into 'save a checkpoint at the end of this step, then stop'."""

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
            f"\ncpuft: received {signal.Signals(signum).name}; saving a checkpoint after this step,"
            " then stopping (resume with --resume).",
            file=sys.stderr, flush=True,
        )

    @property
    def interrupted(self) -> bool:
        return self.received is not None

    def on_step_end(self, args, state, control, **kwargs):
        if self.interrupted:
            control.should_save = True
            control.should_training_stop = True
        return control
