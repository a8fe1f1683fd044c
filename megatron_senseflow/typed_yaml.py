"""A typed YAML loader: nested dataclasses from YAML mappings and dotted overrides, every value checked against
its annotation, one sentence for each mistake.

It knows nothing of our settings (config.py declares those): an unknown key names the key, the file and the
closest valid name; a value of the wrong type or out of its `Range` names the key and what it must be. Dotted
overrides (`parallel.tp=2`) are parsed as YAML scalars, so `1e-5`, `true` and `[1, 2]` mean what they say.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from .errors import ConfigError


class Range:
    """Bounds of a numeric field, checked by the loader (`Annotated[float, Range(gt=0)]`)."""

    def __init__(self, gt: float | None = None, ge: float | None = None, lt: float | None = None,
                 le: float | None = None):
        self.gt, self.ge, self.lt, self.le = gt, ge, lt, le

    def violation(self, v: float) -> str | None:
        for bound, ok, word in ((self.gt, lambda b: v > b, "greater than"), (self.ge, lambda b: v >= b, "at least"),
                                (self.lt, lambda b: v < b, "less than"), (self.le, lambda b: v <= b, "at most")):
            if bound is not None and not ok(bound):
                return f"must be {word} {bound:g}"
        return None


def build(cls: type, data: dict[str, Any], source: str = "<dict>") -> Any:
    """The dataclass `cls` from a mapping, every key type-checked; `source` names the file in messages."""
    return _Reader(source).build(cls, data, "")


def read_mapping(path: Path) -> dict[str, Any]:
    """A YAML file that holds a mapping at the top level (an empty file is an empty mapping)."""
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level.")
    return loaded


def parse_override(text: str) -> tuple[str, Any]:
    """`section.key=value` -> ("section.key", value read as a YAML scalar)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value (for example parallel.tp=2).")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    """Put `value` at the dotted path in nested mappings, making sections on the way."""
    parts = dotted.split(".")
    node = d
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {dotted}: {p} is not a section.")
        node = nxt
    node[parts[-1]] = value


def to_dict(obj: Any) -> dict[str, Any]:
    """Nested dataclasses as plain mappings and lists (what `build` reads back)."""
    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(obj)


def dump(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False)


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls, include_extras=True)
    return _HINTS[cls]


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


class _Reader:
    """One read of one source (its name goes into the messages)."""

    def __init__(self, source: str):
        self.source = source

    def build(self, cls: type, data: dict[str, Any], where: str) -> Any:
        hints = _hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        kwargs = {}
        for key, value in data.items():
            if key not in names:
                close = difflib.get_close_matches(str(key), names, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"unknown key {where + '.' if where else ''}{key} in {self.source}{hint}.")
            kwargs[key] = self.coerce(value, hints[key], f"{where + '.' if where else ''}{key}")
        return cls(**kwargs)

    def coerce(self, value: Any, tp: Any, where: str) -> Any:
        """Check `value` against the annotation `tp` (after `from __future__ import annotations`)."""
        origin = typing.get_origin(tp)
        if tp is Any:
            return value
        if origin is Annotated:
            base, *meta = typing.get_args(tp)
            value = self.coerce(value, base, where)
            for m in meta:
                problem = m.violation(value) if isinstance(m, Range) else None
                if problem:
                    raise ConfigError(f"{where}={value!r} {problem}.")
            return value
        if origin in (typing.Union, types.UnionType):
            args = typing.get_args(tp)
            if value is None and type(None) in args:
                return None
            errors = []
            for a in args:
                if a is type(None):
                    continue
                try:
                    return self.coerce(value, a, where)
                except ConfigError as e:
                    errors.append(str(e))
            raise ConfigError(errors[0] if errors else f"{where}: cannot be {value!r}.")
        if origin is Literal:
            choices = typing.get_args(tp)
            if value not in choices:
                close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"{where}={value!r} is not one of {', '.join(map(repr, choices))}{hint}.")
            return value
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{where} must be a mapping of {tp.__name__} fields, not {value!r}.")
            return self.build(tp, value, where)
        if origin in (list, tuple):
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"{where} must be a list, not {value!r}.")
            args = typing.get_args(tp)
            if origin is tuple and args and args[-1] is not Ellipsis:
                if len(value) != len(args):
                    raise ConfigError(f"{where} must have {len(args)} entries, not {len(value)}.")
                return tuple(self.coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
            inner = args[0] if args else Any
            items = [self.coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
            return tuple(items) if origin is tuple else items
        if origin is dict:
            if not isinstance(value, dict):
                raise ConfigError(f"{where} must be a mapping, not {value!r}.")
            return dict(value)
        if tp is float:
            if isinstance(value, str):  # PyYAML reads 1e-5 (no dot) as a string
                try:
                    value = float(value)
                except ValueError:
                    pass
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{where} must be a number, not {value!r}.")
            if not math.isfinite(value):
                raise ConfigError(f"{where}={value!r} must be a finite number.")
            return float(value)
        if tp is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{where} must be an integer, not {value!r}.")
            return value
        if tp is bool:
            if not isinstance(value, bool):
                raise ConfigError(f"{where} must be true or false, not {value!r}.")
            return value
        if tp is str:
            if not isinstance(value, str):
                raise ConfigError(f"{where} must be a string, not {value!r}.")
            return value
        raise ConfigError(f"{where}: unsupported field type {_type_name(tp)}.")
