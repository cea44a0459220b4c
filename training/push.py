"""``capdemo-train push --weights DIR --repo org/name``: publish a verified bundle, with its model card, on the Hub.

The bundle is verified first (every file against its sha256 in ``bundle.json``, no pickle anywhere in the
folder); a bundle that fails is refused before anything reaches the Hub. Then its model card is generated
(:mod:`training.model_card`) and written beside ``bundle.json`` as README.md, and exactly the bundle's files
(``bundle.json``, every file it lists, README.md) are uploaded in one ``upload_folder`` call; anything else in
the folder stays local, and files in the Hub repository that are not part of this bundle are deleted from it
(``.gitattributes`` is always kept), so the repository holds one bundle and nothing stale.

Authentication is huggingface_hub's: ``hf auth login`` or ``HF_TOKEN``. The printed commit id is what to pin:
``python app.py --weights hf-hub:org/name@<commit>``.
"""

from __future__ import annotations

import argparse
import glob
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capdemo.bundle import MANIFEST, Bundle, BundleError
from capdemo.weights import WeightSource
from training.model_card import CARD_FILE, write_model_card

REPO_TYPE = "model"
ALL_FILES = "*"  # delete_patterns: every remote file the commit does not upload (huggingface_hub keeps .gitattributes)


@dataclass(frozen=True)
class PushResult:
    """Where a bundle went."""

    repo_id: str  # org/name
    revision: str | None  # the branch written to; None = the repository's default branch
    commit: str  # the commit id to pin: hf-hub:<repo_id>@<commit>
    url: str  # the commit's page on the Hub
    files: tuple[str, ...]  # bundle-relative paths uploaded, sorted

    @property
    def weights_spec(self) -> str:
        return str(WeightSource(location=self.repo_id, revision=self.commit, on_hub=True))


def bundle_files(bundle: Bundle) -> list[str]:
    """What publishing ``bundle`` uploads: its manifest, every file the manifest lists, and the model card."""
    return sorted({MANIFEST, CARD_FILE, *bundle.manifest.get("files", {})})


def push_bundle(weights: str | Path, repo_id: str, *, api: Any, private: bool = False, revision: str | None = None,
                commit_message: str | None = None, license: str | None = None,
                datasets: tuple[str, ...] = ()) -> PushResult:
    """Verify the bundle at ``weights``, write its model card, and upload it to ``repo_id`` through ``api``.

    ``api`` is a ``huggingface_hub.HfApi`` (or anything with its ``create_repo``, ``create_branch`` and
    ``upload_folder``). ``private`` applies when the repository is created; ``revision`` is a branch, created
    from the default branch when missing. Raises BundleError (nothing uploaded) for a bundle that fails
    verification, ValueError for a malformed repo id or a hub source as ``weights``.
    """
    source = WeightSource.parse(weights)
    if source.on_hub:
        raise ValueError(f"{weights}: push publishes a local bundle folder, not a hub source")
    WeightSource.parse(f"hf-hub:{repo_id}")  # one-line ValueError for anything but org/name
    bundle = Bundle.load(source.location, verify=True)
    write_model_card(bundle, repo_id=repo_id, license=license, datasets=datasets)
    bundle.verify()  # the card is plain text, but nothing reaches the Hub unchecked
    files = bundle_files(bundle)
    api.create_repo(repo_id, repo_type=REPO_TYPE, private=private, exist_ok=True)
    if revision is not None:
        api.create_branch(repo_id, branch=revision, repo_type=REPO_TYPE, exist_ok=True)
    info = api.upload_folder(
        repo_id=repo_id, repo_type=REPO_TYPE, folder_path=str(bundle.path), revision=revision,
        commit_message=commit_message or f"capdemo bundle {bundle.name}: {', '.join(bundle.components)}",
        allow_patterns=[glob.escape(rel) for rel in files], delete_patterns=ALL_FILES)
    return PushResult(repo_id=repo_id, revision=revision, commit=info.oid, url=info.commit_url, files=tuple(files))


def main(argv: list[str] | None = None, *, api: Any = None) -> int:
    """The CLI; ``api`` replaces ``huggingface_hub.HfApi()`` (the tests hand in a recording fake)."""
    parser = argparse.ArgumentParser(prog="capdemo-train push", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--weights", required=True, help="bundle folder to publish")
    parser.add_argument("--repo", required=True, help="Hub model repository, org/name (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--revision", default=None, help="branch to commit to (created if missing; default: main)")
    parser.add_argument("--commit-message", default=None, help="commit message (default: names the bundle)")
    parser.add_argument("--license", default=None, help="license id for the card's metadata, e.g. apache-2.0")
    parser.add_argument("--dataset", action="append", default=[], metavar="ID",
                        help="Hub dataset id the bundle was trained on, for the card (repeatable)")
    args = parser.parse_args(argv)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    try:
        result = push_bundle(args.weights, args.repo, api=api, private=args.private, revision=args.revision,
                             commit_message=args.commit_message, license=args.license, datasets=tuple(args.dataset))
    except BundleError as err:
        print(f"error: refusing to publish: {err}", file=sys.stderr)
        return 2
    print(f"pushed {len(result.files)} files to {result.repo_id} ({result.revision or 'default branch'}), "
          f"commit {result.commit}: {result.url}")
    print(f"serve it: python app.py --weights {result.weights_spec}")
    return 0
