"""Readers for the caption data files the toolkit trains and evaluates on.

Three families of files, all optionally gzip-compressed (detected from the
content, not the name):

* Karpathy splits, in either of two layouts read by one function
  (``load_karpathy_split``):

  - Karpathy's original ``dataset_coco.json`` / ``dataset_flickr30k.json``: one
    object ``{"images": [{"filename", "filepath", "split", "sentences":
    [{"raw", "tokens"}], "cocoid" | "imgid"}], "dataset"}`` holding every split
    (train / restval / val / test);
  - the MAGIC / MacCap lists: a JSON list of ``{"split", "image_name",
    "captions": [...]}`` (``mscoco_test.json``, ``flickr30k_val.json``, ...).

* COCO caption annotation files (``{"images": [...], "annotations": [...]}``),
  the references format of the official COCO evaluation code.
* Plain caption corpora for text-only training: one caption per line, or a JSON
  list of strings.

Every reader turns a malformed file into one ``DataFormatError`` line that
names the file and the record or line at fault, so a bad download is a clear
message rather than a ``KeyError`` deep inside training.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ImageId = int | str
"""COCO-style numeric id where the file name carries one, else the file stem."""

MACCAP_MAX_CAPTION_WORDS = 15
"""The MacCap paper (§5.1, "following previous works") drops training captions longer than this many words."""

SPLIT_SEPARATOR = "+"  # joins split names on the command line: "train+restval"

_GZIP_MAGIC = b"\x1f\x8b"
_COCO_FILE_STEM = re.compile(r"COCO_[A-Za-z]+\d{4}_(\d+)")  # COCO_val2014_000000391895


class DataFormatError(ValueError):
    """A data file that cannot be read as the format it should be in."""


@dataclass(frozen=True)
class SplitImage:
    """One image of a Karpathy split file and its reference captions."""

    image_name: str  # file name as written in the split, e.g. "COCO_val2014_000000391895.jpg"
    image_id: ImageId  # see image_id_from_name: 391895 for the name above
    captions: tuple[str, ...]  # human captions, whitespace-stripped, file order
    split: str  # "train" | "val" | "test" | "restval" ... as written in the file ("" when absent)
    folder: str = ""  # sub-folder the image file sits in, as written ("val2014"; "" when the file names none)


# --------------------------------------------------------------------------------------------
# Ids and low-level readers


def image_id_from_name(name: str) -> ImageId:
    """The image id a file name or path stands for.

    ``COCO_val2014_000000391895.jpg`` and ``000000391895.jpg`` (COCO 2017) give
    ``391895``; a numeric stem such as Flickr30k's ``1007129816.jpg`` gives that
    number; any other name gives its stem, so the id is stable across runs and
    the same whichever file (predictions or references) it comes from.
    """
    stem = Path(name.strip()).stem
    if match := _COCO_FILE_STEM.fullmatch(stem):
        return int(match.group(1))
    if stem.isdigit():
        return int(stem)
    if not stem:
        raise DataFormatError(f"cannot derive an image id from the empty name {name!r}")
    return stem


def normalise_image_id(value: Any, *, where: str) -> ImageId:
    """An ``image_id`` field read from JSON: ints stay, strings go through ``image_id_from_name``."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        return image_id_from_name(value)
    raise DataFormatError(f"{where}: image id must be an int or a string, got {type(value).__name__}")


