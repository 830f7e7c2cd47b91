"""Training data, end to end: read the rows, convert them, split off the held-out rows.

`prepare_dataset` is what `cpuft sft`, `cpuft plan` and `cpuft eval` call: `cpuft.data.readers`
reads the source (a Hub id, a local .jsonl/.json/.parquet file, or `sample`, the bundled
LIMA-shaped sample written for cpuft, not LIMA's text), `cpuft.data.formats` detects and
converts the row format, and this module applies `max_samples` and the seeded train/eval split.

Limits: the split is a seeded shuffle of whole rows (no stratification, no dedup); fewer than 10
rows get no eval split; every row is converted (and so validated) before any is returned.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from cpuft.data.formats import convert_row, detect_format
from cpuft.data.readers import load_rows
from cpuft.errors import UserError


@dataclass
class PreparedData:
    train: Any  # datasets.Dataset
    eval: Any | None
    row_format: str
    source: str
    num_rows: int
    # Where each row came from ("train.jsonl:12"), in the order of `train` / `eval`, for messages.
    train_where: list[str] | None = None
    eval_where: list[str] | None = None


def read_and_convert(
    source: str, row_format: str = "auto", split: str = "train", max_samples: int | None = None,
    revision: str | None = None,
) -> tuple[list[dict[str, Any]], str, list[str]]:
    """Every row of `source` (the first `max_samples`) validated and converted, the format used
    (detected from the first row when `row_format` is "auto"), and where each row came from."""
    rows = load_rows(source, split, revision)
    if max_samples is not None:
        rows = rows[:max_samples]
    if not rows:
        raise UserError(f"{source}: no rows to train on.")
    row_format = detect_format(rows[0]) if row_format == "auto" else row_format
    return [convert_row(row, row_format) for row in rows], row_format, [row.where for row in rows]


def prepare_dataset(
    source: str,
    row_format: str = "auto",
    split: str = "train",
    eval_fraction: float = 0.05,
    max_samples: int | None = None,
    seed: int = 42,
    revision: str | None = None,
) -> PreparedData:
    """Load, validate and convert; split off `eval_fraction` of the rows for evaluation."""
    from datasets import Dataset

    converted, row_format, where = read_and_convert(source, row_format, split, max_samples, revision)
    train_order, eval_order = split_order(len(converted), eval_fraction, seed)
    eval_rows = [converted[i] for i in eval_order]
    return PreparedData(
        train=Dataset.from_list([converted[i] for i in train_order]),
        eval=Dataset.from_list(eval_rows) if eval_rows else None,
        row_format=row_format,
        source=source,
        num_rows=len(converted),
        train_where=[where[i] for i in train_order],
        eval_where=[where[i] for i in eval_order] or None,
    )


def split_order(rows: int, eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, eval) row indices: a seeded shuffle, `eval_fraction` of the rows held out (at least
    one from 10 rows up, none below 10 rows)."""
    order = list(range(rows))
    random.Random(seed).shuffle(order)
    num_eval = round(rows * eval_fraction) if eval_fraction > 0 and rows >= 10 else 0
    if eval_fraction > 0 and num_eval == 0 and rows >= 10:
        num_eval = 1
    return order[num_eval:], order[:num_eval]
