"""Preference data for `cpuft dpo`: read pairs of a chosen and a rejected reply, validate every
row, hand TRL's `DPOTrainer` rows in its own preference format, and split off the held-out pairs.

Formats (TRL's "preference" type), told from each row's values and required to be the same for
every row:
- standard, explicit prompt:       {"prompt": "...", "chosen": "...", "rejected": "..."}
- standard, implicit prompt:       {"chosen": "<prompt> ...", "rejected": "<prompt> ..."}
- conversational, explicit prompt: {"prompt": [{"role": "user", ...}], "chosen": [{"role": "assistant", ...}],
                                    "rejected": [{"role": "assistant", ...}]}
- conversational, implicit prompt: {"chosen": [user, ..., assistant], "rejected": [user, ..., assistant]}
  (a string "prompt" next to conversational chosen/rejected, as in HuggingFaceH4/ultrafeedback_binarized,
  is a copy of the first user turn: it is ignored and the row is read as implicit.)

Output rows are explicit {"prompt", "chosen", "rejected"}, conversational kept conversational (TRL
applies the model's chat template) and standard kept as strings (TRL appends EOS). Implicit rows are
split here with TRL's own `trl.data_utils.extract_prompt` (the longest shared prefix; for strings,
character by character), the function `DPOTrainer` would call itself, so the rows train the same,
and so that the split is validated like any explicit row (a non-empty prompt ending in a user turn,
completions that are assistant turns, a chosen that differs from its rejected) before any training
starts, and every later consumer (the planner's token counts, held-out margins) sees one shape.

`--dataset sample` means the bundled `preference_sample.jsonl` (72 conversational explicit-prompt
pairs on the topics of the LIMA-shaped SFT sample, written for cpuft): chosen replies open with
"Happy to help.", answer in full sentences and close with "I hope this helps."; rejected replies
are curt non-answers ("I don't know." and variants), a contrast a tiny model learns in a few steps.

Limits: text only (message content must be a string: no images, no tool calls, roles system / user
/ assistant only, a system message only first, user and assistant alternating); one format for the
whole dataset; rows with extra keys are read, and the extra keys dropped; the split is the seeded
shuffle of `cpuft.data.prepare.prepare_dataset`. Every problem is a UserError naming the file and
line (or Hub row) and the field, e.g. `chosen[1].content`, raised before anything is returned;
SFT-shaped data (messages, conversations, prompt/completion, ...) is refused with a pointer to
`cpuft sft`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from cpuft.data.formats import FORMAT_KEYS, ROLES
from cpuft.data.prepare import split_order
from cpuft.data.readers import SAMPLE_NAME, Row, load_rows
from cpuft.errors import UserError

PREFERENCE_SAMPLE = SAMPLE_NAME  # `--dataset sample`: for `cpuft dpo`, the preference companion
PREFERENCE_KEYS = ("prompt", "chosen", "rejected")
CONVERSATIONAL, STANDARD = "conversational", "standard"
EXPLICIT, IMPLICIT = "explicit", "implicit"


@dataclass
class PreparedPreferences:
    train: Any  # datasets.Dataset of explicit {"prompt", "chosen", "rejected"} rows
    eval: Any | None  # the held-out pairs, or None (eval_fraction 0, or fewer than 10 rows)
    row_format: str  # "conversational" (lists of messages) or "standard" (strings)
    prompt_style: str  # "explicit" (the rows had a prompt) or "implicit" (extracted here)
    source: str
    num_rows: int
    # Where each row came from ("pairs.jsonl:12"), in the order of `train` / `eval`, for messages.
    train_where: list[str]
    eval_where: list[str] | None

    @property
    def description(self) -> str:
        """E.g. "conversational, explicit prompt", for the plan table and logs."""
        return f"{self.row_format}, {self.prompt_style} prompt"


def preference_sample_path() -> Path:
    """The bundled preference pairs (`cpuft dpo --dataset sample`), package data of cpuft.data."""
    return Path(str(resources.files("cpuft") / "data" / "preference_sample.jsonl"))


def prepare_preferences(
    source: str,
    split: str = "train",
    eval_fraction: float = 0.05,
    max_samples: int | None = None,
    seed: int = 42,
    revision: str | None = None,
) -> PreparedPreferences:
    """Load the first `max_samples` rows of `source`, validate and convert every one, and split off
    `eval_fraction` of them (a seeded shuffle; at least one held-out row from 10 rows up, none below)."""
    from datasets import Dataset

    if source == PREFERENCE_SAMPLE:
        if revision is not None:
            raise UserError(
                f"dataset_revision {revision!r} is for a Hub dataset, but dataset 'sample' is the bundled"
                " preference sample, which has no revisions: drop dataset_revision."
            )
        rows = load_rows(str(preference_sample_path()), split)
    else:
        rows = load_rows(source, split, revision)
    if max_samples is not None:
        rows = rows[:max_samples]
    if not rows:
        raise UserError(f"{source}: no preference pairs to train on.")

    converted, row_format, prompt_style = convert_preference_rows(rows)
    where = [row.where for row in rows]

    # The split of cpuft.data.prepare.prepare_dataset, so `cpuft sft` and `cpuft dpo` hold out alike.
    train_order, eval_order = split_order(len(converted), eval_fraction, seed)
    if not train_order:
        raise UserError(
            f"{source}: eval_fraction {eval_fraction} holds out all {len(converted)} pairs, leaving none"
            " to train on: lower eval_fraction."
        )
    return PreparedPreferences(
        train=Dataset.from_list([converted[i] for i in train_order]),
        eval=Dataset.from_list([converted[i] for i in eval_order]) if eval_order else None,
        row_format=row_format,
        prompt_style=prompt_style,
        source=source,
        num_rows=len(converted),
        train_where=[where[i] for i in train_order],
        eval_where=[where[i] for i in eval_order] or None,
    )


def convert_preference_rows(rows: list[Row]) -> tuple[list[dict[str, Any]], str, str]:
    """Every row validated and made explicit, the rows' format ("conversational" / "standard") and
    prompt style ("explicit" / "implicit"); a row whose format or style differs from the first
    row's is an error naming both rows."""
    converted = []
    first_shape: tuple[str, str] | None = None
    for row in rows:
        row_format, prompt_style = _row_shape(row)
        if first_shape is None:
            first_shape = (row_format, prompt_style)
        elif (row_format, prompt_style) != first_shape:
            raise UserError(
                f"{row.where}: this row is {row_format} with an {prompt_style} prompt, while the first row"
                f" ({rows[0].where}) is {first_shape[0]} with an {first_shape[1]} prompt. Use one format"
                " for every row of a dataset."
            )
        converted.append(_convert(row, row_format, prompt_style))
    assert first_shape is not None
    return converted, first_shape[0], first_shape[1]


