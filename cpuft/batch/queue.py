"""The batch queue file: a YAML list of named `cpuft sft` jobs, validated whole before anything runs.

    # queue.yaml
    defaults:              # optional: merged under every job (a job's own keys win)
      model: models/tiny
      dataset: data/train.jsonl
      max_steps: 200
    max_failures: 3        # optional: failed runs per job before it is given up (default 3)
    runs_dir: runs         # optional: where run directories go (default <queue dir>/runs)
    sync_to: gs://bucket/queues/q1   # optional: the queue's durable copy (`cpuft batch run --sync-to` wins)
    jobs:
      - name: r16          # required, unique; letters, digits, '.', '_', '-'
        lora_r: 16
      - name: r32
        lora_r: 32
        output_dir: /data/runs/r32   # optional; default <runs_dir>/<name>

A bare top-level list of jobs is accepted too. Every job key other than `name` is a `cpuft sft`
config key (`cpuft sft --help`), checked and typed exactly as in a `--config` file. With a queue
`sync_to`, each job's run is stored at `<sync_to>/jobs/<name>` (see cpuft.batch.durable), so a job
may not set its own `sync_to` then.

Relative paths (model, dataset, output_dir, runs_dir, a local sync_to) are relative to the queue file's
directory, not to the working directory: a timer or a VM startup script starts the runner from
anywhere. Local model directories and dataset files must exist and the dataset rows must convert;
Hub ids cannot be checked offline and are left to the job.

Every problem in every job is collected and reported at once as one UserError, each line naming
the file, line, job and field.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from cpuft.config.job import SFTJobConfig, resolve_config, typed_config_value
from cpuft.config.yaml_file import key_lines, load_yaml_with_nodes
from cpuft.errors import UserError

JOB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
QUEUE_KEYS = ("jobs", "defaults", "max_failures", "runs_dir", "sync_to")
DEFAULT_MAX_FAILURES = 3


@dataclass(frozen=True)
class BatchJob:
    name: str
    config: SFTJobConfig  # fully resolved; output_dir and local paths absolute
    line: int  # where the job starts in the queue file, for messages

    @property
    def run_dir(self) -> Path:
        return Path(self.config.output_dir)

    @property
    def config_sha(self) -> str:
        """Fingerprint of the resolved config: a changed job is recognised on the next start."""
        text = json.dumps(self.config.to_dict(), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class BatchQueue:
    path: Path
    jobs: tuple[BatchJob, ...]
    max_failures: int
    sync_to: str | None = None  # the queue's store (a URL, or an absolute local path)

    def job(self, name: str) -> BatchJob:
        for job in self.jobs:
            if job.name == name:
                return job
        raise KeyError(name)

    def with_sync_to(self, url: str | None) -> BatchQueue:
        """This queue stored at `url` (`cpuft batch run --sync-to`, which wins over the file's key).

        A job with its own `sync_to` is refused: the queue stores each job at <url>/jobs/<name>.
        """
        url = store_url(Path.cwd(), url) if url else self.sync_to
        if not url:
            return replace(self, sync_to=None)
        clashing = [
            f"{self.path}:{job.line}: job '{job.name}': field 'sync_to': the queue is stored at {url},"
            f" which keeps this job at {url}/jobs/{job.name}; remove the job's own sync_to."
            for job in self.jobs if job.config.sync_to
        ]
        if clashing:
            raise UserError(f"queue {self.path}: {len(clashing)} job(s) set their own sync_to; nothing was run:\n  "
                            + "\n  ".join(clashing))
        return replace(self, sync_to=url)


def default_state_dir(queue_path: str | Path) -> Path:
    """`queue.yaml` keeps its state in `queue.batch/` beside it."""
    queue_path = Path(queue_path).resolve()
    return queue_path.with_name(queue_path.stem + ".batch")


def load_queue(path: str | Path, check_files: bool = True) -> BatchQueue:
    """Parse and validate the whole queue; raise one UserError listing every problem found.

    `check_files=False` skips the model/dataset checks (for `batch status`, which only needs
    the job names and run directories).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"queue file {path} does not exist.")
    path = path.resolve()
    raw, root = load_yaml_with_nodes(path)

    errors: list[str] = []
    if raw is None:
        raw, root = [], None
    if isinstance(raw, list):
        raw = {"jobs": raw}
        root_keys: dict[str, yaml.Node] = {"jobs": root}
        top_lines: dict[str, int] = {"jobs": 1}
    elif isinstance(raw, dict):
        root_keys = {k.value: v for k, v in root.value}
        top_lines = key_lines(root)
        for key in raw:
            if key not in QUEUE_KEYS:
                errors.append(
                    f"{path}:{top_lines.get(key, '?')}: unknown queue key '{key}'; the top level holds"
                    f" {', '.join(QUEUE_KEYS)} (job settings go under 'jobs' or 'defaults')."
                )
    else:
        raise UserError(f"{path}: the top level must be a list of jobs or a mapping with 'jobs:', got {type(raw).__name__}.")

    max_failures = raw.get("max_failures", DEFAULT_MAX_FAILURES)
    if isinstance(max_failures, bool) or not isinstance(max_failures, int) or max_failures < 1:
        errors.append(f"{path}:{top_lines.get('max_failures', '?')}: max_failures must be a positive integer, got {max_failures!r}.")
        max_failures = DEFAULT_MAX_FAILURES
    runs_dir_value = raw.get("runs_dir", "runs")
    if not isinstance(runs_dir_value, str) or not runs_dir_value:
        errors.append(f"{path}:{top_lines.get('runs_dir', '?')}: runs_dir must be a directory path, got {runs_dir_value!r}.")
        runs_dir_value = "runs"
    runs_dir = _relative_to(path.parent, runs_dir_value)
    sync_to = raw.get("sync_to")
    if sync_to is not None and (not isinstance(sync_to, str) or not sync_to.strip()):
        errors.append(f"{path}:{top_lines.get('sync_to', '?')}: sync_to must be a URL (gs://bucket/path,"
                      f" s3://...) or a directory path, got {sync_to!r}.")
        sync_to = None

    defaults = _typed_defaults(path, raw.get("defaults"), root_keys.get("defaults"), top_lines.get("defaults"), errors)
    jobs_raw = raw.get("jobs", [])
    if jobs_raw is None:
        jobs_raw = []
    if not isinstance(jobs_raw, list):
        errors.append(f"{path}:{top_lines.get('jobs', '?')}: 'jobs' must be a list of job mappings, got {type(jobs_raw).__name__}.")
        jobs_raw = []
    jobs_node = root_keys.get("jobs")
    item_nodes = jobs_node.value if isinstance(jobs_node, yaml.SequenceNode) else [None] * len(jobs_raw)

    jobs: list[BatchJob] = []
    first_line_of: dict[str, int] = {}
    for index, (item, node) in enumerate(zip(jobs_raw, item_nodes)):
        line = node.start_mark.line + 1 if node is not None else 0
        job = _parse_job(path, index, item, node, line, defaults, runs_dir, check_files, errors)
        if job is None:
            continue
        if job.name in first_line_of:
            errors.append(
                f"{path}:{line}: job '{job.name}': duplicate name (first defined on line"
                f" {first_line_of[job.name]}); every job needs its own name."
            )
            continue
        first_line_of[job.name] = line
        jobs.append(job)

    owners: dict[Path, str] = {}
    for job in jobs:
        if job.run_dir in owners:
            errors.append(
                f"{path}:{job.line}: job '{job.name}': field 'output_dir': {job.run_dir} is also the run"
                f" directory of job '{owners[job.run_dir]}'; each job needs its own."
            )
        owners.setdefault(job.run_dir, job.name)

    if errors:
        count = f"{len(errors)} problem{'s' if len(errors) > 1 else ''}"
        raise UserError(f"queue {path} has {count}; nothing was run:\n  " + "\n  ".join(errors))
    queue = BatchQueue(path=path, jobs=tuple(jobs), max_failures=max_failures,
                       sync_to=store_url(path.parent, sync_to) if sync_to else None)
    return queue.with_sync_to(None)  # refuses a job's own sync_to when the queue has one


