"""What a captioning method is to the rest of capdemo: typed options, loading from a bundle, batched captioning.

A method (MacCap, TOMCap, CapDec, ...) is a :class:`CaptionMethod` subclass listed in the registry
(:mod:`capdemo.methods`). It declares its name (also its bundle component), a display label, and an
``Options`` dataclass whose fields are :func:`setting`\\ s: a default, bounds and one line of help. The
facade, the CLI flags, the app's controls and the HTTP API parameters are all generated from these
declarations, so none of them names a method.

Every method starts from an :class:`Encoded` batch: the facade runs the vision tower once (and any
other image tower a method asks for, such as TOMCap's retrieval encoder), times it per image, and
hands the same batch to every method and plot.
"""

from __future__ import annotations

import copy

import dataclasses
import math
import typing
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from capdemo.bundle import Bundle
from capdemo.config import Config
from capdemo.encoders import ClipEncoder, EncoderConfig, encoder_name, load_encoder
from capdemo.features import ImageFeatures
from capdemo.result import Result

SETTING_KEY = "capdemo.setting"  # dataclass field metadata key of a setting's description


# --------------------------------------------------------------------------------------------
# Options


@dataclass(frozen=True)
class Setting:
    """One inference option as a front end sees it (a CLI flag, a slider, an API parameter)."""

    name: str  # the Options field name (CLI flag --name-with-dashes)
    kind: type  # int, float, bool or str
    default: Any  # the method's default (a loaded bundle may preset another, see CaptionMethod.default_options)
    label: str  # short display name, e.g. "Samples S"
    help: str  # one line: what it does, and the paper's value
    low: float | None = None  # inclusive bounds of numbers (None: unbounded on that side)
    high: float | None = None
    choices: tuple[str, ...] = ()  # allowed values of a str setting
    step: float | None = None  # slider step of a float setting

    def bounded(self, limits: Mapping[str, tuple[float, float]]) -> tuple[float | None, float | None]:
        """This setting's bounds narrowed by a loaded model's ``limits`` (what the model can take)."""
        low, high = self.low, self.high
        if self.name in limits:
            model_low, model_high = limits[self.name]
            low = model_low if low is None else max(low, model_low)
            high = model_high if high is None else min(high, model_high)
        return low, high


def setting(default: Any, *, label: str, help: str, low: float | None = None, high: float | None = None,
            choices: Sequence[str] = (), step: float | None = None) -> Any:
    """Declare an Options field: its default, display label, one-line help and bounds (or choices)."""
    metadata = {SETTING_KEY: {"label": label, "help": help, "low": low, "high": high, "choices": tuple(choices),
                              "step": step}}
    return field(default=default, metadata=metadata)


@dataclass
class MethodOptions(Config):
    """Base of every method's per-request inference settings; each field is declared with :func:`setting`."""

    @classmethod
    def settings(cls) -> list[Setting]:
        """The declared settings, in field order."""
        hints = typing.get_type_hints(cls)
        out = []
        for f in dataclasses.fields(cls):
            meta = f.metadata.get(SETTING_KEY)
            if meta is None:
                raise TypeError(f"{cls.__name__}.{f.name} is not declared with setting()")
            out.append(Setting(name=f.name, kind=hints[f.name], default=f.default, **meta))
        return out

    def validated(self, limits: Mapping[str, tuple[float, float]] | None = None) -> MethodOptions:
        """A checked copy: types, finiteness, whole numbers, bounds (narrowed by ``limits``) and choices.

        Values arrive from sliders, flags and raw API calls alike, so anything wrong is a one-line
        ``ValueError`` naming the setting — never a crash deep inside generate().
        """
        values = {}
        for item in self.settings():
            values[item.name] = _checked(item, getattr(self, item.name), limits or {})
        return dataclasses.replace(self, **values)


def _checked(item: Setting, value: Any, limits: Mapping[str, tuple[float, float]]) -> Any:
    name = item.name
    if item.kind is str:
        if value not in item.choices:
            raise ValueError(f"{name} must be one of {', '.join(item.choices)}, got {value!r}")
        return value
    if item.kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if item.kind is int:
        if float(value) != int(value):
            raise ValueError(f"{name} must be a whole number, got {value!r}")
        value = int(value)
    else:
        value = float(value)
    low, high = item.bounded(limits)
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be between {_number(low)} and {_number(high)}, got {value!r}")
    return value


def _number(bound: float | None) -> str:
    return "-inf" if bound is None else f"{bound:g}"


def options_from_config(options_class: type[MethodOptions], config: Config) -> MethodOptions:
    """The Options a model was configured with: every setting whose name is also a field of its config."""
    stored = config.to_dict()
    return options_class(**{item.name: stored[item.name] for item in options_class.settings() if item.name in stored})


# --------------------------------------------------------------------------------------------
# What methods read


@dataclass
class Encoded:
    """A batch of images after the image towers: what every method and plot starts from."""

    keys: list[str]  # content hash per image
    features: ImageFeatures  # the captioning CLIP's outputs, batch B, on its device
    features_encoder: str  # name of the encoder that made ``features``
    # encoder name -> (B, D_t) L2-normalised global embeddings from the other image towers methods asked for
    tower_embeds: dict[str, torch.Tensor] = field(default_factory=dict)
    # per image: milliseconds of vision-tower time its encoding took (its share of the pass that encoded it)
    encode_ms: list[float] = field(default_factory=list)
    cached: list[bool] = field(default_factory=list)  # per image: came from the encode cache in this call

    def __len__(self) -> int:
        return len(self.keys)

    def select(self, index: slice | Sequence[int]) -> Encoded:
        """A sub-batch (same order as ``index``)."""
        rows = list(range(len(self)))[index] if isinstance(index, slice) else list(index)
        return Encoded(keys=[self.keys[i] for i in rows], features=self.features.select(rows),
                       features_encoder=self.features_encoder,
                       tower_embeds={name: embeds[rows] for name, embeds in self.tower_embeds.items()},
                       encode_ms=[self.encode_ms[i] for i in rows] if self.encode_ms else [],
                       cached=[self.cached[i] for i in rows] if self.cached else [])

    def image_embeds(self, tower: ClipEncoder | None = None) -> torch.Tensor:
        """(B, D) global image embeddings from ``tower`` (None: the captioning CLIP)."""
        if tower is None or tower.name == self.features_encoder:
            return self.features.image_embeds
        if tower.name not in self.tower_embeds:
            raise ValueError(f"this batch was encoded without {tower.name}; pass the images instead")
        return self.tower_embeds[tower.name]


