"""Read dataset rows from where they live: a local .jsonl / .json / .parquet file, a Hugging Face
Hub dataset, or the bundled sample. Each row keeps where it came from ("file.jsonl:12") so that
every later error can name the file and line.

Owns: telling the source kinds apart, decoding files (strict UTF-8, a leading BOM allowed),
JSON parsing, and the messages for unreadable input. Detecting a row's format and converting it
is `cpuft.data.formats`; splitting is `cpuft.data.prepare`.

Limits: a file is read into memory whole (so it must be a regular file: a named pipe, socket or
device is refused unopened, since the dataset is read more than once); .json must hold a list of
row objects (or {"data": [...]}); a row may nest at most MAX_NESTING_DEPTH levels of lists and
objects, and every string in it (keys too) must be text (no lone UTF-16 surrogate, which JSON's
"\\ud800" escape can write but UTF-8 cannot hold); Hub datasets need network (or the datasets
cache) and, when gated, HF_TOKEN; only Hub datasets have revisions (`dataset_revision`).
Every problem is a UserError naming the file and line (or row), and the field where it has one.
"""

from __future__ import annotations

import codecs
import json
import os
import re
import stat
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from cpuft.errors import UserError, first_line

SAMPLE_NAME = "sample"
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")
# Binary formats a dataset file is most often mistaken for, by their first bytes.
_MAGIC_BYTES = {b"\x1f\x8b": "gzip-compressed", b"PK\x03\x04": "a zip archive", b"PAR1": "Parquet",
                b"\x28\xb5\x2f\xfd": "zstd-compressed"}
# Levels of lists and objects a row may nest. Real rows nest a handful (messages -> message ->
# tool call -> arguments); the bound keeps every later walk over a row (format detection, pyarrow,
# repr in an error message) far from Python's recursion limit.
MAX_NESTING_DEPTH = 100
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
# What a path is when it is neither a regular file nor a directory, by its stat mode.
_SPECIAL_FILE_KINDS = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


@dataclass(frozen=True)
class Row:
    data: dict[str, Any]
    where: str  # "file.jsonl:12" or "GAIR/lima[train] row 12": for error messages


def sample_path() -> Path:
    """The bundled LIMA-shaped sample (`--dataset sample`), package data of cpuft.data."""
    return Path(str(resources.files("cpuft") / "data" / "lima_sample.jsonl"))


def load_rows(source: str, split: str = "train", revision: str | None = None) -> list[Row]:
    """Every row of `source` (the sample, a local file, or a Hub id at `revision`), unvalidated.

    A revision is refused for the sample and local files: they have none, and ignoring it would
    let a run claim a dataset version it never read."""
    path = Path(os.path.expanduser(source))
    if revision is not None and (source == SAMPLE_NAME or path.exists() or _looks_local(source)):
        raise UserError(
            f"dataset_revision {revision!r} is for a Hub dataset, but dataset '{source}' is"
            f" {'the bundled sample' if source == SAMPLE_NAME else 'a local path'}, which has no"
            " revisions: drop dataset_revision."
        )
    if source == SAMPLE_NAME:
        return _read_jsonl(sample_path())
    if path.is_dir():
        raise UserError(
            f"dataset {source} is a directory; point --dataset at a .jsonl, .json or .parquet file in it."
        )
    _refuse_special_file(path, source)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            return _read_jsonl(path)
        if suffix == ".json":
            return _read_json(path)
        if suffix == ".parquet":
            return _read_parquet(path)
        raise UserError(f"dataset {source}: unsupported file type {suffix!r}; use .jsonl, .json or .parquet.")
    if _looks_local(source):
        raise UserError(f"dataset file {source} does not exist.")
    return _read_hub(source, split, revision)


