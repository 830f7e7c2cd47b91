"""A library's config dataclass (TRL's SFTConfig, a PEFT config) seen as cpuft keys: what
cpuft.config.passthrough (TRL) and cpuft.config.peft_config (PEFT) share.

- `fields_of`: a dataclass's init fields with their resolved annotations, defaults and help
  (`LibraryField`); `LibraryField.typed` types a YAML value or flag text by its annotation
  (cpuft.config.values).
- `Deviation`: cpuft's value for a library field and why (`AT_RUN_TIME` when the run decides it);
  `refuse_if_set_by_cpuft` refuses a field that is set through a cpuft key instead.
- `build_library_config`: builds the dataclass; the library's exception becomes a UserError naming
  the user's key and where it was set (FILE:LINE or --flag).

Limits: imports no library itself; the callers pass the classes.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import re
import typing
import warnings
from dataclasses import dataclass
from typing import Any

from cpuft.config.values import typed_value
from cpuft.errors import UserError, first_line


class _RunTime:
    """A value only known at run time (the plan's choice, the run's length)."""

    def __repr__(self) -> str:
        return "AT_RUN_TIME"


AT_RUN_TIME = _RunTime()


@dataclass(frozen=True)
class Deviation:
    """cpuft's value for a library field, and why.

    `set_by` names the cpuft key (or flag) through which the field is set; setting the field
    itself is then refused. None: the field is set under its own name (a cpuft key of the same
    name, or a pass-through key). `shown` replaces `value` in --help when the value is computed.
    """

    value: Any
    why: str
    set_by: str | None = None
    shown: str | None = None

    def display(self) -> str:
        return self.shown if self.shown is not None else short_value(self.value)


def refuse_if_set_by_cpuft(name: str, deviation: Deviation | None, owner: str, where: str) -> None:
    """UserError when `name` (a field of `owner`, set at `where`) is one cpuft sets through
    another key or fixes (`deviation.set_by`); nothing when the field may be set."""
    if deviation is None or deviation.set_by in (None, name):
        return
    if deviation.set_by == "(fixed)":
        raise UserError(f"{where}: '{name}' ({owner}) is fixed by cpuft: {deviation.why}.")
    use = deviation.set_by if deviation.set_by.startswith("--") else f"'{deviation.set_by}'"
    raise UserError(f"{where}: '{name}' ({owner}) is set by cpuft ({deviation.why}); use {use} instead.")


# ----------------------------------------------------------------------------- the fields


@dataclass(frozen=True)
class LibraryField:
    name: str
    hint: Any
    default: Any  # dataclasses.MISSING when the library has none
    help: str
    owner: str  # the dataclass's name

    def typed(self, value: Any, where: str) -> Any:
        """`value` (YAML value or flag text) typed by the field's annotation; UserError naming `where`."""
        return typed_value(self.name, self.hint, value, where, default=self.default, keep_none_text=True)


@functools.cache
def fields_of(cls) -> dict[str, LibraryField]:
    """The init fields of a library dataclass, with their resolved annotations and help."""
    hints = typing.get_type_hints(cls)
    found = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        text = re.sub(r"<[^>]+>", "", f.metadata.get("help", "")).replace("%%", "%")
        found[f.name] = LibraryField(f.name, hints[f.name], default, " ".join(text.split()), cls.__name__)
    return found


def library_value(hint: Any, value: Any) -> Any:
    """A typed config value as the library takes it: a mapping for a dataclass-typed field is
    built into that dataclass (PEFT does not do it for every such field)."""
    for member in typing.get_args(hint) or (hint,):
        origin = typing.get_origin(member) or member
        if isinstance(value, dict) and dataclasses.is_dataclass(origin) and isinstance(origin, type):
            try:
                return origin(**value)
            except TypeError:
                return value  # the library's own check names the problem
    return value


def short_value(value: Any) -> str:
    """A default or cpuft value as --help shows it (at most 40 characters)."""
    if value is dataclasses.MISSING:
        return "(required)"
    if isinstance(value, enum.Enum):
        value = value.value
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


# ----------------------------------------------------------------------------- building


def build_library_config(cls, kwargs: dict[str, Any], source: dict[str, str], origins: dict[str, str]):
    """`cls(**kwargs)`; the library's exception becomes a UserError naming the key that caused it
    and where it was set (file:line or --flag).

    `source[field]`: the config key a field's value came from; `origins[key]`: where the user
    set that key (keys the user did not set are not blamed)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cls(**kwargs)
    except Exception as exc:
        raise UserError(_blame(cls, kwargs, source, origins, exc)) from None


def _blame(cls, kwargs, source, origins, exc) -> str:
    """Name the user-set value the library refuses: the first whose removal (back to the
    library's default) lets the config build."""
    library = _library_name(cls)
    user_fields = [f for f, key in source.items() if key in origins and f in kwargs]
    for name in user_fields:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cls(**{k: v for k, v in kwargs.items() if k != name})
        except Exception:
            continue
        key = source[name]
        shown = f"'{key}'" if key == name else f"'{key}' (its {library} field '{name}')"
        return f"{origins[key]}: {shown} = {kwargs[name]!r} is refused by {library}: {first_line(exc)}"
    keys = sorted({source[f] for f in user_fields})
    where = "; ".join(f"'{k}' at {origins[k]}" for k in keys) or "cpuft's defaults"
    return f"{library} refuses the combination of {where}: {first_line(exc)}"


def _library_name(cls) -> str:
    """The library class a user knows (SFTConfig, not cpuft's CpuftSFTConfig)."""
    return next(c.__name__ for c in cls.__mro__ if not c.__module__.startswith("cpuft."))
