"""How CLIP-like a CLIP is: the modality-gap numbers shapes-eval reports, on held-out image-caption pairs.

``gap_metrics`` gives the five numbers of shapes-eval's ``"gap"`` entry, each comparable to what the
literature reports for OpenAI's ViT-B/32 on COCO:

- ``paired_cosine_mean``: mean cosine of an image and its caption (ViT-B/32: about 0.3);
- ``modality_probe_accuracy``: held-out accuracy of a linear probe telling image from text embeddings
  (real CLIP: 1.0, Liang et al. 2022);
- ``mean_gap_norm``: ``||mu_I - mu_T||`` of the two modalities' mean embeddings (ViT-B/32: about 0.82);
- ``i2t_r1``: image-to-text recall@1 among the pairs' captions, a hit when the retrieved caption describes the
  image's scene (paraphrases and repeated scenes are right answers);
- ``subregion_closer_fraction``: MacCap's own statistic (paper Table 1: 33 % on COCO), the fraction of images
  for which at least one of the N_cr subregion features I_s is closer to the caption than the global feature.

``selection_on_objects`` says where MacCap's N_cr patches land, which the app's heatmap shows: the fraction of
them on the caption's objects, against the fraction of all patches that are (what a random pick would get).

``correction_geometry`` says what TOMCap's gap correction does to held-out captions: how near each correction puts a
caption to its own image, and whether the corrected caption nearest to an image still describes that image's scene.
"""

from __future__ import annotations

from typing import Any
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from capdemo.encoders import ImageFeatures
from capdemo.gap import GapCorrection, GapStats, linear_probe_accuracy
from capdemo.methods.maccap.model import select_patches

GAP_KEYS = ("paired_cosine_mean", "modality_probe_accuracy", "mean_gap_norm", "subregion_closer_fraction", "i2t_r1")


def subregion_features(features: ImageFeatures, token_index: torch.Tensor) -> torch.Tensor:
    """I_s (B, N_cr, D), L2-normalised: each picked token's attention row pooling all normalised tokens (eq. 12).

    The same pooling as :func:`capdemo.methods.maccap.model.aggregate_regions` with ``normalise_parts`` (the
    shipped setting), before I_c is added.
    """
    attention = features.attention.mean(dim=1)  # (B, T, T) head-averaged
    rows = attention.gather(1, token_index.unsqueeze(-1).expand(-1, -1, attention.shape[-1]))  # (B, N_cr, T)
    return F.normalize(torch.bmm(rows, F.normalize(features.token_embeds, dim=-1)), dim=-1)


def subregion_closer(features: ImageFeatures, caption_embeds: torch.Tensor, n_cr: int, *,
                     include_cls: bool = False) -> torch.Tensor:
    """(B,) bool: some selected subregion I_s is closer (cosine) to the image's caption (B, D) than I_c is."""
    token_index, _ = select_patches(features, n_cr, include_cls=include_cls)  # (B, N_cr)
    captions = F.normalize(caption_embeds.float(), dim=-1)  # (B, D)
    subregions = subregion_features(features, token_index)  # (B, N_cr, D)
    region_cosine = torch.einsum("bnd,bd->bn", subregions.float(), captions)  # (B, N_cr)
    global_cosine = (F.normalize(features.global_embeds.float(), dim=-1) * captions).sum(-1)  # (B,)
    return region_cosine.max(dim=1).values > global_cosine


ON_OBJECT_COVER = 0.25  # a patch is "on an object" when the caption's objects cover at least this much of it


