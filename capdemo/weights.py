"""One resolver for every weight source the project reads.

A *source spec* is one of
- a local file or folder path (``weights/shapes``, ``/models/clip.safetensors``),
- a Hugging Face repo ``hf-hub:org/name`` with an optional pinned revision
  ``hf-hub:org/name@<commit-or-tag>``,
- ``None``: no weights (a randomly initialised model, for tests and benchmarks).

Hub sources are fetched through ``huggingface_hub`` into its cache; without a
network (or with ``HF_HUB_OFFLINE=1``) a cached copy is used, and a missing one
raises :class:`WeightsUnavailableError` whose one-line message names the model
and how to provide it locally. Only safetensors are ever loaded from a source:
pickle-based formats are refused here, before any loader can unpickle them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

HUB_PREFIX = "hf-hub:"
WEIGHTS_ENV = "CAPDEMO_WEIGHTS"  # environment variable naming the bundle to serve when none is given
DEFAULT_BUNDLE = "shapes"  # the bundle that ships with capdemo: weights/shapes in the repository
_PACKAGE_DIR = Path(__file__).resolve().parent
# Where the default bundle is looked for, in order: the repository checkout this code runs from (also an
# editable install), then the copy a wheel installs (pyproject.toml maps weights/ to capdemo/bundled_weights/).
_DEFAULT_BUNDLE_DIRS = (_PACKAGE_DIR.parent / "weights" / DEFAULT_BUNDLE,
                        _PACKAGE_DIR / "bundled_weights" / DEFAULT_BUNDLE)
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt", ".npy", ".npz")
# pickle protocols 2-5, and zip (torch.save's container)
_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")
_DEFAULT_HUB_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.model")


class WeightsUnavailableError(RuntimeError):
    """A weight source that cannot be read here (not cached and no network, or missing file)."""


class UnsafeWeightsError(ValueError):
    """A weight file in a format that could execute code when loaded (pickle)."""


@dataclass(frozen=True)
class WeightSource:
    """A parsed source spec: a local path or a hub repo at a revision."""

    location: str  # local path, or the hub repo id "org/name"
    revision: str | None = None  # pinned hub revision (commit sha or tag); None = the repo's default branch
    on_hub: bool = False

    @classmethod
    def parse(cls, spec: str | os.PathLike) -> WeightSource:
        text = str(spec).strip()
        if not text.startswith(HUB_PREFIX):
            return cls(location=text)
        repo, _, revision = text[len(HUB_PREFIX):].partition("@")
        repo = repo.strip("/")
        if repo.count("/") != 1 or not all(repo.split("/")):
            raise ValueError(f"bad hub id {text!r}: expected hf-hub:org/name or hf-hub:org/name@revision")
        return cls(location=repo, revision=revision or None, on_hub=True)

    def __str__(self) -> str:
        if not self.on_hub:
            return self.location
        return f"{HUB_PREFIX}{self.location}" + (f"@{self.revision}" if self.revision else "")


def default_bundle() -> str:
    """The bundle to serve when none is named: ``$CAPDEMO_WEIGHTS``, else the shipped ``weights/shapes``.

    The shipped bundle is found in the repository checkout (running from it, or an editable install) and
    else in the installed package (``pip install .`` copies it there). Raises WeightsUnavailableError, whose
    one line names both fixes, when there is neither.
    """
    from capdemo.bundle import MANIFEST  # here: capdemo.bundle imports this module

    if spec := os.environ.get(WEIGHTS_ENV, "").strip():
        return spec
    for folder in _DEFAULT_BUNDLE_DIRS:
        if (folder / MANIFEST).is_file():
            return str(folder)
    raise WeightsUnavailableError(
        f"no bundle to serve: the shipped weights/{DEFAULT_BUNDLE} is neither in a capdemo checkout nor in the "
        f"installed package; pass --weights DIR|hf-hub:org/name@revision or set {WEIGHTS_ENV}")


def check_not_pickle(path: Path) -> None:
    """Refuse a file that is (or looks like) a pickle, by suffix and by magic bytes."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UnsafeWeightsError(f"{path}: refusing a pickle-based weight file; convert it to .safetensors")
    if path.suffix.lower() == ".safetensors":
        return  # parsed by safetensors' own header reader, which never executes code
    with open(path, "rb") as handle:
        head = handle.read(4)
    if any(head.startswith(magic) for magic in _PICKLE_MAGIC):
        raise UnsafeWeightsError(f"{path}: file content is a pickle/zip archive, not safetensors; refusing to load")


def resolve(
    spec: str | os.PathLike,
    *,
    what: str = "weights",
    filename: str | None = None,
    patterns: tuple[str, ...] = _DEFAULT_HUB_PATTERNS,
) -> Path:
    """Return a local path for ``spec``: the file/folder itself, or the hub snapshot folder.

    ``filename`` narrows a hub download to one file (and returns that file's path);
    ``patterns`` are the file globs a whole-repo download fetches (never pickles by default).
    ``what`` names the model in error messages ("CLIP encoder", "language model" ...).
    """
    source = WeightSource.parse(spec)
    if not source.on_hub:
        path = Path(source.location).expanduser()
        if not path.exists():
            raise WeightsUnavailableError(f"{what}: local path {path} does not exist")
        return path
    return _hub_download(source, what=what, filename=filename, patterns=patterns)


def _hub_download(source: WeightSource, *, what: str, filename: str | None, patterns: tuple[str, ...]) -> Path:
    from huggingface_hub import hf_hub_download, snapshot_download

    if source.revision is None:
        log.warning("%s %s has no pinned revision; pin one (hf-hub:%s@<commit>) for reproducible weights",
                    what, source, source.location)
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    kwargs = dict(repo_id=source.location, revision=source.revision, local_files_only=offline)
    try:
        if filename is not None:
            return Path(hf_hub_download(filename=filename, **kwargs))
        return Path(snapshot_download(allow_patterns=list(patterns), **kwargs))
    except Exception as err:  # huggingface_hub raises several unrelated types for "not reachable / not cached"
        reason = type(err).__name__
        raise WeightsUnavailableError(
            f"{what} {source} is not in the local Hugging Face cache and the hub is unreachable ({reason}); "
            f"on a machine with internet run `hf download {source.location}"
            + (f" --revision {source.revision}" if source.revision else "")
            + "` and copy the cache (HF_HOME), or pass a local folder instead"
        ) from None
