"""The CLIP modality gap: per-dimension statistics, TOMCap's correction, MacCap/CapDec noise, and a report.

Text-only training feeds the decoder CLIP *text* embeddings and serves it CLIP
*image* embeddings, which occupy a different region of the sphere (the gap).
Two remedies live here:

* **Correction** (TOMCap, CVPR 2026): move each text embedding dimension-wise
  onto the image statistics, ``e' = (e - mu_T) * sigma_I / sigma_T + mu_I``
  (``"mean_std"``), or only shift the mean, ``e' = e - mu_T + mu_I`` (``"mean"``,
  CapDec's modality offset).
* **Noise** (CapDec, MacCap): ``L2norm(e + n)`` with ``n ~ N(0, variance * I)``,
  i.e. a standard deviation of ``sqrt(variance)`` per dimension; 0.016 is the
  papers' variance.

Statistics use the population (biased) standard deviation. With it, the
``mean_std`` output of a set has exactly the image set's per-dimension mean and
variance, so its mean squared norm is ``sum_d(mu_I^2 + sigma_I^2)``, the image
embeddings' mean squared norm, which is 1 for unit image embeddings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open

from capdemo.fileio import atomic_output, save_safetensors

ArrayLike = torch.Tensor | np.ndarray

SIGMA_EPS = 1e-6
"""Floor for sigma_T: a (near-)constant text dimension would otherwise divide by zero."""

GAP_STATS_FORMAT = "capdemo.gapstats/1"
_TENSOR_NAMES = ("mu_image", "sigma_image", "mu_text", "sigma_text")


class GapCorrection(str, Enum):
    """How text embeddings are moved towards the image statistics."""

    NONE = "none"  # e' = e
    MEAN = "mean"  # e' = e - mu_T + mu_I (CapDec's modality offset)
    MEAN_STD = "mean_std"  # e' = (e - mu_T) * sigma_I / sigma_T + mu_I (TOMCap)


class GapStatsError(ValueError):
    """Gap statistics that cannot be computed, loaded or applied as asked."""


def _as_float_tensor(embeds: ArrayLike, *, what: str) -> torch.Tensor:
    """``embeds`` as a float32 CPU tensor of shape (N, D), N >= 1."""
    tensor = torch.as_tensor(embeds).detach().to("cpu", torch.float32)
    if tensor.ndim != 2 or tensor.shape[0] == 0:
        raise GapStatsError(f"{what} must be a non-empty (N, D) matrix, got shape {tuple(tensor.shape)}")
    if not torch.isfinite(tensor).all():
        raise GapStatsError(f"{what} contain NaN or infinite values")
    return tensor


@dataclass(frozen=True)
class GapStats:
    """Per-dimension mean and population std of image and of text embeddings (each (D,) float32)."""

    mu_image: torch.Tensor  # (D,)
    sigma_image: torch.Tensor  # (D,)
    mu_text: torch.Tensor  # (D,)
    sigma_text: torch.Tensor  # (D,)
    n_image: int  # how many image embeddings the image statistics summarise
    n_text: int  # how many text embeddings the text statistics summarise
    encoder_name: str = ""  # the embedding space they describe ("": unknown, a file from before it was recorded)

    @property
    def dim(self) -> int:
        return int(self.mu_image.shape[0])

    @classmethod
    def compute(cls, image_embeds: ArrayLike, text_embeds: ArrayLike, *, encoder_name: str = "") -> GapStats:
        """Statistics of an (unpaired) image set (N_I, D) and text set (N_T, D) from the encoder ``encoder_name``."""
        images = _as_float_tensor(image_embeds, what="image embeddings")
        texts = _as_float_tensor(text_embeds, what="text embeddings")
        if images.shape[1] != texts.shape[1]:
            raise GapStatsError(f"image embeddings are {images.shape[1]}-d but text embeddings are {texts.shape[1]}-d")
        sigma_image, mu_image = torch.std_mean(images, dim=0, correction=0)  # (D,), (D,)
        sigma_text, mu_text = torch.std_mean(texts, dim=0, correction=0)  # (D,), (D,)
        return cls(mu_image, sigma_image, mu_text, sigma_text, n_image=images.shape[0], n_text=texts.shape[0],
                   encoder_name=encoder_name)

    def require_encoder(self, encoder_name: str) -> None:
        """Refuse statistics of another embedding space (two CLIPs of one width are not interchangeable)."""
        if self.encoder_name and self.encoder_name != encoder_name:
            raise GapStatsError(f"the gap statistics describe {self.encoder_name}'s embeddings, not {encoder_name}'s;"
                                " compute them with the same encoder (`python -m training gapstats`)")

    def correct(
        self, embeds: torch.Tensor, mode: GapCorrection | str, *, renormalize: bool = False
    ) -> torch.Tensor:
        """Text embeddings (..., D) moved towards the image statistics; same shape, dtype and device.

        ``renormalize`` defaults to False because the paper's equation output is
        what TOMCap feeds, and for ``mean_std`` it already has the image set's
        mean squared norm (see the module docstring); projecting back onto the
        sphere would pull the per-dimension statistics away from the image ones
        it has just matched. Set it for ``mean``, whose root-mean-square output
        norm becomes ``sqrt(1 - |mu_T|^2 + |mu_I|^2)`` for unit inputs, when a
        consumer expects unit vectors (CapDec re-normalises after its offset).
        ``gap_report`` prints the corrected norms of a real set.
        """
        mode = GapCorrection(mode)
        if embeds.shape[-1] != self.dim:
            raise GapStatsError(f"embeddings are {embeds.shape[-1]}-d but the gap statistics are {self.dim}-d")
        moments = {name: getattr(self, name).to(embeds.device) for name in _TENSOR_NAMES}  # each (D,)
        values = embeds.float()
        if mode is GapCorrection.MEAN:
            values = values - moments["mu_text"] + moments["mu_image"]
        elif mode is GapCorrection.MEAN_STD:
            scale = moments["sigma_image"] / moments["sigma_text"].clamp_min(SIGMA_EPS)  # (D,)
            values = (values - moments["mu_text"]) * scale + moments["mu_image"]
        if renormalize:
            values = F.normalize(values, dim=-1)
        return values.to(embeds.dtype)

    def save(self, path: str | Path) -> None:
        """Write one safetensors file (the four vectors; counts in its metadata), atomically."""
        tensors = {name: getattr(self, name).detach().to("cpu", torch.float32).contiguous() for name in _TENSOR_NAMES}
        metadata = {"format": GAP_STATS_FORMAT, "n_image": str(self.n_image), "n_text": str(self.n_text)}
        if self.encoder_name:
            metadata["encoder_name"] = self.encoder_name
        with atomic_output(path) as tmp:
            save_safetensors(tensors, tmp, metadata)

    @classmethod
    def load(cls, path: str | Path) -> GapStats:
        path = Path(path)
        if not path.is_file():
            raise GapStatsError(f"{path}: no gap statistics file here (make one with `python -m training gapstats`)")
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            missing = [name for name in _TENSOR_NAMES if name not in handle.keys()]
            if metadata.get("format") != GAP_STATS_FORMAT or missing:
                raise GapStatsError(f"{path}: not a {GAP_STATS_FORMAT} file (format {metadata.get('format')!r})")
            tensors = {name: handle.get_tensor(name).float() for name in _TENSOR_NAMES}
        shapes = {tuple(t.shape) for t in tensors.values()}
        if len(shapes) != 1 or len(next(iter(shapes))) != 1:
            raise GapStatsError(f"{path}: the four statistics must be (D,) vectors of one size, got {sorted(shapes)}")
        return cls(**tensors, n_image=int(metadata["n_image"]), n_text=int(metadata["n_text"]),
                   encoder_name=metadata.get("encoder_name", ""))


# --------------------------------------------------------------------------------------------
# Noise (CapDec / MacCap)


def sample_noise(like: torch.Tensor, variance: float, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Gaussian noise shaped like ``like`` with per-dimension variance ``variance`` (std sqrt(variance))."""
    if not variance >= 0 or math.isinf(variance):
        raise ValueError(f"noise variance must be a finite number >= 0, got {variance}")
    device = generator.device if generator is not None else like.device
    noise = torch.randn(like.shape, generator=generator, device=device, dtype=torch.float32)
    return (noise * math.sqrt(variance)).to(like.device, like.dtype)


