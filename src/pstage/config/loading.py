"""Reading a config: YAML files, dotted ``KEY=VALUE`` overrides, their merge, and one-line errors.

An unknown key names the closest valid one; a wrong value names the key, what was given and what
is expected (a pstage.core.errors.ConfigError: the CLI prints it as one line, exit 2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from pstage.config.sections import Config, closest_key, section_type
from pstage.core.errors import ConfigError


def _check_keys(values: dict[str, Any], model: type[BaseModel] = Config, prefix: str = "") -> None:
    """Refuse an unknown key, or a scalar where a section belongs, naming the dotted key."""
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        field = model.model_fields.get(str(key))
        if field is None:
            raise ConfigError(f"unknown config key '{dotted}'{closest_key(dotted)}")
        sub = section_type(field.annotation)
        if sub is not None:
            if not isinstance(value, dict):
                raise ConfigError(
                    f"config key '{dotted}' is a section: give it a mapping of keys (e.g. {dotted}.{next(iter(sub.model_fields))}=...), not {value!r}"
                )
            _check_keys(value, sub, f"{dotted}.")


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Turn ``["train.epochs=3", "data.image_size=[64,48]"]`` into a nested dict (values parsed as YAML)."""
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not KEY=VALUE (e.g. train.epochs=3)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with an earlier override of '{part}'")
        node[parts[-1]] = value
    return nested


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge ``update`` into a copy of ``base`` (update wins)."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from ``path``; a missing file or a syntax error is a one-line ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {path}{where}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(values, dict):
        raise ConfigError(
            f"config file {path}: expected a mapping of sections (data:, model:, ...), got {type(values).__name__}"
        )
    return values


def _describe(error: dict[str, Any]) -> str:
    parts = [str(p) for p in error["loc"]]
    if parts[:2] == ["tune", "space"] and len(parts) > 2:  # space keys are dotted themselves
        parts = [f"tune.space[{parts[2]}]", *parts[3:]]
    loc = ".".join(parts)
    msg = error["msg"].removeprefix("Value error, ")
    if not loc:  # a cross-field check: its message names the keys itself
        return msg
    given = error.get("input")
    shown = "" if isinstance(given, dict) else f" (got {given!r})"
    return f"config key '{loc}': {msg}{shown}"


def load_config(
    config: str | Path | dict[str, Any] | Config | None = None,
    overrides: list[str] | tuple[str, ...] | dict[str, Any] = (),
) -> Config:
    """Build a validated Config from a YAML file, a dict or a Config, plus overrides.

    ``overrides`` is a list of ``KEY=VALUE`` strings (as on the command line) or a nested dict.
    """
    if isinstance(config, Config):
        values = config.to_dict()
    elif isinstance(config, dict):
        values = config
    elif config is None:
        values = {}
    else:
        values = read_yaml(config)
    extra = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
    values = merge(values, extra)
    _check_keys(values)
    try:
        return Config.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(_describe(exc.errors()[0])) from None


def dump_config(config: Config, path: str | Path) -> None:
    """Write the fully resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


def diff_configs(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[tuple[str, Any, Any]]:
    """Dotted keys whose values differ between two config dicts, as (key, old, new)."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(diff_configs(a, b, f"{prefix}{key}."))
        elif a != b:
            out.append((f"{prefix}{key}", a, b))
    return out