def read_text(path: str | Path) -> str:
    """A text file's content as UTF-8, gunzipped when it is gzip data."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataFormatError(f"{path}: cannot read ({err.strerror or err})") from None
    if raw.startswith(_GZIP_MAGIC):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise DataFormatError(f"{path}: broken gzip data ({err})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataFormatError(f"{path}:{line}: not UTF-8 text (byte {err.start})") from None


def read_json(path: str | Path) -> Any:
    """A JSON document (optionally gzipped); syntax errors name the line and column."""
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataFormatError(f"{path}:{err.lineno}:{err.colno}: invalid JSON ({err.msg})") from None


def read_json_records(path: str | Path, *, list_key: str | None = None) -> list[tuple[str, dict[str, Any]]]:
    """Objects from a JSON list, a JSON object, or a JSON-lines file, each with where it came from.

    A document that parses as a whole is a list of records, a single record,
    or (with ``list_key``) an object whose ``list_key`` field is the list, as
    in VQA's ``{"annotations": [...]}``; anything else is read as JSON lines
    (one object per non-blank line), the format CLIs stream. Returns
    ``(location, record)`` pairs, the location (``"path:line"`` or
    ``"path item i"``) being what error messages name.
    """
    text = read_text(path)
    try:
        document = json.loads(text)
    except json.JSONDecodeError as err:
        if text.lstrip().startswith("["):  # a broken JSON list, not JSON lines
            raise DataFormatError(f"{path}:{err.lineno}:{err.colno}: invalid JSON ({err.msg})") from None
        located = _json_lines(text, path)
    else:
        if isinstance(document, dict) and list_key is not None and isinstance(document.get(list_key), list):
            document = document[list_key]
        if isinstance(document, list):
            located = [(f"{path} item {i}", item) for i, item in enumerate(document)]
        else:  # one object: a one-line JSON-lines file, or a single pretty-printed record
            blank_lines_before = text[: len(text) - len(text.lstrip())].count("\n")
            located = [(f"{path}:{blank_lines_before + 1}", document)]
    for where, item in located:
        if not isinstance(item, dict):
            raise DataFormatError(f"{where}: expected a JSON object, got {type(item).__name__}")
    return located


def _json_lines(text: str, path: str | Path) -> list[tuple[str, Any]]:
    located = []
    for lineno, line in enumerate(text.split("\n"), start=1):  # not splitlines: JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            located.append((f"{path}:{lineno}", json.loads(line)))
        except json.JSONDecodeError as err:
            raise DataFormatError(f"{path}:{lineno}: invalid JSON line ({err.msg})") from None
    return located


def _string_list(value: Any, *, where: str, field: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DataFormatError(f"{where}: {field!r} must be a list of strings")
    return value


# --------------------------------------------------------------------------------------------
# Karpathy splits (Karpathy's original files and the MAGIC / MacCap lists)


def load_karpathy_split(path: str | Path) -> list[SplitImage]:
    """Images of a Karpathy split file, in file order: Karpathy's original object or a MAGIC-format list."""
    data = read_json(path)
    if isinstance(data, dict) and "annotations" in data:
        raise DataFormatError(f"{path}: a COCO annotation file (references only), not a Karpathy split file")
    if isinstance(data, dict) and isinstance(data.get("images"), list):
        return _original_split_images(data["images"], path)
    return _split_images(data, path)


def _split_images(data: Any, path: str | Path) -> list[SplitImage]:
    if not isinstance(data, list):
        raise DataFormatError(
            f"{path}: expected a Karpathy split: a JSON list of {{image_name, captions}} records or Karpathy's "
            f"{{\"images\": [...]}} object, got {type(data).__name__}"
        )
    images = []
    for i, record in enumerate(data):
        where = f"{path} item {i}"
        if not isinstance(record, dict) or not isinstance(record.get("image_name"), str):
            raise DataFormatError(f"{where}: expected an object with a string 'image_name'")
        captions = _string_list(record.get("captions"), where=where, field="captions")
        images.append(
            SplitImage(
                image_name=record["image_name"],
                image_id=image_id_from_name(record["image_name"]),
                captions=tuple(c.strip() for c in captions),
                split=str(record.get("split", "")),
                folder=str(record.get("file_path", "")),
            )
        )
    return images


