"""The numbers behind the app's analysis views: what sits where in CLIP space, and how far apart the modalities are.

Pure functions over arrays and :class:`~capdemo.result.Result` objects; the facade gathers their
inputs and :mod:`capdemo.figures` draws their outputs.

* :func:`embedding_view` — the groups of embeddings the embedding-space plot shows (the image, its
  patches, each method's region features, candidates and neighbours, a corpus sample and its
  gap-corrected copy) with a hover text per point, MacCap's Table 1 for this image, the gap norm
  and std ratios, and the per-dimension differences of MacCap's Figure 1.
* :func:`pca_project` / :func:`umap_project` — 2-D projections of embeddings (PCA by default; UMAP
  on request, since its first call JIT-compiles for ~10-30 s).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F

from capdemo.features import ImageFeatures
from capdemo.result import Result

# What each kind of per-method point is called in the plot's legend ("MacCap candidates", ...).
METHOD_KIND_LABELS = {"region": "{label} region features I_cr", "candidates": "{label} candidates",
                      "neighbours": "{label} retrieved neighbours"}


@dataclass(frozen=True)
class PointGroup:
    """One trace of the embedding plot: points of one kind, from the image side, a method or the corpus."""

    kind: str  # "image", "patches", "region", "candidates", "neighbours", "corpus", "corpus corrected"
    label: str  # legend text
    vectors: np.ndarray  # (n, D) L2-normalised embeddings
    hover: list[str]  # one text per point
    method: str | None = None  # the method whose result the points come from (None: the image or the corpus)


@dataclass
class EmbeddingView:
    """Everything the embedding-space plot, the gap histogram and the gap table show for one image."""

    groups: list[PointGroup]
    table: dict[str, float] = field(default_factory=dict)  # Table-1 cosines, gap norm, std-ratio summary
    differences: dict[str, np.ndarray] = field(default_factory=dict)  # legend -> per-dimension differences


def embedding_view(features: ImageFeatures, results: Mapping[str, Result], labels: Mapping[str, str], *,
                   corpus: tuple[list[str], torch.Tensor] = ([], torch.zeros(0)), gap_stats=None) -> EmbeddingView:
    """The view of image 0 of ``features`` with the ``results`` of the methods (``labels``: name -> display name),
    a ``corpus`` sample (texts, (n, D) embeddings) and the bundle's gap statistics (or None)."""
    rows, cols = features.grid_size
    groups = [
        PointGroup("image", "global image embedding", features.image_embeds[:1].float().cpu().numpy(),
                   ["global image embedding"]),
        PointGroup("patches", "image patches", F.normalize(features.patch_embeds[0].float(), dim=-1).cpu().numpy(),
                   [f"patch {i} (row {i // cols}, col {i % cols})" for i in range(rows * cols)]),
    ]
    for name, result in results.items():
        hover = {"candidates": [f"{c.text} (CLIP {c.clip_score:.3f})" for c in result.candidates],
                 "neighbours": [f"{n.text} (sim {n.score:.3f})" for n in result.neighbours],
                 "region": [f"region {rank}: patch ({p.row}, {p.col})" for rank, p in enumerate(result.patches, 1)]}
        for kind, template in METHOD_KIND_LABELS.items():
            vectors = result.embeddings.get(kind)
            if vectors is not None and vectors.numel():
                groups.append(PointGroup(kind, template.format(label=labels[name]), vectors.float().numpy(),
                                         hover[kind], method=name))
    texts, embeds = corpus
    table: dict[str, float] = {}
    if len(texts):
        groups.append(PointGroup("corpus", "caption corpus (sample)", embeds.float().numpy(), list(texts)))
    if gap_stats is not None:
        if len(texts):
            corrected = F.normalize(gap_stats.correct(embeds.float(), "mean_std"), dim=-1).numpy()
            groups.append(PointGroup("corpus corrected", "corpus, gap-corrected towards images (TOMCap)", corrected,
                                     [f"corrected: {text}" for text in texts]))
        ratio = (gap_stats.sigma_image / gap_stats.sigma_text.clamp_min(1e-8)).numpy()
        table.update({"gap norm ||mu_I - mu_T||": float((gap_stats.mu_image - gap_stats.mu_text).norm()),
                      "std ratio min": float(ratio.min()), "std ratio median": float(np.median(ratio)),
                      "std ratio max": float(ratio.max())})
    table.update(table_one(features, results, labels))
    return EmbeddingView(groups=groups, table=table, differences=gap_differences(groups, gap_stats))


