"""`cpuft batch status`: the queue's jobs joined with their state rows, as a table or JSON."""

from __future__ import annotations

import time
from typing import Any

from cpuft.batch.queue import BatchQueue
from cpuft.batch.state import JobRecord
from cpuft.summary import Summary

COLUMNS = ("job", "state", "attempts", "failures", "steps", "final loss", "eval loss", "tok/s", "run dir", "note")


def status_rows(queue: BatchQueue, records: list[JobRecord], lock_holder: str | None) -> list[dict[str, Any]]:
    """One dict per job in queue order; jobs never started are 'queued'.

    A 'running' row while nobody holds the lock is marked stale: its scheduler died and the next
    `cpuft batch run` resumes it.
    """
    by_name = {r.name: r for r in records}
    rows = []
    for job in queue.jobs:
        record = by_name.get(job.name)
        if record is None:
            rows.append({"name": job.name, "state": "queued", "attempts": 0, "failures": 0,
                         "run_dir": str(job.run_dir), "stale": False, "summary": {}})
            continue
        row = record.to_dict()
        row["stale"] = record.state == "running" and lock_holder is None
        row["retries_left"] = max(0, queue.max_failures - record.failures) if record.retryable else 0
        rows.append(row)
    return rows


def format_status_table(rows: list[dict[str, Any]], lock_holder: str | None) -> str:
    table = [COLUMNS]
    for row in rows:
        # The state row's copy of summary.json (a snapshot from another machine may hold only some figures).
        summary = Summary.from_dict(row["summary"]) if row.get("summary") else None
        table.append((
            row["name"],
            row["state"] + (" (stale)" if row.get("stale") else ""),
            str(row.get("attempts", 0)),
            str(row.get("failures", 0)),
            *_summary_cells(summary),
            row.get("run_dir", ""),
            _shorten(_note(row), 100),
        ))
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["state"]] = counts.get(row["state"], 0) + 1
    totals = ", ".join(f"{n} {state}" for state, n in counts.items()) or "no jobs"
    runner = f"scheduler running ({lock_holder})" if lock_holder else "no scheduler running"
    return "\n".join(lines) + f"\n\n{len(rows)} job(s): {totals}; {runner}."


def _summary_cells(summary: Summary | None) -> tuple[str, str, str, str]:
    """steps (of max_steps), final loss, eval loss, tok/s; dashes for a job without a summary yet."""
    if summary is None:
        return ("-",) * 4
    steps = f"{summary.steps}/{summary.max_steps}" if summary.max_steps else str(summary.steps)
    return (steps, _number(summary.final_loss), _number(summary.eval_loss),
            _number(summary.train_tokens_per_second, "{:.0f}"))


def _note(row: dict[str, Any]) -> str:
    if row.get("stale"):
        return f"scheduler pid {row.get('runner_pid')} is gone; the next run resumes it"
    if row["state"] == "running":
        since = row.get("started_at")
        return f"pid {row.get('child_pid')}, {time.time() - since:.0f} s" if since else ""
    if row["state"] == "failed":
        tail = "" if row.get("retryable") else " (not retried: fix the queue file)"
        return f"exit {row.get('exit_code')}: {row.get('last_error') or ''}{tail}"
    if row["state"] == "preempted":
        return row.get("last_error") or ""
    return ""


def _shorten(text: str, width: int) -> str:
    """The table stays readable; `--json` has the whole message."""
    return text if len(text) <= width else text[: width - 3] + "..."


def _number(value, fmt: str = "{:.4f}") -> str:
    return "-" if value is None else fmt.format(value)