def _row_shape(row: Row) -> tuple[str, str]:
    """(row format, prompt style) of one row, from its keys and the types of its values."""
    data = row.data
    missing = [key for key in ("chosen", "rejected") if key not in data]
    if missing:
        sft_format = next((name for name, keys in FORMAT_KEYS.items() if all(key in data for key in keys)), None)
        if sft_format is not None:
            raise UserError(
                f"{row.where}: this looks like supervised fine-tuning data ({sft_format} format, keys"
                f" {sorted(data)}); DPO needs preference pairs: 'chosen' and 'rejected' replies (and"
                " optionally a 'prompt'). Train on this data with `cpuft sft`, or give `cpuft dpo`"
                " prompt/chosen/rejected rows."
            )
        raise UserError(
            f"{row.where}: missing field {' and '.join(repr(key) for key in missing)}; the row has keys"
            f" {sorted(data)}. A preference row needs 'chosen' and 'rejected' (and optionally 'prompt')."
        )
    chosen_format = _value_format(row, "chosen")
    rejected_format = _value_format(row, "rejected")
    if rejected_format != chosen_format:
        raise UserError(
            f"{row.where}: field 'rejected' is {rejected_format} but 'chosen' is {chosen_format}: both must"
            " be strings (standard) or both lists of messages (conversational)."
        )
    if "prompt" not in data:
        return chosen_format, IMPLICIT
    prompt_format = _value_format(row, "prompt")
    if prompt_format == chosen_format:
        return chosen_format, EXPLICIT
    if prompt_format == STANDARD and chosen_format == CONVERSATIONAL:
        first = data["chosen"][0] if data["chosen"] else None
        if isinstance(first, dict) and first.get("role") in ("system", "user"):
            # The ultrafeedback_binarized shape: chosen/rejected hold the whole conversation and the
            # string prompt repeats its first user turn. TRL's maybe_extract_prompt reads it so too.
            return CONVERSATIONAL, IMPLICIT
        raise UserError(
            f"{row.where}: field 'prompt' is a string but 'chosen' and 'rejected' are lists of messages:"
            ' make the prompt a list of messages too, e.g. [{"role": "user", "content": "..."}], or make'
            " all three strings."
        )
    raise UserError(
        f"{row.where}: field 'prompt' is a list of messages but 'chosen' and 'rejected' are strings: use"
        " strings for all three (standard) or lists of messages for all three (conversational)."
    )


