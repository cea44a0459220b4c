"""Gap statistics: the TOMCap correction equation, CapDec/MacCap noise, the linear probe, the report, files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from capdemo.gap import (
    GapCorrection,
    GapStats,
    GapStatsError,
    gap_histogram,
    gap_report,
    inject_noise,
    linear_probe_accuracy,
    sample_noise,
)

NOISE_VARIANCE = 0.016  # the variance CapDec, ViECap and MacCap train with


def _cloud(n: int, dim: int, *, centre: float, scale: float, seed: int) -> torch.Tensor:
    """Unit vectors around the point (centre, 0, ..., 0) + Gaussian jitter of std ``scale``."""
    generator = torch.Generator().manual_seed(seed)
    points = scale * torch.randn(n, dim, generator=generator)
    points[:, 0] += centre
    return F.normalize(points, dim=-1)


@pytest.fixture(scope="module")
def clouds() -> tuple[torch.Tensor, torch.Tensor]:
    """Images and texts as two different unit-vector clouds, as CLIP's modalities are."""
    images = _cloud(400, 12, centre=1.0, scale=0.3, seed=0)
    texts = _cloud(300, 12, centre=-0.5, scale=0.6, seed=1)
    return images, texts


def test_mean_std_correction_on_a_hand_computed_example():
    images = torch.tensor([[0.0, 1.0], [2.0, 3.0]])  # mu_I = (1, 2), sigma_I = (1, 1)
    texts = torch.tensor([[0.0, 0.0], [4.0, 2.0]])  # mu_T = (2, 1), sigma_T = (2, 1)
    stats = GapStats.compute(images, texts)
    torch.testing.assert_close(stats.mu_image, torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(stats.sigma_text, torch.tensor([2.0, 1.0]))
    # (e - mu_T) * sigma_I / sigma_T + mu_I, by hand: (0,0) -> (0,1), (4,2) -> (2,3), (2,5) -> (1,6)
    corrected = stats.correct(torch.tensor([[0.0, 0.0], [4.0, 2.0], [2.0, 5.0]]), "mean_std")
    torch.testing.assert_close(corrected, torch.tensor([[0.0, 1.0], [2.0, 3.0], [1.0, 6.0]]))
    shifted = stats.correct(torch.tensor([[2.0, 5.0]]), GapCorrection.MEAN)  # e - mu_T + mu_I
    torch.testing.assert_close(shifted, torch.tensor([[1.0, 6.0]]))


def test_mean_std_correction_matches_the_image_moments(clouds):
    images, texts = clouds
    stats = GapStats.compute(images, texts)
    corrected = stats.correct(texts, "mean_std")
    sigma, mu = torch.std_mean(corrected, dim=0, correction=0)
    torch.testing.assert_close(mu, stats.mu_image, atol=1e-5, rtol=0)
    torch.testing.assert_close(sigma, stats.sigma_image, atol=1e-5, rtol=0)
    # so the corrected set has the image set's mean squared norm: 1 for unit image embeddings
    assert corrected.pow(2).sum(-1).mean().item() == pytest.approx(1.0, abs=1e-5)


def test_mean_correction_moves_only_the_mean(clouds):
    images, texts = clouds
    stats = GapStats.compute(images, texts)
    corrected = stats.correct(texts, "mean")
    torch.testing.assert_close(corrected.mean(0), stats.mu_image, atol=1e-6, rtol=0)
    torch.testing.assert_close(corrected - texts, (stats.mu_image - stats.mu_text).expand_as(texts), atol=1e-6, rtol=0)
    torch.testing.assert_close(corrected.std(0, correction=0), stats.sigma_text, atol=1e-6, rtol=0)


def test_correction_options_shapes_and_dtypes(clouds):
    images, texts = clouds
    stats = GapStats.compute(images, texts)
    assert torch.equal(stats.correct(texts, "none"), texts)
    unit = stats.correct(texts, "mean", renormalize=True)
    torch.testing.assert_close(unit.norm(dim=-1), torch.ones(len(texts)))
    batched = stats.correct(texts[:6].reshape(2, 3, -1).half(), "mean_std")  # any leading shape, dtype kept
    assert batched.shape == (2, 3, 12) and batched.dtype == torch.float16
    torch.testing.assert_close(batched.float().reshape(6, -1), stats.correct(texts[:6], "mean_std"), atol=2e-3, rtol=0)
    with pytest.raises(GapStatsError, match="12-d"):
        stats.correct(torch.zeros(2, 5), "mean")
    with pytest.raises(ValueError):
        stats.correct(texts, "median")


def test_constant_text_dimension_does_not_divide_by_zero():
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    texts = torch.tensor([[0.5, 0.2], [0.5, 0.4]])  # dimension 0 is constant: sigma_T = 0
    corrected = GapStats.compute(images, texts).correct(texts, "mean_std")
    assert torch.isfinite(corrected).all()
    torch.testing.assert_close(corrected[:, 0], torch.tensor([0.5, 0.5]))  # lands on mu_I


def test_compute_rejects_bad_input():
    with pytest.raises(GapStatsError, match="8-d"):
        GapStats.compute(torch.zeros(3, 8), torch.zeros(3, 4))
    with pytest.raises(GapStatsError, match="non-empty"):
        GapStats.compute(torch.zeros(0, 4), torch.zeros(3, 4))
    with pytest.raises(GapStatsError, match="NaN"):
        GapStats.compute(torch.full((2, 4), float("nan")), torch.zeros(3, 4))


def test_noise_has_the_requested_per_dimension_variance():
    embedding = F.normalize(torch.arange(1.0, 17.0), dim=0)  # (16,)
    draws = embedding.expand(40_000, 16)
    perturbed = draws + sample_noise(draws, NOISE_VARIANCE, generator=torch.Generator().manual_seed(0))
    variance = perturbed.var(dim=0)  # (16,), before normalisation
    torch.testing.assert_close(variance, torch.full((16,), NOISE_VARIANCE), atol=0.05 * NOISE_VARIANCE, rtol=0)
    torch.testing.assert_close(perturbed.mean(0), embedding, atol=0.005, rtol=0)


def test_inject_noise_normalises_any_shape_and_is_reproducible():
    embeds = F.normalize(torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1)), dim=-1)
    noisy = inject_noise(embeds, NOISE_VARIANCE, generator=torch.Generator().manual_seed(7))
    assert noisy.shape == embeds.shape
    torch.testing.assert_close(noisy.norm(dim=-1), torch.ones(3, 5))
    again = inject_noise(embeds, NOISE_VARIANCE, generator=torch.Generator().manual_seed(7))
    assert torch.equal(noisy, again)
    other = inject_noise(embeds, NOISE_VARIANCE, generator=torch.Generator().manual_seed(8))
    assert not torch.allclose(noisy, other)
    # it is exactly L2norm(e + n) for the noise the same generator state draws
    noise = sample_noise(embeds, NOISE_VARIANCE, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(noisy, F.normalize(embeds + noise, dim=-1))
    torch.testing.assert_close(inject_noise(2 * embeds, 0.0), embeds)
    with pytest.raises(ValueError, match="variance"):
        inject_noise(embeds, -0.1)


def test_linear_probe_separates_clouds_and_not_identical_distributions():
    left, right = _cloud(600, 16, centre=3, scale=0.3, seed=0), _cloud(600, 16, centre=-3, scale=0.3, seed=1)
    assert linear_probe_accuracy(left, right) >= 0.99
    first, second = _cloud(1000, 16, centre=1, scale=1, seed=2), _cloud(1000, 16, centre=1, scale=1, seed=3)
    assert abs(linear_probe_accuracy(first, second) - 0.5) < 0.08


def test_gap_report_values(clouds):
    images, texts = clouds
    report = gap_report(images, texts)
    stats = GapStats.compute(images, texts)
    assert report["n_image"] == 400 and report["n_text"] == 300
    assert report["mean_distance"] == pytest.approx(float((stats.mu_image - stats.mu_text).norm()), rel=1e-6)
    ratios = np.array(report["std_ratio_per_dim"])
    np.testing.assert_allclose(ratios, (stats.sigma_image / stats.sigma_text).numpy(), rtol=1e-6)
    assert report["std_ratio"]["min"] == pytest.approx(ratios.min())
    assert report["std_ratio"]["median"] == pytest.approx(float(np.median(ratios)))
    assert report["probe_accuracy"] > 0.95  # the clouds sit apart
    assert report["probe_accuracy_corrected"]["mean_std"] < report["probe_accuracy"] - 0.2  # the correction helps
    assert "paired_cosine" not in report
    norms = stats.correct(texts, "mean_std").norm(dim=-1)
    assert report["corrected_text_norm"]["mean_std"]["mean"] == pytest.approx(float(norms.mean()), rel=1e-5)
    assert abs(report["corrected_text_norm"]["mean_std"]["mean"] - 1) < 0.1  # near the unit sphere without renorm


def test_gap_report_paired_cosines():
    texts = _cloud(50, 8, centre=0.0, scale=1.0, seed=4)
    images = F.normalize(texts + 0.05 * torch.randn(50, 8, generator=torch.Generator().manual_seed(5)), dim=-1)
    report = gap_report(images, texts, paired=True)
    expected_paired = float((images * texts).sum(-1).mean())
    expected_unpaired = float((images * texts.roll(1, dims=0)).sum(-1).mean())
    assert report["paired_cosine"] == pytest.approx(expected_paired, rel=1e-5)
    assert report["unpaired_cosine"] == pytest.approx(expected_unpaired, rel=1e-5)
    assert report["paired_cosine"] > 0.95 > report["unpaired_cosine"]
    with pytest.raises(GapStatsError, match="paired"):
        gap_report(images, texts[:40], paired=True)


def test_gap_histogram_pools_paired_differences():
    images = torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5]])
    texts = torch.tensor([[0.5, 0.0, 0.5], [0.0, 0.0, 0.5]])  # differences: 0.5, 0, 0, 0, 1, 0
    histogram = gap_histogram(images, texts, bins=4)
    assert histogram.counts.tolist() == [4, 0, 1, 1]  # bins [0, .25) [.25, .5) [.5, .75) [.75, 1]
    np.testing.assert_allclose(histogram.edges, [0.0, 0.25, 0.5, 0.75, 1.0])
    assert histogram.mean == pytest.approx(0.25)
    assert histogram.std == pytest.approx(float(np.std([0.5, 0, 0, 0, 1, 0])))
    with pytest.raises(GapStatsError, match="paired"):
        gap_histogram(images, texts[:1])


