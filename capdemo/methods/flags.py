"""Command-line flags generated from the registered methods' settings, for every command that captions.

Each distinct setting name across the registered methods becomes one flag (``--samples``, ``--k``,
``--select-by``, ...) whose help says which methods take it; a flag left out takes the bundle's value,
and a flag the chosen method does not have is a one-line error.
"""

from __future__ import annotations

import argparse
from typing import Any
from collections.abc import Sequence

from capdemo import methods as registry
from capdemo.methods.base import CaptionMethod, Setting


DEST_PREFIX = "setting:"  # namespace attributes of setting flags, apart from a command's own arguments


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def given_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Every setting flag given on the command line: {setting name: value}."""
    return {key[len(DEST_PREFIX):]: value for key, value in vars(args).items() if key.startswith(DEST_PREFIX)}


def _declared() -> dict[str, list[tuple[type[CaptionMethod], Setting]]]:
    by_name: dict[str, list[tuple[type[CaptionMethod], Setting]]] = {}
    for method in registry.methods():
        for item in method.Options.settings():
            by_name.setdefault(item.name, []).append((method, item))
    return by_name


def add_setting_arguments(parser: argparse.ArgumentParser | Any, *, title: str = "method settings",
                          exclude: Sequence[str] = ()) -> None:
    """Add one flag per setting of the registered methods, except ``exclude`` (flags the command already
    uses for something else). A flag left out is absent from the namespace: the bundle's value."""
    group = parser.add_argument_group(title, "left out: the bundle's value; each applies to the methods named")
    for name, owners in _declared().items():
        if name in exclude:
            continue
        kinds = {item.kind for _, item in owners}
        if len(kinds) > 1:
            raise TypeError(f"setting {name!r} has different types in {', '.join(m.label for m, _ in owners)}")
        kind = kinds.pop()
        text = "; ".join(f"{method.label}: {item.help}" for method, item in owners)
        common = {"dest": DEST_PREFIX + name, "default": argparse.SUPPRESS, "help": text}
        if kind is bool:
            group.add_argument(_flag(name), action=argparse.BooleanOptionalAction, **common)
        elif kind is str:
            choices = sorted({choice for _, item in owners for choice in item.choices})
            group.add_argument(_flag(name), choices=choices, metavar="{" + ",".join(choices) + "}", **common)
        else:
            group.add_argument(_flag(name), type=kind, metavar=name.upper(), **common)


def settings_from_arguments(args: argparse.Namespace, method: str | type[CaptionMethod], *,
                            strict: bool = True) -> dict[str, Any]:
    """The settings given on the command line that ``method`` has. With ``strict``, a given flag it does not
    have is a one-line error (one method chosen); without, it is left to the methods that have it."""
    chosen = registry.get(method) if isinstance(method, str) else method
    own = {item.name for item in chosen.Options.settings()}
    given = given_settings(args)
    foreign = sorted(set(given) - own)
    if not strict:
        return {name: value for name, value in given.items() if name in own}
    if foreign:
        raise ValueError(f"{', '.join(_flag(n) for n in foreign)} does not apply to {chosen.label} "
                         f"(its settings: {', '.join(_flag(n) for n in sorted(own))})")
    return given


def setting_names(methods: Sequence[type[CaptionMethod]] | None = None) -> list[str]:
    """Every setting name of ``methods`` (default: all registered), each once."""
    return list(dict.fromkeys(item.name for m in (methods or registry.methods()) for item in m.Options.settings()))


__all__ = ["add_setting_arguments", "given_settings", "setting_names", "settings_from_arguments"]
