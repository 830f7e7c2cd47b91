"""Row formats: tell a dataset's format from its first row's keys, validate every row, and convert
it to TRL's conversational shape ({"messages": [...]}) or plain text ({"text": ...}).

Formats (names from `cpuft.config.choices.DatasetFormat`), detected from the first row's keys in
this order (the most specific shape first), or forced with `dataset_format`:
- lima:              {"conversations": ["user", "assistant", ...], "source": ...}
- messages:          {"messages": [{"role": "user"|"assistant"|"system", "content": ...}, ...]}
- prompt_completion: {"prompt": ..., "completion": ...}
- alpaca:            {"instruction": ..., "input": ... (optional), "output": ...}
- text:              {"text": ...}  (plain language modelling, no chat template)

Limits: one format per dataset (every row is converted with the first row's format); text fields
must be strings; a conversation alternates user/assistant after an optional first system
message and ends with the assistant. Every problem is a UserError naming the row's file and
line (or row) and the field.
"""

from __future__ import annotations

from typing import Any

from cpuft.config.choices import DatasetFormat, values
from cpuft.data.readers import Row
from cpuft.errors import UserError

ROLES = ("system", "user", "assistant")
FORMAT_KEYS = {  # detection order matters: the most specific shape first
    "lima": ("conversations",),
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
}


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
        choices = [name for name in values(DatasetFormat) if name != "auto"]
        raise UserError(f"unknown dataset format {row_format!r}: choose one of {', '.join(choices)}.")
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
