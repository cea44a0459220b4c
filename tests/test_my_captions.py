"""Bring your own captions (capdemo.my_captions) on the tiny bundle: input checks, the session store, retrieval
from it, and the downloaded datastore that ``--datastore`` and ``python -m training index`` read."""

from __future__ import annotations

import json
import zipfile

import pytest

from capdemo import my_captions
from capdemo.my_captions import MyCaptions, StoreChoice, decode_text, parse_captions, read_input
from capdemo.pipeline import Captioner
from capdemo.retrieval import CaptionDatastore
from capdemo import ui

MINE = ["a giraffe standing in tall grass", "two zebras drinking at a river", "an elephant under a tree",
        "a lion asleep on a rock", "a flock of birds over the sea"]


@pytest.fixture(scope="module")
def captioner(tiny_bundle_dir) -> Captioner:
    return Captioner.from_bundle(tiny_bundle_dir, device="cpu")


@pytest.fixture(scope="module")
def mine(captioner) -> MyCaptions:
    return MyCaptions.build(MINE, captioner.retrieval_encoders())


def test_lines_and_json_lists_give_the_same_captions_blank_lines_dropped():
    assert parse_captions("  a red circle \n\n\t\na  blue   square\n") == ["a red circle", "a blue square"]
    assert parse_captions(json.dumps(["a red circle", " ", "a blue square"])) == ["a red circle", "a blue square"]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "looks binary"),
        (b"caf\xe9 au lait\n", "not UTF-8 text (undecodable byte at position 3)"),
        (b"", "no captions: the text is empty or blank"),
        (b" \n\t\n  \n", "no captions: the text is empty or blank"),
        (("a\n" * (my_captions.MAX_LINES + 1)).encode(), f"{my_captions.MAX_LINES + 1:,} captions; the limit is"),
        (b"x" * (my_captions.MAX_BYTES + 1), "the limit is 5 MB"),
        (b'["a", 3]', "must be a JSON list of strings"),
        (b"[not json", "starts like a JSON list but is not one"),
        (("y" * (my_captions.MAX_CAPTION_CHARS + 1)).encode(), "caption 1 is 301 characters long"),
    ],
)
def test_bad_input_is_a_one_line_message(data, message):
    with pytest.raises(ValueError) as raised:
        parse_captions(decode_text(data))
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_an_uploaded_file_wins_over_the_pasted_text(tmp_path):
    upload = tmp_path / "mine.txt"
    upload.write_text("from the file\n", encoding="utf-8")
    assert read_input("pasted", upload) == ["from the file"]
    assert read_input("pasted", None) == ["pasted"]


def test_the_store_holds_every_caption_embedded_with_the_retrieval_encoder(captioner, mine):
    (encoder,) = captioner.retrieval_encoders()
    store = mine.stores[encoder.name]
    assert len(store) == len(MINE) and store.encoder_name == encoder.name and store.kind == "flat"
    query = encoder.encode_text([MINE[2]])  # a caption's own embedding finds it first
    assert store.retrieve(query, 1)[0][0].text == MINE[2]


def test_mine_retrieves_only_my_captions_and_both_merges_by_cosine(captioner, mine):
    tomcap = captioner.methods["tomcap"]
    example = captioner.encode([str(captioner.examples()[0])])
    only_mine = captioner.caption(example, "tomcap", store=StoreChoice(mine, "mine").store_for(tomcap), k=2)[0]
    assert {n.store for n in only_mine.neighbours} == {"mine"} and {n.text for n in only_mine.neighbours} <= set(MINE)
    both = captioner.caption(example, "tomcap", store=StoreChoice(mine, "both").store_for(tomcap), k=2)[0]
    bundle = captioner.caption(example, "tomcap", k=2)[0]
    expected = sorted([*bundle.neighbours, *only_mine.neighbours], key=lambda n: -n.score)[:2]
    assert [(n.text, n.store) for n in both.neighbours] == [(n.text, n.store) for n in expected]
    assert {n.store for n in bundle.neighbours} == {"bundle"}
    assert tomcap.datastore is captioner.shared("datastore")  # the loaded method itself never changed store


def test_asking_for_my_captions_without_any_is_a_one_line_message(captioner, mine):
    app = ui.CaptionDemo(captioner)
    view = app.caption_event(str(captioner.examples()[0]), ["maccap", "tomcap"], stores=StoreChoice(None, "mine"))
    assert view.methods["tomcap"].error.startswith("TOMCap: no captions of yours yet")
    maccap = view.methods["maccap"]  # a method that does not retrieve is unaffected
    assert not maccap.error and len(maccap.candidates) == captioner.methods["maccap"].default_options().samples


def test_the_download_is_a_datastore_folder_that_training_reads(captioner, mine, tmp_path):
    from training.datasets import load_caption_corpus

    (encoder,) = captioner.retrieval_encoders()
    archive = mine.save_zip(tmp_path / "mine.zip", encoder.name)
    with zipfile.ZipFile(archive) as opened:
        opened.extractall(tmp_path / "unzipped")
    folder = tmp_path / "unzipped" / my_captions.ZIP_FOLDER
    store = CaptionDatastore.load(folder)  # what `--datastore` opens
    assert [store.captions[i] for i in range(len(store))] == MINE and store.encoder_name == encoder.name
    assert load_caption_corpus(str(folder / my_captions.CAPTIONS_FILE)) == MINE  # `training index --corpus`


def test_the_datastore_event_reports_bad_input_in_place_and_builds_a_store(captioner):
    app = ui.CaptionDemo(captioner)
    bad = app.datastore_event("   \n  ")
    assert bad.message == "⚠ no captions: the text is empty or blank" and bad.mine is None and bad.archive is None
    good = app.datastore_event("\n".join(MINE))
    assert good.message.startswith("5 captions of yours embedded") and good.archive.endswith(".zip")
    assert len(good.mine.captions) == len(MINE)