def _typed_defaults(path: Path, raw: Any, node, line: int | None, errors: list[str]) -> dict[str, tuple[Any, int]]:
    """`defaults:` as {key: (typed value, line)}."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        errors.append(f"{path}:{line}: 'defaults' must be a mapping of `cpuft sft` config keys.")
        return {}
    lines = key_lines(node)
    typed = {}
    for key, value in raw.items():
        where = f"{path}:{lines.get(key, line)}: defaults"
        if key == "name":
            errors.append(f"{where}: 'name' cannot have a default; every job names itself.")
            continue
        try:
            typed[key] = (typed_config_value(key, value, where), lines.get(key, line))
        except UserError as exc:
            errors.append(str(exc))
    return typed


def _parse_job(path, index, item, node, line, defaults, runs_dir: Path, check_files: bool, errors: list[str]) -> BatchJob | None:
    if not isinstance(item, dict):
        errors.append(f"{path}:{line}: jobs[{index}] must be a mapping with a 'name' and config keys, got {type(item).__name__}.")
        return None
    name = item.get("name")
    if not isinstance(name, str) or not JOB_NAME.match(name):
        what = "has no 'name'" if name is None else f"has name {name!r}"
        errors.append(
            f"{path}:{line}: jobs[{index}] {what}; a job name is 1-100 letters, digits, '.', '_' or '-'"
            " (it names the run directory)."
        )
        return None
    where_job = f"job '{name}'"
    lines = key_lines(node)
    duplicated = _duplicate_keys(node)
    if duplicated:
        key, key_line = duplicated
        errors.append(f"{path}:{key_line}: {where_job}: field '{key}' is given twice.")
        return None

    # values carry the line they came from, so a later error can point at it
    values: dict[str, tuple[Any, int]] = dict(defaults)
    for key, value in item.items():
        if key == "name":
            continue
        where = f"{path}:{lines.get(key, line)}: {where_job}"
        try:
            values[key] = (typed_config_value(key, value, where), lines.get(key, line))
        except UserError as exc:
            errors.append(str(exc))
            return None

    def fail(field: str, message: str) -> None:
        errors.append(f"{path}:{values.get(field, (None, line))[1]}: {where_job}: field '{field}': {message}")

    plain = {key: value for key, (value, _) in values.items()}
    plain["output_dir"] = str(_relative_to(path.parent, plain["output_dir"]) if plain.get("output_dir") else runs_dir / name)
    base = path.parent
    try:
        if "model" in plain:
            plain["model"] = _resolve_model(base, plain["model"], check_files)
        if "dataset" in plain:
            plain["dataset"] = _resolve_dataset(base, plain["dataset"], check_files)
    except _FieldProblem as problem:
        fail(problem.field, problem.message)
        return None
    origins = {key: f"{path}:{key_line}: {where_job}" for key, (_, key_line) in values.items()}
    try:
        config = resolve_config(None, {}, base=plain, origins=origins)
    except UserError as exc:
        message = str(exc)
        errors.append(message if message.startswith(f"{path}:") else f"{path}:{line}: {where_job}: {message}")
        return None
    if check_files:
        try:
            _check_rows(config)
        except UserError as exc:
            fail("dataset", str(exc))
            return None
    return BatchJob(name=name, config=config, line=line)


class _FieldProblem(Exception):
    def __init__(self, field: str, message: str):
        self.field, self.message = field, message


def _looks_local(value: str) -> bool:
    return value.startswith((".", "/", "~"))


def store_url(base: Path, value: str) -> str:
    """A URL (`gs://...`, `file://...`) as written; a local path made absolute against `base`."""
    value = value.strip()
    if "://" in value:
        return value.rstrip("/")
    return str(_relative_to(base, value))


def _relative_to(base: Path, value: str) -> Path:
    candidate = Path(os.path.expanduser(value))
    # abspath, not resolve(): normalise '..' but keep the user's symlinks in what we record
    return Path(os.path.abspath(candidate if candidate.is_absolute() else base / candidate))


def _resolve_model(base: Path, value: str, check: bool) -> str:
    local = _relative_to(base, value)
    if local.is_dir():
        if check and not (local / "config.json").is_file():
            raise _FieldProblem("model", f"{local} has no config.json; point it at a Hugging Face model directory.")
        return str(local)
    if _looks_local(value) or local.exists():
        if check:
            raise _FieldProblem("model", f"model directory {value} (resolved to {local}) does not exist.")
        return str(local)
    return value  # a Hub id: checked by the job itself


def _resolve_dataset(base: Path, value: str, check: bool) -> str:
    from cpuft.data.readers import LOCAL_SUFFIXES, SAMPLE_NAME

    if value == SAMPLE_NAME:
        return value
    local = _relative_to(base, value)
    if local.is_file():
        return str(local)
    if local.is_dir() and check:
        raise _FieldProblem("dataset", f"{local} is a directory; name a .jsonl, .json or .parquet file in it.")
    if _looks_local(value) or Path(value).suffix.lower() in LOCAL_SUFFIXES:
        if check:
            raise _FieldProblem("dataset", f"dataset file {value} (resolved to {local}) does not exist.")
        return str(local)
    return value  # a Hub id


def _check_rows(config: SFTJobConfig) -> None:
    """Read and convert a local dataset now, so a bad row stops the queue before any job runs."""
    from cpuft.data.prepare import read_and_convert
    from cpuft.data.readers import SAMPLE_NAME

    if config.dataset != SAMPLE_NAME and not Path(config.dataset).is_file():
        return  # Hub dataset: only the job can reach it
    read_and_convert(config.dataset, config.dataset_format, config.dataset_split, config.max_samples)


def _duplicate_keys(node) -> tuple[str, int] | None:
    """PyYAML keeps the last of two equal keys silently; in a job that is almost always a mistake."""
    if not isinstance(node, yaml.MappingNode):
        return None
    seen = set()
    for key_node, _ in node.value:
        if key_node.value in seen:
            return key_node.value, key_node.start_mark.line + 1
        seen.add(key_node.value)
    return None
