"""The registry of captioning methods: the one place where a method is chosen by name.

Everything that offers a choice of method (the facade, ``python -m capdemo --method``, the app's
checkboxes and controls, the HTTP API, shapes-eval) reads this registry and each method's
declared ``Options``; adding a method means writing its model and inference files and one line
below.
"""

from __future__ import annotations

from capdemo.methods.base import CaptionMethod
from capdemo.methods.capdec.inference import CapDecMethod
from capdemo.methods.maccap.inference import MacCapMethod
from capdemo.methods.tomcap.inference import TOMCapMethod

_REGISTRY: dict[str, type[CaptionMethod]] = {}


def register(method: type[CaptionMethod]) -> type[CaptionMethod]:
    """Add ``method`` under its ``name`` (a later registration of the same name replaces the earlier one)."""
    _REGISTRY[method.name] = method
    return method


def unregister(name: str) -> None:
    """Remove a method (e.g. one a test registered)."""
    _REGISTRY.pop(name, None)


def names() -> tuple[str, ...]:
    """Registered method names, in registration order (the order the app and the CLI list them)."""
    return tuple(_REGISTRY)


def get(name: str) -> type[CaptionMethod]:
    """The method registered as ``name``; an unknown name is a one-line ValueError listing the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(_REGISTRY)}") from None


def methods() -> tuple[type[CaptionMethod], ...]:
    return tuple(_REGISTRY.values())


for _method in (MacCapMethod, TOMCapMethod, CapDecMethod):
    register(_method)

__all__ = ["CaptionMethod", "get", "methods", "names", "register", "unregister"]
