"""The job config as command-line flags: one flag per key, and the pass-through help pages.

cpuft's own keys are flags from the start and `--help` lists them, grouped. The fields of TRL's
SFTConfig and of the PEFT configs (about 200) become flags only when a command parses flags that
are not cpuft's own, so `cpuft --help` and `cpuft env` do not import TRL (seconds); `--help`
hides them and points to `--help-trl` and `--help-peft METHOD`, which list each field with the
library's default and cpuft's value where it differs.

Every flag keeps the text typed; cpuft.config.job types it by the same rules as a YAML value
(cpuft.config.values), so a flag and a YAML key behave alike. A true/false key takes `--x`,
`--x true|false` or `--no-x`. Flags the user did not type leave no value (argparse.SUPPRESS),
so they do not override the YAML file.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import re
import sys
import typing
from typing import Any, Literal

from cpuft.config import passthrough, peft_config
from cpuft.config.choices import PeftMethod, values
from cpuft.config.job import (
    CONFIG_FIELDS,
    KEY_GROUPS,
    KEY_TYPES,
    SFT_ONLY_KEYS,
    flag_name,
    is_config_key,
    nearest_key,
)
from cpuft.config.library_fields import short_value
from cpuft.config.sections import DPO_LEARNING_RATE
from cpuft.config.values import metavar

PASS_THROUGH_EPILOG = """\
TRL and PEFT: every field of TRL's SFTConfig and of the PEFT config of --peft-method is a key
and a flag too (`--max-grad-norm 0.5`, `--use-dora true`, `adam_beta2: 0.98` in YAML), typed and
checked by the library's own dataclass before anything is written. `--help-trl` and
`--help-peft [METHOD]` list them with the library's default and cpuft's value where it differs;
fields the plan decides (bf16, use_cpu, batch sizes, ...) are set through cpuft's keys.
"""


def add_config_arguments(parser: argparse.ArgumentParser, kind: str = "sft") -> None:
    """One flag per cpuft key (grouped as in `KEY_GROUPS`), the --help-trl/--help-peft pages, and
    the pass-through flags of the job kind's TRL config, added when the parser first sees a flag
    that is not cpuft's own."""
    parser.set_defaults(job_kind=kind)
    group: Any = parser
    for name, f in CONFIG_FIELDS.items():
        if name in KEY_GROUPS:
            group = parser.add_argument_group(KEY_GROUPS[name])
        if kind == "dpo" and name in SFT_ONLY_KEYS:  # parsed, then refused by name (cpuft.config.job)
            _add_flag(group, name, KEY_TYPES[name], argparse.SUPPRESS)
            continue
        default = DPO_LEARNING_RATE if kind == "dpo" and name == "learning_rate" else f.default
        shown_default = "" if default is None else f" (default: {default})"
        _add_flag(group, name, KEY_TYPES[name], f"{f.metadata['help']}{shown_default}")
    pages = parser.add_argument_group("TRL and PEFT fields")
    pages.add_argument(
        "--help-trl", nargs=0, action=_PrintPage, page=functools.partial(format_trl_help, kind),
        help=f"list TRL {_TRL_CLASS_NAMES[kind]}'s fields (each is a key and a flag) and exit",
    )
    pages.add_argument(
        "--help-peft", nargs="?", const="lora", choices=values(PeftMethod), metavar="METHOD",
        action=_PrintPage, page=functools.partial(format_peft_help, kind=kind),
        help="list the fields of METHOD's PEFT config (default lora) and exit",
    )
    _add_library_flags_on_demand(parser, kind)


# The TRL config class of each job kind, by name (for help texts, without importing TRL).
_TRL_CLASS_NAMES = {"sft": "SFTConfig", "dpo": "DPOConfig"}


def config_values(args: argparse.Namespace) -> dict[str, Any]:
    """The config keys the user typed as flags: {key: text}."""
    kind = getattr(args, "job_kind", "sft")
    return {k: v for k, v in vars(args).items() if k != "job_kind" and is_config_key(k, kind)}


def add_library_arguments(parser: argparse.ArgumentParser, kind: str = "sft") -> None:
    """A hidden flag for every field of the job kind's TRL config and of the PEFT configs that is
    not a cpuft key."""
    if getattr(parser, "_cpuft_library_flags", False):
        return
    parser._cpuft_library_flags = True
    fields = dict(passthrough.trl_fields(kind))
    for method in peft_config.PEFT_CONFIG_CLASSES:
        for name, field in peft_config.peft_fields(method).items():
            fields.setdefault(name, field)
    for name, field in fields.items():
        if name not in CONFIG_FIELDS:
            _add_flag(parser, name, field.hint, argparse.SUPPRESS)


# ----------------------------------------------------------------------------- flags