def _original_split_images(records: list[Any], path: str | Path) -> list[SplitImage]:
    """Karpathy's ``images`` records: the caption is each sentence's ``raw`` text (``tokens`` is his
    lower-cased, punctuation-free tokenisation; the metric code tokenises the raw text itself)."""
    images = []
    for i, record in enumerate(records):
        where = f"{path} image {i}"
        if not isinstance(record, dict) or not isinstance(record.get("filename"), str):
            raise DataFormatError(f"{where}: expected an object with a string 'filename'")
        sentences = record.get("sentences")
        if not isinstance(sentences, list) or not all(
            isinstance(s, dict) and isinstance(s.get("raw"), str) for s in sentences
        ):
            raise DataFormatError(f"{where}: 'sentences' must be a list of objects with a string 'raw'")
        image_id = image_id_from_name(record["filename"])
        cocoid = record.get("cocoid")
        if isinstance(cocoid, int) and isinstance(image_id, int) and cocoid != image_id:
            raise DataFormatError(f"{where}: cocoid {cocoid} does not match the file name {record['filename']!r}")
        images.append(
            SplitImage(
                image_name=record["filename"],
                image_id=image_id,
                captions=tuple(s["raw"].strip() for s in sentences),
                split=str(record.get("split", "")),
                folder=str(record.get("filepath", "")),
            )
        )
    return images


def parse_split_names(text: str) -> tuple[str, ...]:
    """``"train+restval"`` -> ``("train", "restval")``; an empty name is an error."""
    names = tuple(name.strip() for name in text.split(SPLIT_SEPARATOR))
    if not all(names):
        raise ValueError(f"split names must be joined by {SPLIT_SEPARATOR!r} without empty parts, got {text!r}")
    return names


def select_splits(items: Sequence[SplitImage], names: Sequence[str] | None, *, source: str = "the file"
                  ) -> list[SplitImage]:
    """The images of ``items`` whose split is one of ``names`` (``None``: every image), in file order.

    A name that no image carries is an error listing the splits present, so a
    typo ("tset") is never an empty or partial selection.
    """
    if names is None:
        return list(items)
    present = {item.split for item in items}
    unknown = [name for name in names if name not in present]
    if unknown:
        raise DataFormatError(f"no image of split {unknown[0]!r} in {source} (splits present: {sorted(present)})")
    wanted = set(names)
    return [item for item in items if item.split in wanted]


def references_from_split(items: Iterable[SplitImage]) -> dict[ImageId, list[str]]:
    """``{image_id: captions}`` for the evaluation code; a repeated image id is an error."""
    references: dict[ImageId, list[str]] = {}
    for item in items:
        if item.image_id in references:
            raise DataFormatError(f"image id {item.image_id!r} ({item.image_name}) appears twice in the split")
        references[item.image_id] = list(item.captions)
    return references


def captions_from_split(items: Iterable[SplitImage]) -> list[str]:
    """Every caption of the split, image by image: a text corpus (unfiltered, with repeats)."""
    return [caption for item in items for caption in item.captions]


# --------------------------------------------------------------------------------------------
# COCO annotation files and reference dispatch


def load_coco_references(path: str | Path) -> dict[ImageId, list[str]]:
    """``{image_id: captions}`` from a COCO caption annotation file, in annotation order.

    Captions are kept verbatim: the PTB tokenizer of the metric code does the
    normalising, exactly as in the official evaluation.
    """
    return _coco_references(read_json(path), path)


def _coco_references(data: Any, path: str | Path) -> dict[ImageId, list[str]]:
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise DataFormatError(f"{path}: expected a COCO annotation object with an 'annotations' list")
    references: dict[ImageId, list[str]] = {}
    for i, annotation in enumerate(data["annotations"]):
        where = f"{path} annotation {i}"
        if not isinstance(annotation, dict) or "image_id" not in annotation:
            raise DataFormatError(f"{where}: expected an object with 'image_id' and 'caption'")
        if not isinstance(annotation.get("caption"), str):
            raise DataFormatError(f"{where}: 'caption' must be a string")
        image_id = normalise_image_id(annotation["image_id"], where=where)
        references.setdefault(image_id, []).append(annotation["caption"])
    return references


