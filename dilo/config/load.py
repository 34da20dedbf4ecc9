"""From TOML files and `--section.key=value` overrides to a validated `RunConfig`, and from
pydantic's errors to messages that name the dotted key as the user writes it."""

from __future__ import annotations

import json
import sys
import types
import typing
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ValidationError

from dilo.config.run import RunConfig
from dilo.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """Turn ["--outer.lr=0.5", "--inner.precision", "bf16"] into a nested dict.

    Values are read as TOML literals when they parse (numbers, booleans, arrays, quoted
    strings) and as plain strings otherwise.
    """
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --section.key=value")
        key, sep, value = arg[2:].partition("=")
        if not sep:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise ConfigError(f"override --{key} has no value; write --{key}=VALUE")
            value = args[i + 1]
            i += 1
        i += 1
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"bad override key {key!r}; write --section.key=value")
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override --{key} conflicts with an earlier override of --{p}")
        node[leaf] = _literal(value)
    return out


def _literal(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = _merge(merged[k], v)
        else:
            merged[k] = v
    return merged


_DEFAULT_KIND = {"model": "gpt", "outer": "diloco"}


def load(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> RunConfig:
    """Read a TOML file (or start from defaults), apply overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            raw = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: not valid TOML: {e}") from None
    if overrides:
        extra = parse_overrides(overrides) if isinstance(overrides, list) else overrides
        for section in ("model", "outer"):
            # switching a section to another kind drops the file's settings of the old kind
            new_kind = extra.get(section, {}).get("kind") if isinstance(extra.get(section), dict) else None
            old = raw.get(section)
            if new_kind is not None and isinstance(old, dict) and old.get("kind", _DEFAULT_KIND[section]) != new_kind:
                raw = {**raw, section: {}}
        raw = _merge(raw, extra)
    return from_dict(raw, source=str(path) if path else "config")


def toml_value(v: Any) -> str:
    """One TOML value: booleans, numbers, strings, arrays and (inline) tables."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"no TOML form for {v!r}")


def to_toml(raw: dict[str, Any]) -> str:
    """A config dict as the TOML `load` reads back: top-level keys, then one [table] per section
    (tables inside a section, such as an hf model's config, are written inline)."""
    lines = [f"{k} = {toml_value(v)}" for k, v in raw.items() if not isinstance(v, dict)]
    for name, table in raw.items():
        if isinstance(table, dict):
            lines += ["", f"[{name}]", *(f"{k} = {toml_value(v)}" for k, v in table.items())]
    return "\n".join(lines) + "\n"


def from_dict(raw: dict[str, Any], source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        lines = [_describe(err) for err in e.errors()]
        raise ConfigError(f"{source}: invalid configuration:\n  " + "\n  ".join(lines)) from None


def _describe(err: Any) -> str:
    cls, parts = _resolve(list(err["loc"]))
    key = _dotted(parts)
    if err["type"] == "extra_forbidden":
        parent, _ = _resolve(list(err["loc"])[:-1])
        hint = f"; allowed keys here: {', '.join(sorted(parent.model_fields))}" if parent else ""
        return f"unknown key {key!r}{hint}"
    shown = err.get("input")
    shown_text = "" if isinstance(shown, dict) or err["type"] == "missing" else f" (got {shown!r})"
    return f"{key or '(top level)'}: {err['msg']}{shown_text}"


def _union_members(annotation: Any) -> dict[str, type[BaseModel]]:
    """For an Annotated discriminated union, map tag -> model class."""
    members: dict[str, type[BaseModel]] = {}
    args = typing.get_args(annotation)
    inner = args[0] if args and typing.get_origin(annotation) is Annotated else annotation
    if typing.get_origin(inner) not in (typing.Union, types.UnionType):
        return members  # e.g. list[CodecOverride]: its items are not union members
    for cls in typing.get_args(inner):
        if isinstance(cls, type) and issubclass(cls, BaseModel) and "kind" in cls.model_fields:
            members[cls.model_fields["kind"].default] = cls
    return members


def _dotted(parts: list[str | int]) -> str:
    """["membership", "peers", 2] -> "membership.peers[2]"."""
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".")


def _resolve(loc: list[str | int]) -> tuple[type[BaseModel] | None, list[str | int]]:
    """Follow a pydantic error location through the config tree.

    Returns the model class the location ends in (None for a leaf) and the location as the
    user writes it, without the union tags pydantic inserts ("outer.diloco.lr" -> "outer.lr");
    list indices stay ints.
    """
    cls: type[BaseModel] | None = RunConfig
    parts: list[str | int] = []
    i = 0
    while i < len(loc):
        parts.append(loc[i])
        field = cls.model_fields.get(str(loc[i])) if cls is not None else None
        if field is None:
            cls = None
            i += 1
            continue
        members = _union_members(field.annotation)
        if members:
            cls = members.get(str(loc[i + 1])) if i + 1 < len(loc) else None
            i += 2
            continue
        ann = field.annotation
        if typing.get_origin(ann) is list and i + 1 < len(loc):
            # a list of sections ([[codec.overrides]]): the index, then the item's own keys
            parts.append(loc[i + 1])
            (ann,) = typing.get_args(ann)
            i += 1
        cls = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        i += 1
    return cls, parts


def schema() -> dict[str, Any]:
    return RunConfig.model_json_schema()
