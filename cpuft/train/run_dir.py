"""The run directory's policy: where a run goes, what may be written into it, and resuming it.

Owns: the default directory (runs/sft-YYYYmmdd-HHMMSS), refusing to write into a directory that
already holds files (unless resuming), the checks `--resume` needs, the run header (config.yaml
and plan.json, written once everything has been validated), trimming metrics.jsonl back to the
checkpoint a run resumes from, and reading metrics.jsonl back.

Limits: one process writes a run directory at a time; nothing here locks it (cpuft.batch does
that for queued jobs).
"""

from __future__ import annotations

import json
import sys
from datetime import datetime
from pathlib import Path

from cpuft.artifacts import atomic_write_json, atomic_write_text
from cpuft.checkpoints import checkpoint_step, newest_complete_checkpoint, set_aside
from cpuft.config.job import write_config_file
from cpuft.errors import UserError


def default_run_dir() -> Path:
    return Path("runs") / datetime.now().strftime("sft-%Y%m%d-%H%M%S")


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """UserError unless `run_dir` may be used: empty or absent for a new run, a cpuft run to resume."""
    if resume:
        if not (run_dir / "config.yaml").is_file():
            raise UserError(f"--resume: {run_dir} is not a cpuft run directory (no config.yaml).")
        return
    if run_dir.exists() and any(run_dir.iterdir()):
        raise UserError(
            f"output directory {run_dir} already holds files; cpuft will not overwrite a run."
            " Pass --resume to continue it, or choose another --output-dir."
        )


def checkpoint_to_resume(run_dir: Path) -> str:
    """The last complete checkpoint-N in `run_dir`; newer ones a hard kill cut short are set aside
    (renamed, with a warning). metrics.jsonl is trimmed to it, since the resumed run logs the
    steps after it again. UserError when there is none."""
    complete, incomplete = newest_complete_checkpoint(run_dir)
    if complete is None:
        found = f" ({len(incomplete)} cut short, left as they are)" if incomplete else ""
        raise UserError(f"--resume: no complete checkpoint-N directory in {run_dir} to resume from{found}.")
    set_aside(incomplete, log=lambda line: print(f"cpuft: warning: {line}", file=sys.stderr))
    _drop_metrics_after(run_dir / "metrics.jsonl", checkpoint_step(complete.name))
    return str(complete)


def write_run_header(run_dir: Path, config, machine, plan) -> None:
    """config.yaml (the resolved job config) and plan.json (machine facts, the model and the plan;
    under DDP the plan holds the world: ranks, per-rank and global batch, threads per rank)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_config_file(config, run_dir / "config.yaml")
    header = {"machine": machine.to_dict(), "plan": plan.to_dict(),
              "model": {"model": config.model, "revision": config.revision,
                        "trust_remote_code": config.trust_remote_code,
                        "dataset": config.dataset, "dataset_revision": config.dataset_revision}}
    atomic_write_json(run_dir / "plan.json", header)


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl's records; [] when the file does not exist yet."""
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


def _drop_metrics_after(path: Path, step: int) -> None:
    """A hard kill can log steps past the last checkpoint; the resumed run logs them again."""
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    atomic_write_text(path, "".join(json.dumps(r, default=str) + "\n" for r in kept))
