"""Dataclasses built from YAML, JSON and keyword arguments, checked against their type
hints: one checker for every settings class (config.py), params.json (ModelArgs) and
SamplingParams, so a wrong type reads the same wherever it comes from."""

from __future__ import annotations

import types
import typing
from dataclasses import fields, is_dataclass
from typing import Any, Union

from .errors import ConfigError


def build(cls: type, values: dict[str, Any], source: str) -> Any:
    hints = typing.get_type_hints(cls)
    allowed = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown}; allowed keys: {sorted(allowed)}")
    kwargs = {k: coerce(v, hints[k], f"{source}.{k}") for k, v in values.items()}
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{source}: {exc}") from None


def coerce(value: Any, hint: Any, where: str) -> Any:
    """Check a YAML/JSON value against a field's type; ints are accepted for floats."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            if isinstance(value, dict) and isinstance(option, type) and is_dataclass(option):
                return coerce(value, option, where)  # its own error names the bad key
            try:
                return coerce(value, option, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} is not {describe(hint)}")
    if origin is tuple:
        item = typing.get_args(hint)[0]
        if item is str and isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected {describe(hint)}, got {value!r}")
        return tuple(coerce(v, item, where) for v in value)
    if origin is dict:
        key_hint, value_hint = typing.get_args(hint)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected {describe(hint)}, got {value!r}")
        return {
            _key(k, key_hint, where): coerce(v, value_hint, f"{where}[{k!r}]")
            for k, v in value.items()
        }
    if hint is Any:
        return value
    if isinstance(hint, type) and is_dataclass(hint):  # a nested settings class
        if isinstance(value, hint):
            return value
        if isinstance(value, dict):
            return build(hint, value, where)
        raise ConfigError(f"{where}: expected a mapping of {hint.__name__}'s keys, got {value!r}")
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint in (str, bool) and type(value) is hint:
        return value
    raise ConfigError(f"{where}: {value!r} is not {describe(hint)}")


def _key(key: Any, hint: Any, where: str) -> Any:
    """A mapping's key; JSON's keys are strings, so "123" is taken for an integer key."""
    if hint is int and isinstance(key, str) and key.strip().lstrip("-").isdigit():
        return int(key)
    try:
        return coerce(key, hint, where)
    except ConfigError:
        raise ConfigError(f"{where}: key {key!r} is not {describe(hint)}") from None


def describe(hint: Any) -> str:
    if typing.get_origin(hint) in (Union, types.UnionType):
        return " or ".join(describe(h) for h in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        return "a list of integers" if typing.get_args(hint)[0] is int else "a list of strings"
    if typing.get_origin(hint) is dict:
        key, value = typing.get_args(hint)
        return f"a mapping from {describe(key)} to {describe(value)}"
    if isinstance(hint, type) and is_dataclass(hint):
        return f"a mapping of {hint.__name__}'s keys"
    return {
        int: "an integer",
        float: "a number",
        str: "a string",
        bool: "true/false",
        type(None): "null",
    }.get(hint, str(hint))


def check_types(obj: Any, source: str) -> None:
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        try:
            coerce(getattr(obj, f.name), hints[f.name], f"{source}.{f.name}")
        except ConfigError as exc:
            raise TypeError(str(exc)) from None
        if hints[f.name] is float or typing.get_args(hints[f.name]) == (float, type(None)):
            value = getattr(obj, f.name)
            if isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(obj, f.name, float(value))
