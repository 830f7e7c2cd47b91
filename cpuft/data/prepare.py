"""Training data: load, detect the row format, validate, convert to TRL's conversational format.

Sources: a Hub dataset id (LIMA is `GAIR/lima`, gated), a local .jsonl/.json/.parquet file, or
`sample` (the bundled LIMA-shaped sample, written for cpuft; not LIMA's text).

Row formats, detected from the first row's keys (or forced with `dataset_format`):
- lima:              {"conversations": ["user", "assistant", ...], "source": ...}
- messages:          {"messages": [{"role": "user"|"assistant"|"system", "content": ...}, ...]}
- prompt_completion: {"prompt": ..., "completion": ...}
- alpaca:            {"instruction": ..., "input": ... (optional), "output": ...}
- text:              {"text": ...}  (plain language modelling, no chat template)

Every problem is a UserError naming the file, line (or row) and field.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from cpuft.errors import UserError, first_line

SAMPLE_NAME = "sample"
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")
ROLES = ("system", "user", "assistant")
FORMAT_KEYS = {  # detection order matters: the most specific shape first
    "lima": ("conversations",),
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
}


@dataclass(frozen=True)
class Row:
    data: dict[str, Any]
    where: str  # "file.jsonl:12" or "GAIR/lima[train] row 12": for error messages


@dataclass
class PreparedData:
    train: Any  # datasets.Dataset
    eval: Any | None
    row_format: str
    source: str
    num_rows: int


def sample_path() -> Path:
    return Path(str(resources.files("cpuft") / "data" / "lima_sample.jsonl"))


def prepare_dataset(
    source: str,
    row_format: str = "auto",
    split: str = "train",
    eval_fraction: float = 0.05,
    max_samples: int | None = None,
    seed: int = 42,
) -> PreparedData:
    """Load, validate and convert; split off `eval_fraction` of the rows for evaluation."""
    from datasets import Dataset

    rows = load_rows(source, split)
    if max_samples is not None:
        rows = rows[:max_samples]
    if not rows:
        raise UserError(f"{source}: no rows to train on.")
    row_format = detect_format(rows[0]) if row_format == "auto" else row_format
    converted = [convert_row(row, row_format) for row in rows]

    order = list(range(len(converted)))
    random.Random(seed).shuffle(order)
    num_eval = round(len(converted) * eval_fraction) if eval_fraction > 0 and len(converted) >= 10 else 0
    if eval_fraction > 0 and num_eval == 0 and len(converted) >= 10:
        num_eval = 1
    eval_rows = [converted[i] for i in order[:num_eval]]
    train_rows = [converted[i] for i in order[num_eval:]]
    return PreparedData(
        train=Dataset.from_list(train_rows),
        eval=Dataset.from_list(eval_rows) if eval_rows else None,
        row_format=row_format,
        source=source,
        num_rows=len(converted),
    )


# ----------------------------------------------------------------------------- loading


def load_rows(source: str, split: str = "train") -> list[Row]:
    if source == SAMPLE_NAME:
        return _read_jsonl(sample_path())
    path = Path(os.path.expanduser(source))
    if path.is_dir():
        raise UserError(
            f"dataset {source} is a directory; point --dataset at a .jsonl, .json or .parquet file in it."
        )
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            return _read_jsonl(path)
        if suffix == ".json":
            return _read_json(path)
        if suffix == ".parquet":
            return _read_parquet(path)
        raise UserError(f"dataset {source}: unsupported file type {suffix!r}; use .jsonl, .json or .parquet.")
    if path.suffix.lower() in LOCAL_SUFFIXES or source.startswith((".", "/", "~")):
        raise UserError(f"dataset file {source} does not exist.")
    return _read_hub(source, split)


def _read_jsonl(path: Path) -> list[Row]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno}).") from None
            if not isinstance(data, dict):
                raise UserError(f"{where}: each line must be a JSON object, got {type(data).__name__}.")
            rows.append(Row(data, where))
    return rows


def _read_json(path: Path) -> list[Row]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}).") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of rows (or JSON Lines in a .jsonl file).")
    rows = []
    for index, item in enumerate(data):
        where = f"{path} row {index}"
        if not isinstance(item, dict):
            raise UserError(f"{where}: each row must be an object, got {type(item).__name__}.")
        rows.append(Row(item, where))
    return rows


def _read_parquet(path: Path) -> list[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise UserError(f"{path}: cannot read as Parquet ({exc}).") from None
    return [Row(item, f"{path} row {index}") for index, item in enumerate(table.to_pylist())]


def _read_hub(dataset_id: str, split: str) -> list[Row]:
    from datasets import load_dataset

    try:
        dataset = load_dataset(dataset_id, split=split, token=os.environ.get("HF_TOKEN"))
    except Exception as exc:  # datasets raises ConnectionError, DatasetNotFoundError, gated errors...
        raise UserError(
            f"could not load dataset '{dataset_id}' (split '{split}') from the Hugging Face Hub:"
            f" {first_line(exc)}. If you are offline or the dataset is gated (GAIR/lima is: accept its"
            " terms on the Hub, then set HF_TOKEN), download it on a connected machine and pass"
            " the local file instead, e.g. --dataset ./lima/train.jsonl (JSONL/JSON/Parquet rows"
            " with a 'conversations' list), or use --dataset sample for the bundled sample."
        ) from None
    return [Row(dict(item), f"{dataset_id}[{split}] row {index}") for index, item in enumerate(dataset)]


# ----------------------------------------------------------------------------- formats


def detect_format(row: Row) -> str:
    for name, keys in FORMAT_KEYS.items():
        if all(key in row.data for key in keys):
            return name
    expected = "; ".join(f"{name}: {', '.join(keys)}" for name, keys in FORMAT_KEYS.items())
    raise UserError(
        f"{row.where}: cannot tell the row format from its keys {sorted(row.data)}. Expected one of"
        f" ({expected}), or pass --dataset-format."
    )


def convert_row(row: Row, row_format: str) -> dict[str, Any]:
    """Validate one row and return {'messages': [...]} (or {'text': ...} for plain text)."""
    converters = {
        "lima": _from_lima,
        "messages": _from_messages,
        "prompt_completion": _from_prompt_completion,
        "alpaca": _from_alpaca,
        "text": _from_text,
    }
    if row_format not in converters:
        raise UserError(f"unknown dataset format {row_format!r}: choose one of {', '.join(converters)}.")
    return converters[row_format](row)


def _text_field(row: Row, name: str, required: bool = True) -> str:
    value = row.data.get(name)
    if value is None and not required:
        return ""
    if name not in row.data:
        raise UserError(f"{row.where}: missing field '{name}'.")
    if not isinstance(value, str):
        raise UserError(f"{row.where}: field '{name}' must be a string, got {type(value).__name__}.")
    if required and not value.strip():
        raise UserError(f"{row.where}: field '{name}' is empty.")
    return value


def _from_lima(row: Row) -> dict:
    turns = row.data.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise UserError(f"{row.where}: field 'conversations' must be a non-empty list of strings.")
    for index, turn in enumerate(turns):
        if not isinstance(turn, str) or not turn.strip():
            raise UserError(f"{row.where}: field 'conversations[{index}]' must be a non-empty string.")
    if len(turns) % 2:
        raise UserError(
            f"{row.where}: field 'conversations' has {len(turns)} turns; LIMA rows alternate"
            " user/assistant and end with the assistant, so the count must be even."
        )
    roles = ("user", "assistant")
    return {"messages": [{"role": roles[i % 2], "content": turn} for i, turn in enumerate(turns)]}


def _from_messages(row: Row) -> dict:
    messages = row.data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{row.where}: field 'messages' must be a non-empty list.")
    clean = []
    for index, message in enumerate(messages):
        where = f"{row.where}: field 'messages[{index}]'"
        if not isinstance(message, dict):
            raise UserError(f"{where} must be an object with 'role' and 'content'.")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise UserError(f"{where}.role is {role!r}; allowed roles: {', '.join(ROLES)}.")
        if role == "system" and index != 0:
            raise UserError(f"{where}: a system message may only come first.")
        if not isinstance(content, str) or not content.strip():
            raise UserError(f"{where}.content must be a non-empty string.")
        clean.append({"role": role, "content": content})
    dialogue = [m["role"] for m in clean if m["role"] != "system"]
    offset = len(clean) - len(dialogue)
    for index, role in enumerate(dialogue):
        expected = ("user", "assistant")[index % 2]
        if role != expected:
            raise UserError(
                f"{row.where}: field 'messages[{index + offset}]'.role is '{role}' but '{expected}'"
                " was expected: turns must alternate user/assistant, starting with user."
            )
    if not dialogue or dialogue[-1] != "assistant":
        raise UserError(f"{row.where}: field 'messages' must end with an assistant message to learn from.")
    return {"messages": clean}


def _from_prompt_completion(row: Row) -> dict:
    prompt = _text_field(row, "prompt")
    completion = _text_field(row, "completion")
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]}


def _from_alpaca(row: Row) -> dict:
    instruction = _text_field(row, "instruction")
    extra = _text_field(row, "input", required=False)
    output = _text_field(row, "output")
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]}


def _from_text(row: Row) -> dict:
    return {"text": _text_field(row, "text")}
