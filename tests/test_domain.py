"""capdemo.domain: the manifest's domain field, the far-below warning, and measuring a bundle's in-domain range."""

from __future__ import annotations

import numpy as np
import pytest

from capdemo.domain import BEST, Domain, ScoreRange, measure_domain, score_range
from capdemo.pipeline import Captioner

RANGES = {"maccap": ScoreRange(p05=0.76, median=0.86, n=100), BEST: ScoreRange(p05=0.84, median=0.86, n=100)}


def test_the_manifest_field_round_trips_and_an_old_bundle_has_none():
    domain = Domain(summary="shapes only", scores=RANGES)
    assert Domain.from_manifest({"domain": domain.to_dict()}) == domain
    assert Domain.from_manifest({"name": "old"}) is None


def test_far_below_is_as_far_under_the_5th_percentile_as_it_lies_under_the_median():
    domain = Domain(summary="shapes only", scores=RANGES)
    floor = RANGES[BEST].floor
    assert floor == pytest.approx(0.82)
    assert domain.warning({"maccap": 0.70, "tomcap": floor + 0.001}) == ""  # the best over methods counts
    warning = domain.warning({"maccap": 0.70, "tomcap": floor - 0.001})
    assert warning.startswith("This image looks outside the bundle's domain: its best caption scores CLIP 0.82")
    assert "0.84-0.86" in warning and warning.endswith("shapes only") and "\n" not in warning
    assert domain.warning({"maccap": 0.65}) != "" and domain.warning({"maccap": 0.67}) == ""  # its own floor, 0.66
    assert domain.warning({"capdec": 0.1}) == "" and domain.warning({}) == ""  # nothing measured: no claim


def test_score_range_is_the_5th_percentile_and_the_median():
    values = np.linspace(0.0, 1.0, 101)
    assert score_range(values) == ScoreRange(p05=0.05, median=0.5, n=101)
    with pytest.raises(ValueError, match="no scores"):
        score_range([])


def test_measure_domain_records_every_method_and_the_best_over_them(tiny_bundle_dir):
    captioner = Captioner.from_bundle(tiny_bundle_dir, device="cpu")
    images = [str(path) for path in captioner.examples()] * 3
    domain = measure_domain(captioner, images, "tiny test world")
    assert set(domain.scores) == {*captioner.methods, BEST} and domain.summary == "tiny test world"
    per_method = {name: [r.candidates[0].clip_score for r in captioner.caption(images, name)]
                  for name in captioner.methods}
    for name, scores in per_method.items():
        assert domain.scores[name] == score_range(scores)
    assert domain.scores[BEST] == score_range(np.max(list(per_method.values()), axis=0))