def load_references(path: str | Path) -> dict[ImageId, list[str]]:
    """Reference captions from a COCO annotation file or a Karpathy split file of either layout (every split
    it holds; either file gzipped)."""
    data = read_json(path)
    if isinstance(data, dict) and "annotations" in data:
        return _coco_references(data, path)
    if isinstance(data, dict) and isinstance(data.get("images"), list):
        return references_from_split(_original_split_images(data["images"], path))
    if isinstance(data, list):
        return references_from_split(_split_images(data, path))
    raise DataFormatError(f"{path}: not a COCO annotation object nor a Karpathy split file")


# --------------------------------------------------------------------------------------------
# Caption corpora for text-only training


def load_caption_corpus(
    path: str | Path,
    *,
    splits: Sequence[str] | None = None,
    max_words: int | None = MACCAP_MAX_CAPTION_WORDS,
    dedupe: bool = False,
) -> list[str]:
    """Training captions from a caption file or from chosen splits of a Karpathy split file.

    A caption file is plain text (one caption per line) or, for ``*.json`` /
    ``*.json.gz``, a JSON list of strings. A Karpathy split file (either
    layout, see ``load_karpathy_split``) gives the captions of the images in
    ``splits`` (e.g. ``("train", "restval")``), image by image; ``splits`` is
    required for it (a split file also holds the test captions) and refused
    for a caption file. Each caption has its whitespace collapsed; empty ones
    and ones longer than ``max_words`` words (``None``: no limit) are dropped.
    Repeats are kept, as the MacCap paper trains on every sentence, unless
    ``dedupe``, which keeps the first of each.
    """
    if max_words is not None and max_words < 1:
        raise ValueError(f"max_words must be a positive number of words or None, got {max_words}")
    path = Path(path)
    is_json = path.name.removesuffix(".gz").endswith(".json")
    data = read_json(path) if is_json else None
    if _is_split_document(data):
        if splits is None:
            present = sorted({item.split for item in load_karpathy_split(path)})
            raise DataFormatError(f"{path} is a Karpathy split file: name the splits to train on with "
                                  f"--corpus-split (e.g. train+restval; splits present: {present})")
        raw_captions = captions_from_split(select_splits(load_karpathy_split(path), splits, source=str(path)))
    elif splits is not None:
        raise DataFormatError(f"{path} is a caption list, not a Karpathy split file; drop --corpus-split")
    else:
        raw_captions = _json_caption_list(data, path) if is_json else _text_caption_lines(path)
    corpus = []
    for raw in raw_captions:
        words = raw.split()
        if words and (max_words is None or len(words) <= max_words):
            corpus.append(" ".join(words))
    return list(dict.fromkeys(corpus)) if dedupe else corpus


def _is_split_document(data: Any) -> bool:
    """A parsed JSON document that is a Karpathy split (original object or MAGIC record list)."""
    if isinstance(data, dict):
        return isinstance(data.get("images"), list) and "annotations" not in data
    return isinstance(data, list) and bool(data) and isinstance(data[0], dict) and "image_name" in data[0]


def _json_caption_list(data: Any, path: Path) -> list[str]:
    if not isinstance(data, list):
        raise DataFormatError(f"{path}: expected a JSON list of caption strings or a Karpathy split file, "
                              f"got {type(data).__name__}")
    for i, item in enumerate(data):
        if not isinstance(item, str):
            raise DataFormatError(f"{path} item {i}: expected a caption string, got {type(item).__name__}")
    return data


def _text_caption_lines(path: Path) -> list[str]:
    lines = read_text(path).split("\n")
    for lineno, line in enumerate(lines, start=1):
        if "\x00" in line:
            raise DataFormatError(f"{path}:{lineno}: NUL byte in a caption line (binary file?)")
    return lines
