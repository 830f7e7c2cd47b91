"""Reading YAML files with the line of every key, so a message can point at the line to fix.

Knows nothing of which keys are valid (cpuft.config.job does); used for `--config` files, a run's
saved config.yaml and the batch queue file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from cpuft.errors import UserError


def load_yaml_with_nodes(path: Path) -> tuple[Any, yaml.Node | None]:
    """(data, node tree) of a YAML file; the nodes give each key's line for error messages."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8.") from None
    try:
        node = yaml.compose(text)
        size = _expanded_size(node, {})
        if size > MAX_EXPANDED_NODES:
            raise UserError(
                f"{path}: its aliases (*name) expand to more than {MAX_EXPANDED_NODES:,} values"
                f" ({size:,}); a config file that large is a mistake or an alias bomb. Write the values out."
            )
        return yaml.safe_load(text), node
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML: {exc}") from None
    except RecursionError:
        raise UserError(f"{path}: nested too deeply to be a config file.") from None


# A config or queue file holds tens to thousands of values; aliases that expand past this are an
# "alias bomb" (a few lines that expand exponentially and exhaust memory when read or printed).
MAX_EXPANDED_NODES = 100_000


def _expanded_size(node, sizes: dict[int, int]) -> int:
    """How many values `node` holds with every alias expanded (a shared node counts each time it
    is referenced), computed once per distinct node so the bomb is measured, not expanded."""
    if node is None:
        return 0
    if id(node) in sizes:
        return sizes[id(node)]
    if isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(key, sizes) + _expanded_size(value, sizes) for key, value in node.value)
    elif isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(item, sizes) for item in node.value)
    else:
        size = 1
    sizes[id(node)] = size
    return size


def key_lines(node) -> dict[str, int]:
    """Line (1-based) of each key of a YAML mapping node; {} for anything else."""
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {key_node.value: key_node.start_mark.line + 1 for key_node, _ in node.value}


def read_mapping(path: str | Path) -> tuple[dict[str, Any], dict[str, str]]:
    """A YAML file whose top level is a mapping: (values, {str(key): "FILE:LINE"}); {} when empty."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist.")
    raw, node = load_yaml_with_nodes(path)
    if raw is None:
        return {}, {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: the top level must be a mapping of config keys, got {type(raw).__name__}.")
    lines = key_lines(node)
    return raw, {str(key): f"{path}:{lines.get(str(key), '?')}" for key in raw}
