"""Cached example outputs are kept only for the bundle and capdemo version that made them."""

from __future__ import annotations

import json

import pytest

from capdemo import __version__, ui
from capdemo.pipeline import Captioner
from capdemo.ui.examples_cache import STAMP, claim_examples_cache, source_key


def test_a_cache_folder_made_by_another_source_is_emptied_and_one_made_by_this_source_is_kept(tmp_path):
    folder = tmp_path / "cached_examples" / "12"
    assert claim_examples_cache(folder, "a") is False  # nothing there yet: only the stamp is written
    assert json.loads((folder / STAMP).read_text()) == {"key": "a"}
    (folder / "log.csv").write_text("caption\nthe old bundle's caption\n")  # what Gradio caches on a click
    assert claim_examples_cache(folder, "a") is False  # same source: the cached outputs stay
    assert (folder / "log.csv").read_text().endswith("the old bundle's caption\n")
    assert claim_examples_cache(folder, "b") is True  # new weights or code: the old outputs go
    assert sorted(p.name for p in folder.iterdir()) == [STAMP]
    assert json.loads((folder / STAMP).read_text()) == {"key": "b"}


@pytest.mark.parametrize("stamp", [None, "not json", '{"other": 1}', "[]"])
def test_an_unstamped_or_unreadable_cache_folder_counts_as_stale(tmp_path, stamp):
    folder = tmp_path / "7"
    folder.mkdir()
    (folder / "log.csv").write_text("caption\nmade before stamps existed\n")
    if stamp is not None:
        (folder / STAMP).write_text(stamp)
    assert claim_examples_cache(folder, "k") is True
    assert sorted(p.name for p in folder.iterdir()) == [STAMP]


def test_the_key_changes_with_the_weights_the_methods_the_precision_and_the_version():
    info = {"components": {"maccap": {"samples": 20}}, "file_entries": {"maccap/model.safetensors": {"sha256": "aa"}},
            "methods": ["maccap", "tomcap"], "precision": "fp32", "device": "cpu", "path": "/somewhere"}
    key = source_key(info, "0.1.0")
    assert key == source_key({**info, "path": "/elsewhere", "device": "cuda"}, "0.1.0")  # neither changes outputs
    assert key != source_key({**info, "file_entries": {"maccap/model.safetensors": {"sha256": "bb"}}}, "0.1.0")
    assert key != source_key({**info, "components": {"maccap": {"samples": 1}}}, "0.1.0")
    assert key != source_key({**info, "methods": ["maccap"]}, "0.1.0")
    assert key != source_key({**info, "precision": "bf16"}, "0.1.0")
    assert key != source_key(info, "0.2.0")


def test_the_page_stamps_its_examples_cache_with_its_bundle(tiny_bundle_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_EXAMPLES_CACHE", str(tmp_path / "cache"))  # where Gradio puts example outputs
    captioner = Captioner.from_bundle(tiny_bundle_dir, device="cpu")
    assert captioner.examples()  # the tiny bundle ships examples, so the page has an Examples block
    ui.create_blocks(captioner)
    (stamp,) = (tmp_path / "cache").glob(f"*/{STAMP}")
    assert json.loads(stamp.read_text())["key"] == source_key(captioner.info(), __version__)


def test_the_test_session_keeps_gradios_examples_cache_out_of_the_checkout():
    from pathlib import Path

    import gradio.utils

    checkout = Path(__file__).resolve().parents[1]
    cache = gradio.utils.get_cache_folder().resolve()
    assert not cache.is_relative_to(checkout), f"tests would write example outputs into {cache}"
