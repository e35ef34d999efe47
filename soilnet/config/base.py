"""Typed configs from YAML files plus ``key=value`` dotted overrides.

Every config is a tree of pydantic models that forbid unknown keys, so a typo or a wrong type fails before any
work starts, and the message names the key and the file. A YAML file may pull other files in first with a
top-level ``include: [relative/path.yaml, ...]``; its own keys win over the included ones.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from soilnet.atomic import write_text


class ConfigError(ValueError):
    """A config file or override that cannot be loaded or does not validate."""


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, and assignments are validated too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(), populate_by_name=True)


C = TypeVar("C", bound=Section)


def deep_merge(base: dict, update: dict) -> dict:
    """A copy of ``base`` with ``update`` merged in, recursing into dicts both hold; neither input changes."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """The mapping in ``path`` with its ``include`` files merged underneath it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: include cycle through {[str(p) for p in _seen]}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(tree).__name__}")
    includes = tree.pop("include", []) or []
    if isinstance(includes, str):
        includes = [includes]
    merged: dict = {}
    for inc in includes:
        merged = deep_merge(merged, read_yaml(path.parent / inc, (*_seen, path.resolve())))
    return deep_merge(merged, tree)


def apply_override(tree: dict, override: str) -> dict:
    """Set ``a.b.c=value`` in ``tree``; the value is parsed as YAML (``3`` is an int, ``[a, b]`` a list)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not of the form key=value")
    key, raw = override.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {override!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {override!r}: value is not valid YAML: {err}") from err
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value
    return tree


def _describe(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<top level>"
        if e["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key '{key}'")
        else:
            got = e.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"{source}: key '{key}': {e['msg']}{shown}")
    return "\n".join(lines)


def load_config(cls: type[C], path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> C:
    """Load ``path`` (or the defaults when None) into ``cls``, apply ``overrides``, and validate.

    Raises :class:`ConfigError` naming the file and the offending key.
    """
    tree = read_yaml(path) if path is not None else {}
    for ov in overrides:
        apply_override(tree, ov)
    source = str(path) if path is not None else "<defaults>"
    if overrides:
        source += f" (with overrides {' '.join(overrides)})"
    try:
        return cls.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_describe(err, source)) from None


def to_plain(cfg: Section) -> dict[str, Any]:
    """The config as plain YAML-able data."""
    return cfg.model_dump(mode="json", by_alias=True)


def resolved_yaml(cfg: Section) -> str:
    """The config as the YAML text of a run's saved ``config.yaml`` (and of ``--print-config``)."""
    return yaml.safe_dump(to_plain(cfg), sort_keys=False)


def save_resolved(cfg: Section, directory: str | Path, name: str = "config.yaml") -> Path:
    """Write the resolved config beside a job's outputs (atomically) and return its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / name
    write_text(out, resolved_yaml(cfg))
    return out
