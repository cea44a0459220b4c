"""Typed configuration: dataclasses that round-trip through JSON.

Every config that shapes a model is a ``Config`` subclass. It serialises to a
plain dict (stored in ``bundle.json``) and rebuilds exactly from it, so the
weights always travel with the settings that produced them. Unknown keys are
refused rather than silently dropped, so a typo or a newer bundle format is a
clear error instead of a quietly different model.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from capdemo.fileio import atomic_output

T = TypeVar("T", bound="Config")


def differing_keys(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Keys whose values differ between a saved run record and the current one (missing on either side
    counts), sorted: what a resume that must continue the same run names when it refuses."""
    return sorted(key for key in saved.keys() | now.keys() if saved.get(key) != now.get(key))


class ConfigError(ValueError):
    """A config dict that does not match its dataclass."""


def _build(tp: Any, value: Any, where: str) -> Any:
    """Rebuild ``value`` (parsed JSON) as type ``tp``."""
    origin = typing.get_origin(tp)
    if isinstance(tp, type) and issubclass(tp, Config):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected an object for {tp.__name__}, got {type(value).__name__}")
        return tp.from_dict(value, where=where)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _build(args[0], value, where) if len(args) == 1 else value
    if origin in (tuple,):
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_build(args[0], v, where) for v in value)
        return tuple(_build(a, v, where) for a, v in zip(args, value))
    if origin in (list,):
        (arg,) = typing.get_args(tp)
        return [_build(arg, v, where) for v in value]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


class Config:
    """Mixin for ``@dataclass`` configs: ``to_dict`` / ``from_dict`` / JSON files."""

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, field.name)
            if isinstance(value, Config):
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = list(value)
            out[field.name] = value
        return out

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any], *, where: str | None = None) -> T:
        where = where or cls.__name__
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}")
        kwargs = {k: _build(hints[k], v, f"{where}.{k}") for k, v in data.items()}
        try:
            return cls(**kwargs)  # type: ignore[call-arg]
        except TypeError as err:
            raise ConfigError(f"{where}: {err}") from None

    def replace(self: T, **changes: Any) -> T:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    def save_json(self, path: str | Path) -> None:
        """Write the config as JSON, atomically (a killed writer never leaves half a file)."""
        with atomic_output(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load_json(cls: type[T], path: str | Path) -> T:
        return cls.from_dict(json.loads(Path(path).read_text()))