def _refuse_special_file(path: Path, source: str) -> None:
    """UserError when `path` exists but is not a regular file (a named pipe, socket or device).

    Decided from stat alone: opening a named pipe blocks until a writer comes, and what it gives
    can be read only once, while cpuft reads the dataset more than once (planning, the run, a
    resume)."""
    try:
        mode = path.stat().st_mode
    except OSError:  # missing (or unreadable): the callers' own messages say so
        return
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return
    kind = next((name for is_kind, name in _SPECIAL_FILE_KINDS if is_kind(mode)), "not a regular file")
    raise UserError(
        f"dataset {source} is {kind}, not a regular file: cpuft reads the dataset more than once"
        " (to plan, to train, to resume), which a pipe or device cannot give. Write the data to a"
        " .jsonl, .json or .parquet file first and pass that file."
    )


def check_row_values(data: Any, where: str) -> None:
    """UserError naming `where` and the field when the row nests deeper than MAX_NESTING_DEPTH
    levels or holds a string (value or key) with a lone UTF-16 surrogate.

    Walks the row with an explicit stack, never recursion, so a hostile row cannot exhaust
    Python's stack here."""
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    while stack:
        value, field, depth = stack.pop()
        if isinstance(value, str):
            _check_text(value, where, field)
            continue
        if not isinstance(value, (dict, list)):
            continue
        if depth >= MAX_NESTING_DEPTH:
            shown = field if len(field) <= 60 else field[:60] + "..."
            raise UserError(
                f"{where}: field '{shown}' nests lists and objects deeper than {MAX_NESTING_DEPTH}"
                " levels; a dataset row holds text, not structures that deep. Fix that row."
            )
        if isinstance(value, dict):
            for key, item in value.items():
                name = f"{field}.{key}" if field else str(key)
                if isinstance(key, str):
                    _check_text(key, where, f"{name} (the key)")
                stack.append((item, name, depth + 1))
        else:
            stack.extend((item, f"{field}[{index}]", depth + 1) for index, item in enumerate(value))


def _check_text(text: str, where: str, field: str) -> None:
    found = _LONE_SURROGATE.search(text)
    if found is None:
        return
    code = f"\\u{ord(found.group()):04x}"
    raise UserError(
        f"{where}: field '{field}' holds a lone UTF-16 surrogate ({code} at character"
        f" {found.start() + 1}), which is not text (UTF-8 cannot hold it): the JSON was written"
        " from broken UTF-16 (a cut emoji, say). Remove the escape or write the whole character."
    )


def _looks_local(source: str) -> bool:
    """A path the user meant as a local file (even when missing), not a Hub id."""
    return Path(source).suffix.lower() in LOCAL_SUFFIXES or source.startswith((".", "/", "~"))


def read_text(path: Path) -> str:
    """The text of a JSON / JSON Lines file: strict UTF-8 (a leading BOM is dropped).

    Raises UserError naming the line (and byte) of the first byte that is not UTF-8 text, and
    saying so when the file is binary (a NUL byte, or the signature of a compressed or Parquet
    file), so a renamed binary file is not reported as one bad character.
    """
    data = path.read_bytes()
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise UserError(f"{path}: the file is UTF-16 text; JSON and JSON Lines files must be UTF-8. Save it as UTF-8.")
    kind = next((name for magic, name in _MAGIC_BYTES.items() if data.startswith(magic)), None)
    if kind:
        hint = "pass it as a .parquet file" if kind == "Parquet" else "unpack it first"
        raise UserError(f"{path}:1: this is a binary file ({kind}), not {_text_kind(path)}; {hint}.")
    nul = data.find(b"\x00")
    if nul != -1:
        line, column = _line_and_column(data, nul)
        raise UserError(
            f"{path}:{line}: a NUL byte at byte {column} of the line: this is a binary file, not"
            f" {_text_kind(path)}. Point --dataset at the UTF-8 text file."
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line, column = _line_and_column(data, exc.start)
        raise UserError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{data[exc.start]:02x} at byte {column} of the line)."
            " Save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`), or fix that line."
        ) from None


