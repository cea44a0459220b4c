"""The app's settings controls and API parameters, generated from the loaded methods' declared settings.

Every setting of every method in the bundle becomes one control (a slider, a number field, a
checkbox or a radio), labelled and bounded by its declaration narrowed by what the loaded model
can take (:meth:`~capdemo.methods.base.CaptionMethod.limits`), preset to the bundle's value,
and one API parameter named ``<method>_<setting>``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any
from collections.abc import Callable, Sequence

import gradio as gr

from capdemo.methods.base import CaptionMethod, MethodOptions, Setting

SLIDER_MAX_SPAN = 10_000  # wider integer ranges (seeds) get a number field instead of a slider


@dataclass(frozen=True)
class SettingControl:
    """One method's setting and the component that edits it."""

    method: str
    setting: Setting
    component: Any

    @property
    def api_name(self) -> str:
        return f"{self.method}_{self.setting.name}"


def control(item: Setting, *, value: Any, low: float | None, high: float | None, elem_id: str) -> Any:
    """A component for one setting: bounds and preset value included (the value clamped into the bounds)."""
    label, info = item.label, item.help
    if item.kind is bool:
        return gr.Checkbox(value=bool(value), label=label, info=info, elem_id=elem_id)
    if item.kind is str:
        return gr.Radio(list(item.choices), value=value, label=label, info=info, elem_id=elem_id)
    value = min(max(value, low), high)
    if item.kind is int and high - low > SLIDER_MAX_SPAN:
        return gr.Number(value=value, precision=0, minimum=low, maximum=high, label=label, info=info, elem_id=elem_id)
    step = item.step if item.step is not None else (1 if item.kind is int else (high - low) / 100)
    return gr.Slider(minimum=low, maximum=high, value=value, step=step, label=label, info=info, elem_id=elem_id)


def method_controls(method: CaptionMethod) -> list[SettingControl]:
    """Controls for every setting of a loaded method (lay them out inside the current Blocks context)."""
    defaults, limits = method.default_options(), method.limits()
    controls = []
    for item in method.Options.settings():
        low, high = item.bounded(limits)
        component = control(item, value=getattr(defaults, item.name), low=low, high=high,
                            elem_id=f"{method.name}-{item.name.replace('_', '-')}")
        controls.append(SettingControl(method.name, item, component))
    return controls


def options_from_values(methods: dict[str, CaptionMethod], controls: Sequence[SettingControl],
                        values: Sequence[Any]) -> dict[str, dict[str, Any]]:
    """Group positional control values by method: {method: {setting: value}} (None values left out)."""
    grouped: dict[str, dict[str, Any]] = {name: {} for name in methods}
    for item, value in zip(controls, values):
        if value is not None and item.method in grouped:
            grouped[item.method][item.setting.name] = value
    return grouped


def with_parameters(fn: Callable[..., Any], leading: Sequence[str], controls: Sequence[SettingControl],
                    trailing: Sequence[inspect.Parameter] = ()) -> Callable[..., Any]:
    """``fn(*leading, [control values], *trailing)`` presented to Gradio with named parameters: ``leading``,
    one per control (default: the bundle's value, so an API call may leave any out), then ``trailing``
    (e.g. the session state and ``progress``)."""
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    parameters = [inspect.Parameter(name, kind) for name in leading]
    parameters += [inspect.Parameter(c.api_name, kind, default=c.component.value) for c in controls]
    signature = inspect.Signature([*parameters, *trailing])

    def event(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        given = bound.arguments
        return fn(*(given[name] for name in leading), [given[c.api_name] for c in controls],
                  *(given[p.name] for p in trailing))

    event.__signature__ = signature  # type: ignore[attr-defined]
    event.__name__ = getattr(fn, "__name__", "event")
    event.__qualname__ = getattr(fn, "__qualname__", event.__name__)
    event.__doc__ = fn.__doc__
    return event


def settings_text(options: MethodOptions) -> str:
    """One line of a method's settings, as shown next to its result."""
    return ", ".join(f"{item.label} {getattr(options, item.name)}" for item in options.settings())


__all__ = ["SettingControl", "control", "method_controls", "options_from_values", "settings_text", "with_parameters"]