# --------------------------------------------------------------------------------------------
# Loading


class Towers:
    """The image and text towers of one loaded bundle: the captioning CLIP and any other a method needs.

    Each distinct encoder is loaded once, however many methods ask for it.
    """

    def __init__(self, main: ClipEncoder, *, device: str | torch.device):
        self.main = main
        self.device = device
        self._others: dict[str, ClipEncoder] = {}

    def get(self, config: EncoderConfig | None) -> ClipEncoder:
        """The encoder ``config`` describes (None: the captioning CLIP)."""
        if config is None:
            return self.main
        name = encoder_name(config)
        if name == self.main.name:
            return self.main
        if name not in self._others:
            self._others[name] = load_encoder(config, device=self.device)
        return self._others[name]

    def encoders(self) -> list[ClipEncoder]:
        """Every loaded encoder, the captioning CLIP first."""
        return [self.main, *self._others.values()]


@dataclass
class LoadContext:
    """What a method's ``from_bundle`` gets: the verified bundle, its towers and the device."""

    bundle: Bundle
    towers: Towers
    device: str | torch.device

    @property
    def encoder(self) -> ClipEncoder:
        return self.towers.main


# --------------------------------------------------------------------------------------------
# The interface


class CaptionMethod(ABC):
    """A loaded captioning method: options with bundle defaults, and batched captioning of encoded images."""

    name: ClassVar[str]  # registry key, bundle component name, CLI --method value
    label: ClassVar[str]  # display name ("MacCap")
    citation: ClassVar[str]  # where it comes from, one line ("Qiu et al., AAAI 2024")
    Options: ClassVar[type[MethodOptions]]  # its per-request settings

    # What analysis views may read when a method has them (TOMCap: its datastore and gap statistics).
    datastore: Any = None
    gap_stats: Any = None

    @classmethod
    @abstractmethod
    def from_bundle(cls, context: LoadContext) -> CaptionMethod:
        """Rebuild the method exactly from its bundle component (eval mode, on ``context.device``)."""

    @abstractmethod
    def default_options(self) -> MethodOptions:
        """The settings this model was configured with in its bundle (the app's and API's defaults)."""

    def limits(self) -> dict[str, tuple[float, float]]:
        """Bounds this loaded model puts on settings beyond their static ones (patches, datastore, LM positions)."""
        return {}

    def options(self, options: MethodOptions | None = None, **overrides: Any) -> MethodOptions:
        """``options`` (default: the bundle's) with ``overrides`` applied, validated against this model."""
        base = self.default_options() if options is None else options
        if not isinstance(base, self.Options):
            raise ValueError(f"{self.label} takes {self.Options.__name__}, got {type(base).__name__}")
        unknown = sorted(set(overrides) - {item.name for item in self.Options.settings()})
        if unknown:
            known = ", ".join(item.name for item in self.Options.settings())
            raise ValueError(f"{self.label} has no setting {', '.join(unknown)} (it has: {known})")
        return dataclasses.replace(base, **overrides).validated(self.limits())

    def retrieval_encoder(self) -> ClipEncoder | None:
        """The encoder this method's datastore was embedded with (what a visitor's own captions must be embedded
        with to be searched in its place); None when the method does not retrieve."""
        return None

    def using_store(self, store: Any) -> CaptionMethod:
        """A shallow copy of this loaded method that searches ``store`` (a datastore, or stores searched as one)
        instead of its own; the networks are shared, nothing of this instance changes."""
        if self.datastore is None:
            raise ValueError(f"{self.label} does not retrieve captions")
        copied = copy.copy(self)
        copied.datastore = store
        return copied

    def image_towers(self) -> list[ClipEncoder]:
        """Image towers besides the captioning CLIP that must see every image (their embeddings reach
        :meth:`caption` in ``Encoded.tower_embeds``)."""
        return []

    @abstractmethod
    def caption(self, encoded: Encoded, options: MethodOptions) -> list[Result]:
        """One Result per image of ``encoded`` (validated ``options``); timings per image, encode excluded."""

    def text_to_text(self, texts: Sequence[str], text_embeds: torch.Tensor,
                     options: MethodOptions | None = None) -> list[str] | None:
        """Captions decoded from texts' own CLIP embeddings put where an image's would go, through the method's
        inference with ``options`` (default: the bundle's): the ceiling of text-only training, where no modality
        gap exists. None when the method has no such path."""
        return None

    def answer_lm(self) -> Any:
        """A :class:`capdemo.vqa.AnswerLM` over this method's own LM, with its VQA settings, when this method's
        captions serve VQA (MacCap, paper §4.4); else None. A bundle may name a frozen LM that answers instead."""
        return None

    def modules(self) -> list[nn.Module]:
        """The method's own networks (for device and precision changes)."""
        return []


__all__ = [
    "CaptionMethod",
    "Encoded",
    "LoadContext",
    "MethodOptions",
    "Setting",
    "Towers",
    "options_from_config",
    "setting",
]
