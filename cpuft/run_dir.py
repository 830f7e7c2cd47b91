"""A run directory: the names of its files, and writing and reading them whole.

    adapter/            the final adapter + tokenizer (stock PEFT: AutoPeftModelForCausalLM)
    config.yaml         the resolved job config
    plan.json           the machine facts, the model and the plan, with reasons
    metrics.jsonl       one line per log: loss, lr, grad norm, tokens, tokens/s
    tensorboard/        TensorBoard event files
    loss_curve.png      train (and eval) loss by step
    summary.json        what the run did (cpuft.summary.Summary)
    checkpoint-N/       Trainer checkpoints (cpuft.checkpoints)
    eval/               `cpuft eval`'s report on the run's adapter

Owns: those names (as `RunDir` constants, and as paths of one run), the default directory
(runs/sft-YYYYmmdd-HHMMSS), refusing to write into a directory that already holds files (unless
resuming), what `--resume` needs (a config.yaml and a complete checkpoint, with metrics.jsonl
trimmed back to it), and writing the header (config.yaml, plan.json), the adapter and the
summary atomically (cpuft.artifacts).

Limits: one process writes a run directory at a time; nothing here locks it (cpuft.batch does
that for queued jobs). Nothing here imports the training stack; the config file is written by
cpuft.config.job, imported only when a header is written.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cpuft.artifacts import atomic_directory, atomic_write_json, atomic_write_text
from cpuft.checkpoints import checkpoint_name, checkpoint_step, newest_complete_checkpoint, set_aside
from cpuft.errors import UserError
from cpuft.summary import Summary


@dataclass(frozen=True, init=False)
class RunDir:
    """One run directory at `path` (which need not exist yet)."""

    path: Path

    ADAPTER = "adapter"
    CONFIG = "config.yaml"
    PLAN = "plan.json"
    METRICS = "metrics.jsonl"
    SUMMARY = "summary.json"
    LOSS_CURVE = "loss_curve.png"
    TENSORBOARD = "tensorboard"
    EVAL = "eval"
    # The plain files a resumed run needs (summary.json tells the batch runner a run had finished).
    RUN_FILES = (CONFIG, PLAN, METRICS, SUMMARY)

    def __init__(self, path: str | os.PathLike):
        object.__setattr__(self, "path", Path(path))

    @classmethod
    def default(cls) -> RunDir:
        """runs/sft-YYYYmmdd-HHMMSS, for a job that names no output_dir."""
        return cls(Path("runs") / datetime.now().strftime("sft-%Y%m%d-%H%M%S"))

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    # ------------------------------------------------------------------ names

    @property
    def adapter_dir(self) -> Path:
        return self.path / self.ADAPTER

    @property
    def config_file(self) -> Path:
        return self.path / self.CONFIG

    @property
    def plan_file(self) -> Path:
        return self.path / self.PLAN

    @property
    def metrics_file(self) -> Path:
        return self.path / self.METRICS

    @property
    def summary_file(self) -> Path:
        return self.path / self.SUMMARY

    @property
    def loss_curve_file(self) -> Path:
        return self.path / self.LOSS_CURVE

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / self.TENSORBOARD

    @property
    def eval_dir(self) -> Path:
        return self.path / self.EVAL

    def checkpoint_dir(self, step: int) -> Path:
        return self.path / checkpoint_name(step)

    def looks_like_run(self) -> bool:
        """A cpuft run directory, finished or not: it has its header or its summary."""
        return any((self.path / name).is_file() for name in (self.CONFIG, self.SUMMARY, self.PLAN))

    # ------------------------------------------------------------------ before training

    def check_usable(self, resume: bool) -> None:
        """UserError unless this directory may be used: empty or absent for a new run, a cpuft
        run (its config.yaml) to resume."""
        self._check_writable()
        if resume:
            if not self.config_file.is_file():
                raise UserError(f"--resume: {self.path} is not a cpuft run directory (no {self.CONFIG}).")
            return
        if self.path.exists() and any(self.path.iterdir()):
            raise UserError(
                f"output directory {self.path} already holds files; cpuft will not overwrite a run."
                " Pass --resume to continue it, or choose another --output-dir."
            )

    def _check_writable(self) -> None:
        """UserError unless this directory is, or can be made, a directory this process may write
        in: a file in the way (at the path or above it) or a read-only filesystem is found now,
        not as a traceback after the model has loaded."""
        existing = self.path
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            what = "is a file" if existing == self.path else f"cannot be created: {existing} is a file"
            raise UserError(f"output directory {self.path} {what}; choose another --output-dir.")
        if not os.access(existing, os.W_OK | os.X_OK):
            # access(2) answers EROFS for a read-only filesystem as it does for a missing permission.
            readonly = _on_read_only_filesystem(existing)
            why = "is on a read-only filesystem" if readonly else "is not writable by this user"
            raise UserError(f"output directory {self.path}: {existing} {why}; choose another --output-dir.")

    def checkpoint_to_resume(self) -> str:
        """The last complete checkpoint-N; newer ones a hard kill cut short are set aside (renamed,
        with a warning). metrics.jsonl is trimmed to it, since the resumed run logs the steps
        after it again. UserError when there is none."""
        complete, incomplete = newest_complete_checkpoint(self.path)
        if complete is None:
            found = f" ({len(incomplete)} cut short, left as they are)" if incomplete else ""
            raise UserError(f"--resume: no complete checkpoint-N directory in {self.path} to resume from{found}.")
        set_aside(incomplete, log=lambda line: print(f"cpuft: warning: {line}", file=sys.stderr))
        self._drop_metrics_after(checkpoint_step(complete.name))
        return str(complete)

    def write_header(self, config, machine, plan) -> None:
        """config.yaml (the resolved job config) and plan.json (machine facts, the model and the
        plan; under DDP the plan holds the world: ranks, per-rank and global batch, threads per rank)."""
        from cpuft.config.job import write_config_file

        self.path.mkdir(parents=True, exist_ok=True)
        write_config_file(config, self.config_file)
        header = {"machine": machine.to_dict(), "plan": plan.to_dict(),
                  "model": {"model": config.model, "revision": config.revision,
                            "trust_remote_code": config.trust_remote_code,
                            "dataset": config.dataset, "dataset_revision": config.dataset_revision}}
        atomic_write_json(self.plan_file, header)

    # ------------------------------------------------------------------ after training

    @contextlib.contextmanager
    def write_adapter(self) -> Iterator[Path]:
        """A temporary directory to save the adapter in; it becomes adapter/ when the block ends
        without an error, replacing any older one."""
        with atomic_directory(self.adapter_dir) as temporary:
            yield temporary

    def write_summary(self, summary: Summary) -> None:
        atomic_write_json(self.summary_file, summary.to_dict())

    def read_summary(self) -> Summary | None:
        """summary.json's Summary; None while the run has none (it has not finished or stopped
        yet) or the file is not a summary."""
        try:
            text = self.summary_file.read_text()
        except OSError:
            return None
        return Summary.parse(text)

    def read_metrics(self) -> list[dict]:
        """metrics.jsonl's records; [] when the file does not exist yet."""
        if not self.metrics_file.is_file():
            return []
        records = []
        with open(self.metrics_file) as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut short by a hard kill; the rest are whole
        return records

    def _drop_metrics_after(self, step: int) -> None:
        """A hard kill can log steps past the last checkpoint; the resumed run logs them again."""
        kept = [r for r in self.read_metrics() if r.get("step", 0) <= step]
        atomic_write_text(self.metrics_file, "".join(json.dumps(r, default=str) + "\n" for r in kept))


def _on_read_only_filesystem(path: Path) -> bool:
    """True when `path` lies on a filesystem mounted read-only (statvfs's ST_RDONLY flag)."""
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False