def gap_noise(embeds: torch.Tensor, std: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """``e + n`` with ``n_d ~ N(0, std_d^2)`` per dimension, for embeddings (..., D) and ``std`` (D,): noise in
    units of a modality's spread (TOMCap: ``std = scale x sigma_I``), not re-normalised, so a mean+std-corrected
    set keeps its mean and gains exactly the variance ``std^2`` per dimension."""
    if std.shape != embeds.shape[-1:]:
        raise GapStatsError(f"noise std is {tuple(std.shape)} but the embeddings are {embeds.shape[-1]}-d")
    device = generator.device if generator is not None else embeds.device
    noise = torch.randn(embeds.shape, generator=generator, device=device, dtype=torch.float32)
    return embeds + (noise.to(embeds.device) * std.to(embeds.device)).to(embeds.dtype)


def inject_noise(embeds: torch.Tensor, variance: float, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """``L2norm(e + n)``, ``n ~ N(0, variance * I)``, for embeddings of any leading shape (..., D).

    ``variance=0`` only normalises. The embeddings are expected to be (about)
    unit vectors, as in both papers; they are not normalised first.
    """
    return F.normalize(embeds + sample_noise(embeds, variance, generator=generator), dim=-1)


# --------------------------------------------------------------------------------------------
# Measuring the gap


def paired_differences(image_embeds: ArrayLike, text_embeds: ArrayLike) -> np.ndarray:
    """Dimension-wise differences image - text of paired embeddings (row i of each is a pair): (N, D)."""
    images = _as_float_tensor(image_embeds, what="image embeddings")
    texts = _as_float_tensor(text_embeds, what="text embeddings")
    if images.shape != texts.shape:
        raise GapStatsError(
            f"paired embeddings need equal shapes, got images {tuple(images.shape)} and texts {tuple(texts.shape)}"
        )
    return (images - texts).numpy()


@dataclass(frozen=True)
class GapHistogram:
    """Histogram of all dimension-wise paired differences pooled together (MacCap, Fig. 1)."""

    counts: np.ndarray  # (bins,) int64
    edges: np.ndarray  # (bins + 1,) float64 bin edges
    mean: float  # mean of the pooled differences
    std: float  # population std of the pooled differences


def gap_histogram(image_embeds: ArrayLike, text_embeds: ArrayLike, *, bins: int = 100) -> GapHistogram:
    """Pool the (N, D) paired differences into one histogram over ``bins`` equal-width bins."""
    differences = paired_differences(image_embeds, text_embeds).ravel()  # (N * D,)
    counts, edges = np.histogram(differences, bins=bins)
    return GapHistogram(counts=counts, edges=edges, mean=float(differences.mean()), std=float(differences.std()))


def linear_probe_accuracy(
    image_embeds: ArrayLike,
    text_embeds: ArrayLike,
    *,
    test_fraction: float = 0.3,
    max_per_modality: int = 5000,
    seed: int = 0,
) -> float:
    """Held-out accuracy of a logistic regression telling image from text embeddings.

    Both classes are subsampled (seeded) to the same size, so chance is 0.5 and
    1.0 means the modalities are linearly separable.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    images = _as_float_tensor(image_embeds, what="image embeddings").numpy()
    texts = _as_float_tensor(text_embeds, what="text embeddings").numpy()
    per_class = min(len(images), len(texts), max_per_modality)
    if per_class < 4:
        raise GapStatsError(f"a linear probe needs at least 4 embeddings per modality, got {per_class}")
    rng = np.random.default_rng(seed)
    images = images[rng.choice(len(images), per_class, replace=False)]
    texts = texts[rng.choice(len(texts), per_class, replace=False)]
    features = np.concatenate([images, texts])  # (2P, D)
    labels = np.concatenate([np.ones(per_class), np.zeros(per_class)])  # 1 = image
    x_train, x_test, y_train, y_test = train_test_split(
        features, labels, test_size=test_fraction, random_state=seed, stratify=labels
    )
    probe = LogisticRegression(max_iter=1000)
    probe.fit(x_train, y_train)
    return float(probe.score(x_test, y_test))


def gap_report(
    image_embeds: ArrayLike, text_embeds: ArrayLike, *, paired: bool = False, seed: int = 0
) -> dict[str, Any]:
    """How far apart the two modalities are, as plain JSON-ready values.

    Keys: ``n_image``, ``n_text``, ``mean_distance`` (``|mu_I - mu_T|``),
    ``std_ratio`` (min/median/max of ``sigma_I / sigma_T`` over dimensions) and
    ``std_ratio_per_dim`` (the D ratios), ``probe_accuracy`` (see
    :func:`linear_probe_accuracy`), ``probe_accuracy_corrected`` (the same
    probe after each correction, with statistics fitted on these very sets, so
    an in-sample upper bound on what the correction can do) and
    ``corrected_text_norm`` (mean and std of the text norms after each
    correction, without renormalising). With
    ``paired=True`` (row i of each set is a pair) also ``paired_cosine`` (mean
    cosine of pairs) and ``unpaired_cosine`` (mean cosine of each image with the
    next row's text).
    """
    images = _as_float_tensor(image_embeds, what="image embeddings")
    texts = _as_float_tensor(text_embeds, what="text embeddings")
    stats = GapStats.compute(images, texts)
    ratio = (stats.sigma_image / stats.sigma_text.clamp_min(SIGMA_EPS)).numpy()  # (D,)
    corrected = {mode: stats.correct(texts, mode) for mode in (GapCorrection.MEAN, GapCorrection.MEAN_STD)}
    report: dict[str, Any] = {
        "n_image": stats.n_image,
        "n_text": stats.n_text,
        "mean_distance": float((stats.mu_image - stats.mu_text).norm()),
        "std_ratio": {"min": float(ratio.min()), "median": float(np.median(ratio)), "max": float(ratio.max())},
        "std_ratio_per_dim": ratio.tolist(),
        "probe_accuracy": linear_probe_accuracy(images, texts, seed=seed),
        "probe_accuracy_corrected": {
            mode.value: linear_probe_accuracy(images, moved, seed=seed) for mode, moved in corrected.items()
        },
        "corrected_text_norm": {
            mode.value: {"mean": float(moved.norm(dim=-1).mean()), "std": float(moved.norm(dim=-1).std())}
            for mode, moved in corrected.items()
        },
    }
    if paired:
        if images.shape != texts.shape or len(images) < 2:
            raise GapStatsError(
                f"paired=True needs two equal (N >= 2, D) sets, got {tuple(images.shape)} and {tuple(texts.shape)}"
            )
        unit_images, unit_texts = F.normalize(images, dim=-1), F.normalize(texts, dim=-1)
        report["paired_cosine"] = float((unit_images * unit_texts).sum(-1).mean())
        report["unpaired_cosine"] = float((unit_images * unit_texts.roll(1, dims=0)).sum(-1).mean())
    return report


__all__ = [
    "GapCorrection",
    "GapHistogram",
    "GapStats",
    "GapStatsError",
    "gap_histogram",
    "gap_noise",
    "gap_report",
    "inject_noise",
    "linear_probe_accuracy",
    "paired_differences",
    "sample_noise",
]
