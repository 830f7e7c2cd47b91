"""One value of a config key, checked and typed against the key's type annotation.

Used for cpuft's own keys and for the TRL/PEFT fields passed through (their dataclasses'
annotations), from a YAML file or a flag alike: a flag's text and a YAML scalar follow the same
rules, so `--use-dora true` and `use_dora: true` mean the same.

Rules (close to transformers' HfArgumentParser, which only handles flags):
- `X | None`: null, or the text none/null, is None.
- bool: true/false, yes/no, on/off, 1/0.
- int, float: numbers, or their text; 2.5 is not an int, and a bool is not a number.
- `Literal[...]`: one of its values.
- `list[X]`: a list, or a comma-separated text (`--modules-to-save embed_tokens,lm_head`), or a
  YAML list in a flag (`--layers-to-transform "[0, 1]"`).
- dict, and a dataclass type (e.g. PEFT's `LoftQConfig`): a mapping (a flag may give it as
  YAML/JSON text). The dataclass itself is built by the library, from the mapping.
- A union takes the value as it is when one of its types already fits (so a text stays a text in
  `list[str] | str`), and otherwise converts to the first type that accepts it.
- An enum type (transformers' `SchedulerType`, ...) accepts any text: the library's own
  dataclass checks it when cpuft builds it, before anything is written.

Limits: other types (a class that is neither a dataclass nor an enum) cannot be set from a
config; the message says so.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from typing import Any, Literal

import yaml

from cpuft.errors import UserError

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")
_NONE = ("none", "null")


class _Mismatch(Exception):
    """The value does not fit the type; the caller words the message."""


def typed_value(
    name: str, hint: Any, value: Any, where: str, default: Any = dataclasses.MISSING, keep_none_text: bool = False
) -> Any:
    """`value` typed for a key `name` annotated `hint`; UserError naming `where` when it does not fit.

    A field whose default is None accepts None even when its annotation omits it (PEFT annotates
    `num_virtual_tokens: int = None`). `keep_none_text`: the text "none" stays a text where the
    type admits text (transformers reads `report_to: none` as a word, not as null).
    """
    members, optional = _members(hint)
    optional = optional or default is None
    none_text = isinstance(value, str) and value.strip().lower() in _NONE and not (keep_none_text and str in members)
    if value is None or (none_text and optional):
        if optional:
            return None
        raise UserError(f"{where}: '{name}' may not be empty.")
    if len(members) == 1 and typing.get_origin(members[0]) is Literal:
        allowed = typing.get_args(members[0])
        if not _in_literal(value, allowed):
            raise UserError(f"{where}: '{name}' is {value!r}; allowed values: {', '.join(map(str, allowed))}.")
        return value
    for member in members:  # a value that already fits one type is kept as it is
        if _fits_as_is(member, value):
            return _plain(value)
    for member in members:
        try:
            return _convert(member, value)
        except _Mismatch:
            continue
    raise UserError(f"{where}: '{name}' must be {describe(hint)}, got {value!r}.")


def describe(hint: Any) -> str:
    """What a value of type `hint` looks like, in words (for messages and --help)."""
    members, optional = _members(hint)
    words = [_describe_one(m) for m in members]
    if optional:
        words.append("null")
    return " or ".join(dict.fromkeys(words))


def metavar(hint: Any) -> str:
    """A short placeholder for a flag's value in --help."""
    members, _ = _members(hint)
    origins = [_origin(m) for m in members]
    if members == [bool]:
        return "{true,false}"
    if bool in members:
        return "VALUE"
    if len(members) == 1 and origins[0] is Literal:
        return "{" + ",".join(map(str, typing.get_args(members[0]))) + "}"
    if str in members or any(isinstance(o, type) and issubclass(o, enum.Enum) for o in origins):
        return "TEXT"
    if int in members:
        return "N"
    if float in members:
        return "X"
    if list in origins or tuple in origins:
        return "A,B,..."
    return "MAPPING"


# ----------------------------------------------------------------------------- internals


def _members(hint: Any) -> tuple[list[Any], bool]:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = typing.get_args(hint)
        return [a for a in args if a is not type(None)], type(None) in args
    if hint is type(None):
        return [], True
    return [hint], False


def _origin(hint: Any) -> Any:
    return typing.get_origin(hint) or hint


def _fits_as_is(hint: Any, value: Any) -> bool:
    origin = _origin(hint)
    if hint is Any:
        return True
    if origin is Literal:
        return _in_literal(value, typing.get_args(hint))
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple):
        item = (typing.get_args(hint) or (Any,))[0]
        return isinstance(value, (list, tuple)) and all(_fits_as_is(item, v) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if isinstance(origin, type) and issubclass(origin, enum.Enum):
        return isinstance(value, origin)
    if dataclasses.is_dataclass(origin):
        return isinstance(value, origin)
    return False


def _in_literal(value: Any, allowed: tuple) -> bool:
    """PEFT writes a family of values as a placeholder ('pissa_niter_[number of iters]'): any
    text with that prefix is one of them."""
    if value in allowed:
        return True
    prefixes = [a.split("[", 1)[0] for a in allowed if isinstance(a, str) and a.endswith("]") and "[" in a]
    return isinstance(value, str) and any(value.startswith(p) and len(value) > len(p) for p in prefixes)


def _convert(hint: Any, value: Any) -> Any:
    origin = _origin(hint)
    if hint is Any:
        return value
    if origin is Literal:
        raise _Mismatch  # only exact members: _fits_as_is
    if hint is bool:
        if isinstance(value, str) and value.strip().lower() in _TRUE:
            return True
        if isinstance(value, str) and value.strip().lower() in _FALSE:
            return False
        raise _Mismatch
    if hint is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if hint is float:
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if hint is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _Mismatch
    if origin in (list, tuple):
        if isinstance(value, str):
            parsed = _parse_text(value)
            value = parsed if isinstance(parsed, list) else [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        args = typing.get_args(hint)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise _Mismatch
            return [_item(a, v) for a, v in zip(args, value)]
        item = args[0] if args else Any
        return [_item(item, v) for v in value]
    if origin is dict or dataclasses.is_dataclass(origin):
        parsed = _parse_text(value) if isinstance(value, str) else value
        if not isinstance(parsed, dict):
            raise _Mismatch
        return parsed
    if isinstance(origin, type) and issubclass(origin, enum.Enum):
        if isinstance(value, str):
            return value  # the library converts and checks it
        raise _Mismatch
    raise _Mismatch


def _item(hint: Any, value: Any) -> Any:
    if _fits_as_is(hint, value):
        return _plain(value)
    return _convert(hint, value)


def _parse_text(text: str) -> Any:
    """A flag's text as YAML (lists and mappings); the text itself when it is not YAML."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _plain(value: Any) -> Any:
    """Tuples become lists, so the value writes to config.yaml as plain YAML."""
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


_PLURALS = {str: "strings", int: "integers", float: "numbers", bool: "true/false values"}


def _describe_one(hint: Any) -> str:
    origin = _origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(hint)))
    if origin in (list, tuple):
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        if origin is tuple and len(args) > 1:
            return f"a list of {len(args)} values"
        return f"a list of {_PLURALS.get(args[0], 'values') if args else 'values'}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(origin):
        return f"a mapping of {origin.__name__} fields"
    if isinstance(origin, type) and issubclass(origin, enum.Enum):
        return f"a {origin.__name__} name"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string", Any: "any value"}.get(
        hint, getattr(hint, "__name__", str(hint))
    )