def patches_on_objects(coverage: torch.Tensor, grid_size: tuple[int, int], *,
                       min_cover: float = ON_OBJECT_COVER) -> torch.Tensor:
    """(B, N_p) bool, row-major like the patch tokens: which patches of a grid the objects cover ``min_cover`` of.

    ``coverage`` (B, S, S) is each pixel's object coverage in [0, 1] (:func:`training.shapes.world.
    render_with_coverage`); S must be a multiple of the grid.
    """
    batch, side, _ = coverage.shape
    rows, cols = grid_size
    if side % rows or side % cols:
        raise ValueError(f"an image of {side} px does not divide into a {rows}x{cols} patch grid")
    cells = coverage.reshape(batch, rows, side // rows, cols, side // cols).mean(dim=(2, 4))  # (B, rows, cols)
    return cells.reshape(batch, rows * cols) >= min_cover


def selection_on_objects(features: ImageFeatures, coverage: torch.Tensor, n_cr: int, *,
                         include_cls: bool = False) -> dict[str, float]:
    """Where MacCap's ``n_cr`` selected tokens lie: ``selected_patches_on_objects``, the fraction of them that are
    patches on an object (a selected CLS token is not); ``selection_on_objects_ceiling``, the most any selection
    of ``n_cr`` could score (an image with fewer object patches than ``n_cr`` caps it); and
    ``patches_on_objects``, the fraction of all patches on an object (a random selection's expected score).
    ``coverage`` (B, S, S) as for :func:`patches_on_objects`."""
    token_index, _ = select_patches(features, n_cr, include_cls=include_cls)  # (B, N_cr)
    on_object = patches_on_objects(coverage, features.grid_size)  # (B, N_p)
    patch_index = token_index - features.num_prefix_tokens  # (B, N_cr); negative for a prefix token
    hit = on_object.gather(1, patch_index.clamp(min=0)) & (patch_index >= 0)  # (B, N_cr)
    ceiling = on_object.sum(dim=1).clamp(max=n_cr) / n_cr  # (B,)
    return {"selected_patches_on_objects": hit.float().mean().item(),
            "selection_on_objects_ceiling": ceiling.mean().item(),
            "patches_on_objects": on_object.float().mean().item()}


def recall_at_1(image_embeds: torch.Tensor, text_embeds: torch.Tensor, scene_ids: Sequence[int]) -> float:
    """Image-to-text R@1: the nearest text (cosine) of each image describes the image's scene."""
    ids = torch.as_tensor(list(scene_ids))  # (N,)
    nearest = (F.normalize(image_embeds.float(), dim=-1) @ F.normalize(text_embeds.float(), dim=-1).T).argmax(1)
    return (ids[nearest] == ids).float().mean().item()


def gap_metrics(features: ImageFeatures, text_embeds: torch.Tensor, scene_ids: Sequence[int], *, n_cr: int,
                include_cls: bool = False) -> dict[str, Any]:
    """The five gap numbers (:data:`GAP_KEYS`) of N held-out pairs: image features and caption embeddings (N, D).

    ``scene_ids`` identify each pair's scene, so retrieval counts any caption of the right scene as a hit;
    ``n_cr`` is MacCap's patch count (the bundle's).
    """
    images = F.normalize(features.image_embeds.float(), dim=-1)  # (N, D)
    texts = F.normalize(text_embeds.float(), dim=-1)  # (N, D)
    closer = subregion_closer(features, texts, n_cr, include_cls=include_cls)
    return {
        "paired_cosine_mean": (images * texts).sum(-1).mean().item(),
        "modality_probe_accuracy": linear_probe_accuracy(images, texts),
        "mean_gap_norm": (images.mean(0) - texts.mean(0)).norm().item(),
        "subregion_closer_fraction": closer.float().mean().item(),
        "i2t_r1": recall_at_1(images, texts, scene_ids),
        "n": int(images.shape[0]),
    }


def correction_geometry(image_embeds: torch.Tensor, text_embeds: torch.Tensor, scene_ids: Sequence[int],
                        stats: GapStats) -> dict[str, dict[str, float]]:
    """For each gap correction (none, mean, mean+std), N held-out captions (N, D) corrected with ``stats`` against
    their N images (N, D): the mean cosine and distance of a corrected caption to its own image, and the fraction of
    images whose nearest corrected caption describes their scene (``scene_ids``, as in :func:`recall_at_1`).

    A decoder trained on corrected captions reads an image as the corrected captions near it, so the last number
    is what the correction leaves of retrieval in the decoder's input space. Nearest is by distance, not cosine:
    the paper's correction leaves its output off the unit sphere, and the decoder reads it unnormalised.
    """
    images = F.normalize(image_embeds.float(), dim=-1)  # (N, D)
    texts = F.normalize(text_embeds.float(), dim=-1)  # (N, D)
    ids = torch.as_tensor(list(scene_ids))  # (N,)
    report = {}
    for mode in GapCorrection:
        corrected = stats.correct(texts, mode)  # (N, D)
        distances = torch.cdist(images, corrected)  # (N images, N captions)
        report[mode.value] = {
            "paired_cosine": F.cosine_similarity(images, corrected, dim=-1).mean().item(),
            "paired_distance": distances.diagonal().mean().item(),
            "nearest_caption_same_scene": (ids[distances.argmin(1)] == ids).float().mean().item(),
        }
    return report
