"""The config as text: annotated YAML (``pstage config``, configs/default.yaml) and the docs' Markdown reference.

Both are generated from the schema's descriptions, so the help a user reads in the terminal, in the
shipped default.yaml and on the docs site is one text.
"""

from __future__ import annotations

import re
import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel

from pstage.config.sections import Config

RESULTS = re.compile(r"benchmarks/RESULTS\.md#([a-z0-9-]+)")


def annotated_yaml(config: Config | None = None) -> str:
    """The config as YAML with each key's description as a comment (``pstage config``, default.yaml)."""
    config = config or Config()
    lines = [
        "# pstage configuration: every key, its value and what it buys.",
        "# Override any key on the command line: pstage train train.epochs=3 data.image_size=[128,96]",
        "",
    ]

    def emit(model: BaseModel, indent: str) -> None:
        for name, field in type(model).model_fields.items():
            value = getattr(model, name)
            if isinstance(value, BaseModel):
                lines.append(f"{indent}{name}:")
                emit(value, indent + "  ")
                continue
            if field.description:
                lines.append(f"{indent}# {field.description}")
            lines.append(f"{indent}{name}: {_flow(_plain(value))}")
        if indent == "":
            lines.append("")

    emit(config, "")
    return "\n".join(lines).rstrip() + "\n"


def reference_markdown(results: str = "results.md") -> str:
    """The docs' configuration reference: one table per section (key, default, values, what it does),
    then the annotated YAML; ``benchmarks/RESULTS.md#anchor`` mentions become links to ``results``."""
    out = [
        "# Configuration reference",
        "",
        "Every key a run takes, its default and what it does: generated from the schema "
        "(`src/pstage/config/sections.py`), the same text `pstage config` prints. Override any key on "
        "the command line (`pstage train KEY=VALUE`, dotted, values parsed as YAML) or in a "
        "`--config` file; [Training](training.md) shows how.",
        "",
    ]
    defaults = Config()
    rows: dict[str, list[str]] = {}

    def collect(model: BaseModel, section: str, prefix: str) -> None:
        for name, field in type(model).model_fields.items():
            value = getattr(model, name)
            if isinstance(value, BaseModel):
                collect(value, section or name, f"{prefix}{name}.")
                continue
            text = (field.description or "").replace("<", "&lt;").replace("*", "\\*")  # not HTML, not emphasis
            text = RESULTS.sub(lambda m: f"[RESULTS.md#{m[1]}]({results}#{m[1]})", text)
            cells = [f"`{prefix}{name}`", f"`{_flow(_plain(value))}`", _kind(field.annotation), text]
            rows.setdefault(section or "(top level)", []).append(
                "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
            )

    collect(defaults, "", "")
    for section, lines in rows.items():
        out += [
            f"## {section}",
            "",
            "| key | default | values | what it does |",
            "| --- | --- | --- | --- |",
            *lines,
            "",
        ]
    out += ["## As YAML", "", "`pstage config` prints this (with your file and overrides applied):", ""]
    out += ["```yaml", annotated_yaml(defaults).rstrip(), "```", ""]
    return "\n".join(out)


def _plain(value: Any) -> Any:
    """tune.space's dimensions as their set keys only; everything else as it is."""
    if isinstance(value, dict):
        return {
            k: v.model_dump(mode="json", exclude_defaults=True) if isinstance(v, BaseModel) else v
            for k, v in value.items()
        }
    return value


def _kind(annotation: Any) -> str:
    """A field's accepted values in words: ``auto | on | off``, ``int``, ``[int, int]``, ``list of float``."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _kind(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return " | ".join(dict.fromkeys(_kind(a) for a in get_args(annotation)))
    if origin is Literal:
        return " | ".join(str(a) for a in get_args(annotation))
    if origin is tuple:
        return "[" + ", ".join(_kind(a) for a in get_args(annotation)) + "]"
    if origin is list:
        return f"list of {_kind(get_args(annotation)[0])}"
    if origin is dict:
        return "mapping"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def _flow(value: Any) -> str:
    """One YAML value on one line (lists and mappings in flow style)."""
    value = list(value) if isinstance(value, tuple) else value
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()