def _add_flag(parser, name: str, hint: Any, help_text: str) -> None:
    flag = flag_name(name)
    if help_text is not argparse.SUPPRESS:
        help_text = help_text.replace("%", "%%")  # argparse %-formats help strings
    members = [m for m in typing.get_args(hint) if m is not type(None)] or [hint]
    try:
        if bool in members:
            parser.add_argument(flag, nargs="?", const="true", default=argparse.SUPPRESS, dest=name,
                                metavar="{true,false}", help=help_text)
            parser.add_argument("--no-" + flag[2:], action="store_const", const="false", dest=name,
                                default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        elif len(members) == 1 and typing.get_origin(members[0]) is Literal:
            parser.add_argument(flag, choices=typing.get_args(members[0]), default=argparse.SUPPRESS, dest=name,
                                help=help_text)
        else:
            parser.add_argument(flag, default=argparse.SUPPRESS, dest=name, metavar=metavar(hint), help=help_text)
    except argparse.ArgumentError:
        pass  # the command has a flag of that name already (e.g. a --no-x of its own)


def _add_library_flags_on_demand(parser: argparse.ArgumentParser, kind: str) -> None:
    """Add the pass-through flags just before parsing, and only if a typed flag needs them."""
    parse_known_args = parser.parse_known_args

    def parse_known_args_with_library_flags(args=None, namespace=None):
        strings = sys.argv[1:] if args is None else list(args)
        known = {option for action in parser._actions for option in action.option_strings}
        if any(s.startswith("--") and s.split("=", 1)[0] not in known for s in strings):
            add_library_arguments(parser, kind)
        parsed, extras = parse_known_args(args, namespace)
        for extra in extras:
            if extra.startswith("--"):  # argparse alone would not say what was meant
                key = extra[2:].split("=", 1)[0].replace("-", "_")
                parser.error(f"unrecognized flag {extra.split('=', 1)[0]}.{_did_you_mean(key)}")
        return parsed, extras

    parser.parse_known_args = parse_known_args_with_library_flags


def _did_you_mean(key: str) -> str:
    close = nearest_key(key)
    return f" Did you mean {flag_name(close)}?" if close else ""


class _PrintPage(argparse.Action):
    def __init__(self, *args, page, **kwargs):
        self.page = page
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, value, option_string=None):
        print(self.page(*([value] if isinstance(value, str) else [])))
        parser.exit(0)


# ----------------------------------------------------------------------------- help pages


def format_trl_help(kind: str = "sft") -> str:
    return _field_page(
        f"cpuft {kind} --help-trl",
        f"TRL {_TRL_CLASS_NAMES[kind]}'s fields, as cpuft config keys (YAML `name: value`, flag --name VALUE).",
        passthrough.trl_fields(kind), passthrough.trl_deviations(kind), "TRL",
    )


def format_peft_help(method: str = "lora", kind: str = "sft") -> str:
    cls = peft_config.PEFT_CONFIG_CLASSES[method]
    return _field_page(
        f"cpuft {kind} --help-peft {method}", f"PEFT's {cls} (peft_method {method}): its fields, as cpuft config keys.",
        peft_config.peft_fields(method), peft_config.PEFT_DEVIATIONS, "PEFT",
    )


def _field_page(prog: str, description: str, fields: dict, deviations: dict, library: str) -> str:
    """The fields of one library dataclass in four groups: cpuft's keys of the same name, cpuft's
    values for other fields, fields set through another cpuft key, and the rest as they are."""
    page = argparse.ArgumentParser(prog=prog, usage=argparse.SUPPRESS, description=description, add_help=False)
    groups = {
        "key": page.add_argument_group("cpuft keys of the same name (`cpuft sft --help`), with cpuft's defaults"),
        "value": page.add_argument_group("cpuft's values (set the field to override)"),
        "refused": page.add_argument_group("set through the cpuft key named (setting the field itself is refused)"),
        "passed": page.add_argument_group(f"passed through as given, [{library}'s default]"),
    }
    for name, field in fields.items():
        deviation = deviations.get(name)
        default = f"{library}: {_default(field)}"
        if deviation is not None and deviation.set_by not in (None, name):
            use = "fixed" if deviation.set_by == "(fixed)" else f"use {deviation.set_by}"
            kind, text = "refused", f"{use}; cpuft: {deviation.display()}, {default}; {_sentence(deviation.why)}"
        elif name in CONFIG_FIELDS or (deviation is not None and deviation.set_by == name):
            shown = deviation.display() if deviation else short_value(CONFIG_FIELDS[name].default)
            why = f"; {_sentence(deviation.why)}" if deviation else "."
            kind, text = "key", f"cpuft: {shown}, {default}{why}"
        elif deviation is not None:
            kind, text = "value", f"cpuft: {deviation.display()}, {default}; {_sentence(deviation.why)}"
        else:
            kind, text = "passed", f"{_first_sentence(field.help)} [{_default(field)}]"
        hint = KEY_TYPES[name] if name in CONFIG_FIELDS else field.hint
        groups[kind].add_argument(flag_name(name), metavar=metavar(hint), help=text.replace("%", "%%"))
    return page.format_help()


def _sentence(text: str) -> str:
    return text if text.endswith(".") else text + "."


def _first_sentence(text: str) -> str:
    """The libraries' help runs to paragraphs; the page shows its first sentence."""
    return re.split(r"(?<=[a-z0-9)\]`'])\.\s+(?=[A-Z])", text, maxsplit=1)[0].rstrip(".") + "."


def _default(field) -> str:
    return "required" if field.default is dataclasses.MISSING else short_value(field.default)