def _value_format(row: Row, field: str) -> str:
    value = row.data[field]
    if isinstance(value, str):
        return STANDARD
    if isinstance(value, list):
        return CONVERSATIONAL
    raise UserError(
        f"{row.where}: field '{field}' must be a string (standard format) or a list of"
        f" {{\"role\", \"content\"}} messages (conversational), got {_type_name(value)}."
    )


def _convert(row: Row, row_format: str, prompt_style: str) -> dict[str, Any]:
    """One row validated and returned as explicit {"prompt", "chosen", "rejected"}."""
    if row_format == STANDARD:
        texts = {field: _text(row, field, row.data[field]) for field in PREFERENCE_KEYS if field in row.data}
        if prompt_style == IMPLICIT:
            # Checked before extract_prompt: with nothing shared it takes chosen[:-1] as the prompt
            # when chosen ends with a space.
            if not os.path.commonprefix([texts["chosen"], texts["rejected"]]).strip():
                raise UserError(
                    f"{row.where}: fields 'chosen' and 'rejected' share no leading prompt text. Without a"
                    " 'prompt' field both must start with the same prompt; or add a 'prompt' field and"
                    " keep only the replies in 'chosen' and 'rejected'."
                )
            texts = _extract_prompt(texts["chosen"], texts["rejected"])
        _refuse_equal_pair(row, texts["chosen"].strip(), texts["rejected"].strip())
        return {"prompt": texts["prompt"], "chosen": texts["chosen"], "rejected": texts["rejected"]}

    if prompt_style == EXPLICIT:
        prompt = _messages(row, "prompt")
        chosen, rejected = _messages(row, "chosen"), _messages(row, "rejected")
        offset = 0
    else:
        chosen, rejected = _messages(row, "chosen"), _messages(row, "rejected")
        _check_dialogue(row, "chosen", chosen, ends_with="assistant")
        _check_dialogue(row, "rejected", rejected, ends_with="assistant")
        if chosen[0] != rejected[0]:
            raise UserError(
                f"{row.where}: fields 'chosen' and 'rejected' do not start with the same messages, so there"
                " is no prompt to extract. Without a 'prompt' field both must repeat the same conversation"
                " up to the last user turn; or add a 'prompt' field and keep only the replies."
            )
        split = _extract_prompt(chosen, rejected)
        prompt, chosen, rejected = split["prompt"], split["chosen"], split["rejected"]
        offset = len(prompt)  # the completions' first index in the row's own lists, for messages
        if prompt[-1]["role"] != "user":
            raise UserError(
                f"{row.where}: fields 'chosen' and 'rejected' first differ at message {offset}"
                f" ('chosen[{offset}]', a {chosen[0]['role']} turn). Without a 'prompt' field they must share"
                " every message up to the last user turn and differ only in the assistant's reply."
            )
    if prompt_style == EXPLICIT:
        _check_dialogue(row, "prompt", prompt, ends_with="user")
    for field, completion in (("chosen", chosen), ("rejected", rejected)):  # never empty: see above
        for index, message in enumerate(completion, start=offset):
            if message["role"] != "assistant":
                hint = (
                    " If it repeats the prompt, drop the 'prompt' field (implicit prompt) or keep only the"
                    " reply in it." if prompt_style == EXPLICIT else ""
                )
                raise UserError(
                    f"{row.where}: field '{field}[{index}].role' is '{message['role']}'; after the prompt,"
                    f" '{field}' must hold only the assistant's reply.{hint}"
                )
    _refuse_equal_pair(row, _stripped(chosen), _stripped(rejected))
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _extract_prompt(chosen: Any, rejected: Any) -> dict[str, Any]:
    """TRL's own split of an implicit-prompt pair (imported here: explicit rows need no TRL)."""
    from trl.data_utils import extract_prompt

    return extract_prompt({"chosen": chosen, "rejected": rejected})