def table_one(features: ImageFeatures, results: Mapping[str, Result], labels: Mapping[str, str]) -> dict[str, float]:
    """MacCap's Table 1 for this image: cosine of each method's best caption with the global image embedding
    and, for methods with region features, with the subregion mixes I_cr."""
    table = {}
    image = features.image_embeds[0].float().cpu()
    for name, result in results.items():
        candidates = result.embeddings.get("candidates")
        if candidates is None or not candidates.numel():
            continue
        caption = candidates[0]  # (D,) the best candidate's text embedding
        table[f"{labels[name]}: cos(caption, global image)"] = float(image @ caption)
        regions = result.embeddings.get("region")
        if regions is not None and regions.numel():
            region_cos = regions @ caption  # (N_cr,)
            table[f"{labels[name]}: cos(caption, region mix) mean"] = float(region_cos.mean())
            table[f"{labels[name]}: cos(caption, region mix) max"] = float(region_cos.max())
    return table


def gap_differences(groups: list[PointGroup], gap_stats=None) -> dict[str, np.ndarray]:
    """Per-dimension differences for the gap histogram (MacCap Fig. 1, text - image as in the paper): the first
    method's best caption minus the global image and minus each region mix, and the bundle's mean gap."""
    by_kind = {}
    for group in groups:
        by_kind.setdefault(group.kind, group)
    differences = {}
    if "candidates" in by_kind:
        best = by_kind["candidates"].vectors[0]
        differences["best caption - global image"] = best - by_kind["image"].vectors[0]
        if "region" in by_kind:
            differences["best caption - region mixes"] = (best - by_kind["region"].vectors).ravel()
    if gap_stats is not None:
        differences["bundle mean gap mu_text - mu_image"] = (gap_stats.mu_text - gap_stats.mu_image).numpy()
    return differences



@dataclass(frozen=True)
class Projection:
    """2-D coordinates of n points and what the two axes are."""

    coords: np.ndarray  # (n, 2)
    axis_titles: tuple[str, str]


def pca_project(points: np.ndarray) -> Projection:
    """Project (n, D) points onto their first two principal components (numpy SVD).

    Each axis's sign is fixed so that its largest-magnitude loading is
    positive, so the same points always give the same picture. An axis beyond
    the data's rank comes out as zeros.
    """
    data = np.asarray(points, dtype=np.float64)
    if data.ndim != 2 or data.shape[0] == 0:
        raise ValueError(f"PCA needs a non-empty (n, D) matrix, got shape {data.shape}")
    centred = data - data.mean(axis=0)
    _, singular, components = np.linalg.svd(centred, full_matrices=False)  # components (r, D)
    kept = components[:2]  # (r', D), r' <= 2
    strongest = np.argmax(np.abs(kept), axis=1)
    signs = np.sign(kept[np.arange(len(kept)), strongest])
    signs[signs == 0] = 1.0
    coords = np.zeros((data.shape[0], 2))
    coords[:, : len(kept)] = centred @ (kept * signs[:, None]).T  # (n, r')
    variance = singular**2
    share = variance / variance.sum() if variance.sum() > 0 else np.zeros_like(variance)
    first, second = (f"PC{i + 1} ({share[i]:.0%} of variance)" if i < len(share) else f"PC{i + 1}" for i in range(2))
    return Projection(coords=coords, axis_titles=(first, second))


UMAP_MIN_POINTS = 5
UMAP_MAX_NEIGHBOURS = 15


def umap_project(points: np.ndarray, *, seed: int = 0) -> Projection:
    """Project (n, D) points to 2-D with UMAP (cosine metric, fixed seed).

    umap-learn is imported here, not at module load: importing it and its
    first fit JIT-compile numba code, about 10-30 s once per process.
    """
    data = np.asarray(points, dtype=np.float64)
    if data.ndim != 2 or data.shape[0] < UMAP_MIN_POINTS:
        raise ValueError(f"UMAP needs at least {UMAP_MIN_POINTS} points, got shape {data.shape}")
    import umap

    reducer = umap.UMAP(
        n_components=2,
        n_neighbors=min(UMAP_MAX_NEIGHBOURS, data.shape[0] - 1),
        metric="cosine",
        init="random",
        random_state=seed,
        n_jobs=1,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "n_jobs overridden by random_state" and small-graph notices
        coords = reducer.fit_transform(data)
    return Projection(coords=np.asarray(coords, dtype=np.float64), axis_titles=("UMAP 1", "UMAP 2"))


PROJECTIONS = {"pca": pca_project, "umap": umap_project}


