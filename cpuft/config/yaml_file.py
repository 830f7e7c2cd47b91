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
        return yaml.safe_load(text), yaml.compose(text)
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML: {exc}") from None


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
