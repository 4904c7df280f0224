"""Self-documenting result records: every field of the JSON that ``kvforge eval`` writes is declared
once, here or in the module that fills it, with ``documented(...)``, and its description travels
with it (``kvforge eval --schema`` prints them all; a test checks the JSON against them)."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import MISSING, field
from typing import Any


def documented(description: str, default: Any = MISSING, *, default_factory: Any = MISSING) -> Any:
    """A dataclass field that carries its JSON documentation."""
    kwargs = {"metadata": {"doc": description}}
    if default is not MISSING:
        kwargs["default"] = default
    if default_factory is not MISSING:
        kwargs["default_factory"] = default_factory
    return field(**kwargs)


def record_fields(record_type: type) -> list[tuple[str, str, Any]]:
    """``(name, description, type)`` of every field of a documented dataclass."""
    hints = typing.get_type_hints(record_type)
    return [(f.name, f.metadata.get("doc", ""), hints[f.name]) for f in dataclasses.fields(record_type)]


def nested_record(annotation: Any) -> type | None:
    """The documented dataclass inside ``X``, ``X | None`` or ``list[X]``, if there is one."""
    candidates = [annotation]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) in (typing.Union, list):
        candidates = list(typing.get_args(annotation))
    for candidate in candidates:
        if dataclasses.is_dataclass(candidate):
            return candidate
    return None


def schema_paths(record_type: type, prefix: str = "") -> dict[str, str]:
    """Flattened ``{"models[].perplexity[].nll": description, ...}`` of a record and its sub-records."""
    paths: dict[str, str] = {}
    for name, description, annotation in record_fields(record_type):
        path = f"{prefix}{name}"
        paths[path] = description
        inner = nested_record(annotation)
        if inner is not None:
            is_list = typing.get_origin(annotation) is list
            paths.update(schema_paths(inner, f"{path}{'[]' if is_list else ''}."))
    return paths


def schema_markdown(record_type: type) -> str:
    """The JSON layout as a Markdown table (``kvforge eval --schema``)."""
    lines = ["| field | meaning |", "|---|---|"]
    lines += [f"| `{path}` | {text} |" for path, text in schema_paths(record_type).items()]
    return "\n".join(lines)
