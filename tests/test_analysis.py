"""capdemo.analysis: the embedding view's groups, MacCap's Table 1 and the gap differences, on hand-made results."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from capdemo.analysis import embedding_view, table_one
from capdemo.features import ImageFeatures
from capdemo.gap import GapStats
from capdemo.result import Candidate, Neighbour, Patch, Result


def features(dim: int = 4) -> ImageFeatures:
    """One image on a 2x2 grid with a hand-set global embedding e_0."""
    tokens = torch.zeros(1, 5, dim)
    tokens[0, 0, 0] = 1.0  # CLS = e_0
    tokens[0, 1:, 1] = 1.0  # every patch = e_1
    attention = torch.full((1, 1, 5, 5), 0.2)
    return ImageFeatures(image_embeds=F.normalize(tokens[:, 0], dim=-1), token_embeds=tokens, attention=attention,
                         grid_size=(2, 2))


def result_with(method: str, caption: torch.Tensor, *, regions: torch.Tensor | None = None,
                neighbours: int = 0) -> Result:
    embeddings = {"candidates": caption.unsqueeze(0)}
    if regions is not None:
        embeddings["region"] = regions
    if neighbours:
        embeddings["neighbours"] = torch.eye(4)[:neighbours]
    return Result(caption="c", method=method, candidates=[Candidate("a red circle", 0.3)],
                  patches=[Patch(index=3, row=1, col=1, attention=0.4)] if regions is not None else [],
                  neighbours=[Neighbour(f"n{i}", 0.5) for i in range(neighbours)], embeddings=embeddings)


def test_table_one_is_each_best_captions_cosine_with_the_global_image_and_the_region_mixes():
    caption = F.normalize(torch.tensor([1.0, 1.0, 0.0, 0.0]), dim=0)  # 45 degrees from e_0
    regions = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])  # cosines 0.707 and 0
    table = table_one(features(), {"m": result_with("m", caption, regions=regions)}, {"m": "M"})
    assert table["M: cos(caption, global image)"] == pytest.approx(2 ** -0.5)
    assert table["M: cos(caption, region mix) max"] == pytest.approx(2 ** -0.5)
    assert table["M: cos(caption, region mix) mean"] == pytest.approx(2 ** -0.5 / 2)


def test_embedding_view_groups_each_methods_points_with_hover_texts_and_text_minus_image_differences():
    caption = torch.tensor([0.0, 0.0, 1.0, 0.0])
    results = {"a": result_with("a", caption, regions=torch.eye(4)[:1]), "b": result_with("b", caption, neighbours=2)}
    stats = GapStats(mu_image=torch.tensor([0.5, 0, 0, 0]), sigma_image=torch.ones(4),
                     mu_text=torch.tensor([0, 0.5, 0, 0]), sigma_text=torch.full((4,), 2.0), n_image=3, n_text=3)
    corpus = (["x", "y"], F.normalize(torch.randn(2, 4), dim=-1))
    view = embedding_view(features(), results, {"a": "A", "b": "B"}, corpus=corpus, gap_stats=stats)
    kinds = [(g.kind, g.method, len(g.vectors), len(g.hover)) for g in view.groups]
    assert kinds == [("image", None, 1, 1), ("patches", None, 4, 4), ("region", "a", 1, 1),
                     ("candidates", "a", 1, 1), ("candidates", "b", 1, 1), ("neighbours", "b", 2, 2),
                     ("corpus", None, 2, 2), ("corpus corrected", None, 2, 2)]
    assert view.groups[1].hover[3] == "patch 3 (row 1, col 1)"
    assert np.allclose(view.differences["best caption - global image"], [-1, 0, 1, 0])  # text - image (paper)
    assert np.allclose(view.differences["bundle mean gap mu_text - mu_image"], [-0.5, 0.5, 0, 0])
    assert view.table["gap norm ||mu_I - mu_T||"] == pytest.approx(2 ** -0.5)
    assert view.table["std ratio median"] == pytest.approx(0.5)