def _line_and_column(data: bytes, offset: int) -> tuple[int, int]:
    """1-based line number and byte position within the line of `offset` in `data`."""
    line_start = data.rfind(b"\n", 0, offset) + 1
    return data.count(b"\n", 0, offset) + 1, offset - line_start + 1


def _text_kind(path: Path) -> str:
    return "JSON Lines text" if path.suffix.lower() == ".jsonl" else "JSON text"


def _read_jsonl(path: Path) -> list[Row]:
    rows = []
    # Split on "\n" only: str.splitlines() would also break inside strings at U+2028 and other
    # separators JSON allows unescaped, and shift every line number after them.
    for number, line in enumerate(read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno}).") from None
        except RecursionError:  # the parser recurses once per level of nesting
            raise _too_deep(where) from None
        if not isinstance(data, dict):
            raise UserError(f"{where}: each line must be a JSON object, got {type(data).__name__}.")
        check_row_values(data, where)
        rows.append(Row(data, where))
    return rows


def _too_deep(where: str) -> UserError:
    return UserError(
        f"{where}: the JSON nests lists and objects too deep to parse (a row may nest at most"
        f" {MAX_NESTING_DEPTH} levels); a dataset row holds text, not structures that deep. Fix that row."
    )


def _first_too_deep_line(text: str) -> int:
    """The line of `text` (JSON) where nesting first passes a row's MAX_NESTING_DEPTH (plus the
    file's list around the rows); 1 when no such place is found."""
    depth = 0
    # Strings are skipped whole, so brackets inside them do not count.
    for token in re.finditer(r'"(?:[^"\\]|\\.)*"|[\[\]{}]', text):
        bracket = token.group()
        if bracket in "[{":
            depth += 1
            if depth > MAX_NESTING_DEPTH + 2:
                return text.count("\n", 0, token.start()) + 1
        elif bracket in "]}":
            depth -= 1
    return 1


def _read_json(path: Path) -> list[Row]:
    text = read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}).") from None
    except RecursionError:  # the parser recurses once per level of nesting
        raise _too_deep(f"{path}:{_first_too_deep_line(text)}") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of rows (or JSON Lines in a .jsonl file).")
    rows = []
    for index, item in enumerate(data):
        where = f"{path} row {index}"
        if not isinstance(item, dict):
            raise UserError(f"{where}: each row must be an object, got {type(item).__name__}.")
        check_row_values(item, where)
        rows.append(Row(item, where))
    return rows


def _read_parquet(path: Path) -> list[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise UserError(f"{path}: cannot read as Parquet ({exc}).") from None
    rows = [Row(item, f"{path} row {index}") for index, item in enumerate(table.to_pylist())]
    for row in rows:
        check_row_values(row.data, row.where)
    return rows


def _read_hub(dataset_id: str, split: str, revision: str | None = None) -> list[Row]:
    from datasets import load_dataset

    at = f", revision '{revision}'" if revision is not None else ""
    try:
        dataset = load_dataset(dataset_id, split=split, revision=revision, token=os.environ.get("HF_TOKEN"))
    except Exception as exc:  # datasets raises ConnectionError, DatasetNotFoundError, gated errors...
        raise UserError(
            f"could not load dataset '{dataset_id}' (split '{split}'{at}) from the Hugging Face Hub:"
            f" {first_line(exc)}. If you are offline or the dataset is gated (GAIR/lima is: accept its"
            " terms on the Hub, then set HF_TOKEN), download it on a connected machine and pass"
            " the local file instead, e.g. --dataset ./lima/train.jsonl (JSONL/JSON/Parquet rows"
            " with a 'conversations' list), or use --dataset sample for the bundled sample."
        ) from None
    rows = [Row(dict(item), f"{dataset_id}[{split}] row {index}") for index, item in enumerate(dataset)]
    for row in rows:
        check_row_values(row.data, row.where)
    return rows