def _text(row: Row, path: str, value: Any) -> str:
    if not isinstance(value, str):
        raise UserError(f"{row.where}: field '{path}' must be a string, got {_type_name(value)}.")
    if not value.strip():
        raise UserError(f"{row.where}: field '{path}' is empty.")
    return value


def _messages(row: Row, field: str) -> list[dict[str, str]]:
    """`row.data[field]` as a non-empty list of {"role", "content"} messages (other keys dropped)."""
    value = row.data[field]
    if not value:
        raise UserError(f"{row.where}: field '{field}' is an empty list; it must hold at least one message.")
    messages = []
    for index, message in enumerate(value):
        path = f"{field}[{index}]"
        if not isinstance(message, dict):
            raise UserError(
                f"{row.where}: field '{path}' must be a {{\"role\", \"content\"}} message, got {_type_name(message)}."
            )
        role = message.get("role")
        if role not in ROLES:
            raise UserError(f"{row.where}: field '{path}.role' is {role!r}; allowed roles: {', '.join(ROLES)}.")
        messages.append({"role": role, "content": _text(row, f"{path}.content", message.get("content"))})
    return messages


def _check_dialogue(row: Row, field: str, messages: list[dict[str, str]], ends_with: str) -> None:
    """An optional first system message, then user and assistant turns alternating from user,
    the last one `ends_with` (the same rules as SFT conversations in cpuft.data.formats)."""
    for index, message in enumerate(messages):
        if message["role"] == "system" and index != 0:
            raise UserError(f"{row.where}: field '{field}[{index}]': a system message may only come first.")
    offset = 1 if messages and messages[0]["role"] == "system" else 0
    for index, message in enumerate(messages[offset:], start=offset):
        expected = ("user", "assistant")[(index - offset) % 2]
        if message["role"] != expected:
            raise UserError(
                f"{row.where}: field '{field}[{index}].role' is '{message['role']}' but '{expected}' was"
                " expected: turns must alternate user/assistant, starting with user."
            )
    if len(messages) == offset or messages[-1]["role"] != ends_with:
        what = "the prompt must end with a user message for the replies to answer" if ends_with == "user" else (
            "a conversation must end with the assistant's reply")
        raise UserError(f"{row.where}: field '{field}': its last message is '{messages[-1]['role']}', but {what}.")


def _refuse_equal_pair(row: Row, chosen: Any, rejected: Any) -> None:
    if chosen == rejected:
        raise UserError(
            f"{row.where}: fields 'chosen' and 'rejected': chosen equals rejected: the pair teaches nothing"
            " (they are the same once surrounding whitespace is stripped). Fix or drop the row."
        )


def _stripped(messages: list[dict[str, str]]) -> list[tuple[str, str]]:
    return [(message["role"], message["content"].strip()) for message in messages]


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__