def test_stats_save_load_round_trip(clouds, tmp_path):
    stats = GapStats.compute(*clouds)
    stats.save(tmp_path / "gap.safetensors")
    loaded = GapStats.load(tmp_path / "gap.safetensors")
    for name in ("mu_image", "sigma_image", "mu_text", "sigma_text"):
        assert torch.equal(getattr(loaded, name), getattr(stats, name))
        assert getattr(loaded, name).dtype == torch.float32
    assert (loaded.n_image, loaded.n_text) == (400, 300)
    assert [p.name for p in tmp_path.iterdir()] == ["gap.safetensors"]  # no temporary file left behind
    save_file({"weight": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(GapStatsError, match="not a capdemo.gapstats"):
        GapStats.load(tmp_path / "other.safetensors")
    with pytest.raises(GapStatsError, match="no gap statistics"):
        GapStats.load(tmp_path / "missing.safetensors")


def test_stats_remember_their_encoder_and_refuse_another(clouds, tmp_path):
    GapStats.compute(*clouds, encoder_name="ViT-B-16/openai").save(tmp_path / "gap.safetensors")
    loaded = GapStats.load(tmp_path / "gap.safetensors")
    assert loaded.encoder_name == "ViT-B-16/openai"
    loaded.require_encoder("ViT-B-16/openai")
    with pytest.raises(GapStatsError, match="ViT-B-16/openai's embeddings, not ViT-B-32/openai's"):
        loaded.require_encoder("ViT-B-32/openai")  # same width (512), another space
    GapStats.compute(*clouds).require_encoder("anything")  # unknown (files from before): not checked


def test_gapstats_command_end_to_end_with_a_tiny_clip(tmp_path, capsys):
    """``python -m training gapstats`` on a random tiny CLIP and generated images, offline."""
    import json

    from PIL import Image

    from capdemo.testing import TINY_CORPUS, tiny_encoder_config
    from training import gapstats

    config_file = tmp_path / "tiny.json"
    tiny_encoder_config().save_json(config_file)
    image_dir = tmp_path / "images" / "nested"
    image_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(image_dir / f"{i}.png")
    (image_dir / "notes.txt").write_text("not an image")
    (image_dir / "broken.jpg").write_bytes(b"not a jpeg")  # reported and skipped
    corpus_file = tmp_path / "corpus.txt"
    corpus_file.write_text("\n".join(TINY_CORPUS))
    out = tmp_path / "gap.safetensors"
    argv = ["--images", str(tmp_path / "images"), "--corpus", str(corpus_file), "--encoder", str(config_file)]
    assert gapstats.main([*argv, "--out", str(out), "--device", "cpu", "--batch-size", "4"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    stats = GapStats.load(out)
    assert (stats.n_image, stats.n_text, stats.dim) == (6, len(TINY_CORPUS), 32)
    assert report["n_image"] == 6 and report["encoder"] == "capdemo-tiny-test" and "std_ratio_per_dim" not in report
    assert report["mean_distance"] == pytest.approx(float((stats.mu_image - stats.mu_text).norm()), rel=1e-5)
    assert "broken.jpg" in captured.err

    listing = tmp_path / "list.txt"
    listing.write_text("# two of them\nimages/nested/0.png\nimages/nested/3.png\n")
    assert gapstats.list_images(listing) == [tmp_path / "images/nested/0.png", tmp_path / "images/nested/3.png"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        gapstats.list_images(tmp_path / "empty")
