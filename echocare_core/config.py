"""Typed configuration: frozen dataclasses loaded from YAML by one `load_config`.

Every config file of the toolkit is a tree of frozen dataclasses. Loading checks each key against
the dataclass fields (an unknown key fails with a "did you mean" hint), converts and checks types,
and applies `--set a.b=value` overrides before validation, so a bad override fails the same way as
a bad file.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml

from echocare_core.files import write_atomic

__all__ = [
    "ConfigError",
    "apply_overrides",
    "check_ranges",
    "did_you_mean",
    "from_dict",
    "load_config",
    "save_config",
    "to_dict",
]

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the file, key, value and the fix."""


def did_you_mean(value: str, allowed: list[str], cutoff: float = 0.5) -> str:
    """The one did-you-mean of the toolkit's messages: " Did you mean 'x'?" for the closest allowed value, or ""."""
    close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1, cutoff=cutoff)
    return f" Did you mean '{close[0]}'?" if close else ""


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML value to type `tp`, raising ConfigError that names `where`."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _convert(value, option, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {tp}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            hint = did_you_mean(str(value), [str(a) for a in allowed])
            raise ConfigError(f"{where}: {value!r} is not allowed; choose one of {list(allowed)}.{hint}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of keys, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)} ({value!r})")
            return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        k_tp, v_tp = get_args(tp) or (Any, Any)
        return {_convert(k, k_tp, where): _convert(v, v_tp, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    if tp is Path:
        if not isinstance(value, (str, os.PathLike)):
            raise ConfigError(f"{where}: expected a path, got {value!r}")
        return Path(value)
    raise ConfigError(f"{where}: unsupported type {tp}")


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass `cls` from a plain mapping, checking every key and type.

    Raises:
        ConfigError: on an unknown key, a wrong type, a value not allowed, or a failed
            `__post_init__` check; the message names `where` and the key.
    """
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in (data or {}).items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            raise ConfigError(
                f"unknown key '{path}'.{did_you_mean(str(key), list(fields))} Allowed here: {', '.join(fields)}"
            )
        kwargs[key] = _convert(value, hints[key], path)
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"missing required key(s) {', '.join((where + '.' if where else '') + m for m in missing)}")
    try:
        return cls(**kwargs)
    except ValueError as exc:
        raise ConfigError(f"{where or cls.__name__}: {exc}") from None


def to_dict(obj: Any) -> Any:
    """Turn a config dataclass back into plain YAML/JSON-able data."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=value` overrides (value parsed as YAML) to a nested mapping, in place.

    Raises:
        ConfigError: when an override is not of the form `key=value`.
    """
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set train.lr=1e-4")
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: '{part}' is a value, not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    return data


def load_config(
    cls: type[T],
    path: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
) -> T:
    """Load a YAML config file into dataclass `cls`, after `--set` overrides.

    Args:
        cls: the config dataclass.
        path: YAML file; None starts from `base` (or all defaults).
        overrides: `a.b=value` strings.
        base: mapping used when `path` is None (an embedded default config).

    Raises:
        FileNotFoundError: the file does not exist.
        ConfigError: the YAML does not parse or does not validate; the message starts with the file.
    """
    source = str(path) if path is not None else "<defaults>"
    data: dict[str, Any] = copy.deepcopy(base or {})  # overrides must not leak into the caller's mapping
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping of keys at the top level")
    try:
        return from_dict(cls, apply_overrides(data, overrides or []))
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def check_ranges(obj: Any, rules: dict[str, tuple[bool, str]]) -> None:
    """The one range check of the configs: raise for the first key whose value breaks its rule, naming the key,
    the value and the rule (`key=value: must be rule`); a config loader prefixes the section.

    Raises:
        ValueError: a rule is broken.
    """
    for key, (ok, rule) in rules.items():
        if not ok:
            raise ValueError(f"{key}={getattr(obj, key)}: must be {rule}")


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically (temp file, then rename)."""
    write_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
