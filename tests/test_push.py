"""Publishing a bundle: the generated model card, the evaluation record, and `capdemo-train push` against a fake Hub.

No network: the push tests hand ``training.push`` a recording stand-in for ``huggingface_hub.HfApi`` whose
``upload_folder`` picks files with huggingface_hub's own pattern filter, as the real one does.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from huggingface_hub import CommitInfo
from huggingface_hub.utils import filter_repo_objects

from capdemo.bundle import MANIFEST, Bundle, BundleError
from training import push
from training.bundle_evaluation import EVALUATION_FILE, EvaluationResult, read_evaluation, record_evaluation
from training.model_card import CARD_FILE, model_card, write_model_card

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ROOT / "weights" / "shapes"
REPO = "capdemo-org/shapes"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHfApi:
    """Records every call; ``upload_folder`` keeps the bytes of the files the real one would upload."""

    def __init__(self):
        self.calls: list[tuple[str, dict]] = []
        self.uploaded: dict[str, bytes] = {}

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        folder = Path(kwargs["folder_path"])
        local = [path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()]
        for rel in filter_repo_objects(local, allow_patterns=kwargs.get("allow_patterns"),
                                       ignore_patterns=kwargs.get("ignore_patterns")):
            self.uploaded[rel] = (folder / rel).read_bytes()
        return CommitInfo(commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/{COMMIT}",
                          commit_message=kwargs.get("commit_message") or "", commit_description="", oid=COMMIT)

    def call(self, name: str) -> dict:
        (found,) = [kwargs for called, kwargs in self.calls if called == name]
        return found


@pytest.fixture
def bundle_dir(tmp_path) -> Path:
    """A copy of the shipped shapes bundle: its manifest and the files it lists, nothing else, and no recorded
    evaluation (the card of a bundle nobody has scored yet; the shipped card's numbers are checked apart)."""
    out = tmp_path / "shapes"
    manifest = json.loads((SHAPES / MANIFEST).read_text())
    manifest["files"].pop(EVALUATION_FILE, None)
    for rel in manifest["files"]:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(SHAPES / rel, out / rel)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return out


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n", 2)[1])


RESULT = EvaluationResult(method="tomcap", task="shapes-eval", dataset="shapes world, held-out scenes",
                          split="seed 1234, 500 scenes", metrics={"scene_accuracy": 0.684, "cider": 6.16},
                          command="python -m training shapes-eval --n 500 --seed 1234", date="2026-11-23")


# ----------------------------------------------------------------------------- the model card


def test_card_metadata_and_what_the_bundle_records(bundle_dir):
    bundle = Bundle.load(bundle_dir)
    card = model_card(bundle, repo_id=REPO)
    meta = front_matter(card)
    assert meta["library_name"] == "capdemo" and meta["pipeline_tag"] == "image-to-text"
    assert {"capdemo", "maccap", "tomcap", "visual-question-answering", "shapes"} <= set(meta["tags"])
    assert "metrics" not in meta and "datasets" not in meta and "license" not in meta  # nothing recorded
    for section in ("## What is in this bundle", "## How it was trained", "## Evaluation", "## Domain",
                    "## Intended use", "## Limits", "## How to serve it"):
        assert section in card
    for component in bundle.components:
        record_path = bundle_dir / component / "training.json"
        if record_path.is_file():  # corpus size, steps and final loss, from the method's own record
            record = json.loads(record_path.read_text())
            last = record["history"][-1]
            assert (f"| `{component}` | {record['captions']} | {last['step']} | {record['train']['batch_size']} |"
                    in card)
            assert f"{last['loss']:.4f}" in card
    assert "No evaluation is recorded" in card
    assert f"python app.py --weights hf-hub:{REPO}@<commit>" in card
    assert "circle, square, triangle" in card  # the shapes world, from the build's recipe


def test_the_shipped_card_shows_every_recorded_evaluation():
    """weights/shapes ships its shapes-eval scores (evaluation.json) and a card generated from them."""
    bundle = Bundle.load(SHAPES)
    recorded = read_evaluation(bundle)
    assert {r.method for r in recorded} == set(bundle.components) - {"encoder", "vqa"}
    card = (SHAPES / CARD_FILE).read_text()
    assert front_matter(card)["metrics"]
    for result in recorded:
        assert f"| {result.method} | {result.metrics['scene_accuracy']:.4g} |" in card


def test_card_takes_license_and_datasets(bundle_dir):
    meta = front_matter(model_card(Bundle.load(bundle_dir), license="apache-2.0",
                                   datasets=["yerevann/coco-karpathy"]))
    assert meta["license"] == "apache-2.0" and meta["datasets"] == ["yerevann/coco-karpathy"]


def test_recorded_evaluation_is_verified_and_shown_on_the_card(bundle_dir):
    write_model_card(Bundle.load(bundle_dir))
    record_evaluation(bundle_dir, RESULT)
    bundle = Bundle.load(bundle_dir)  # verifies: evaluation.json is a listed, hashed bundle file
    assert EVALUATION_FILE in bundle.manifest["files"] and read_evaluation(bundle) == [RESULT]
    card = (bundle_dir / CARD_FILE).read_text()  # the card written before was regenerated
    assert front_matter(card)["metrics"] == ["accuracy", "cider"]
    assert "| method | scene_accuracy | cider |" in card and "| tomcap | 0.684 | 6.16 |" in card
    assert "`python -m training shapes-eval --n 500 --seed 1234` (2026-11-23)" in card

    newer = EvaluationResult(**{**RESULT.__dict__, "metrics": {"scene_accuracy": 0.7, "cider": 6.2}})
    maccap = EvaluationResult(**{**RESULT.__dict__, "method": "maccap", "metrics": {"scene_accuracy": 0.63}})
    record_evaluation(bundle_dir, newer)
    assert record_evaluation(bundle_dir, maccap) == [newer, maccap]  # same evaluation replaced, new one added
    assert "| maccap | 0.63 |  |" in (bundle_dir / CARD_FILE).read_text()


def test_evaluation_results_are_checked():
    with pytest.raises(ValueError, match="cider"):
        EvaluationResult(**{**RESULT.__dict__, "metrics": {"cider": float("nan")}})
    with pytest.raises(ValueError, match="method"):
        EvaluationResult(**{**RESULT.__dict__, "method": " "})


# ----------------------------------------------------------------------------- push


def test_push_uploads_exactly_the_bundle_and_its_card(bundle_dir):
    (bundle_dir / "notes.txt").write_text("local scratch\n")  # in the folder, not in the bundle
    (bundle_dir / "maccap" / "extra.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    api = FakeHfApi()
    result = push.push_bundle(bundle_dir, REPO, api=api)

    listed = json.loads((bundle_dir / MANIFEST).read_text())["files"]
    assert set(api.uploaded) == {MANIFEST, CARD_FILE, *listed} == set(result.files)
    for rel, data in api.uploaded.items():
        assert data == (bundle_dir / rel).read_bytes(), rel
    meta = front_matter(api.uploaded[CARD_FILE].decode())
    assert meta["library_name"] == "capdemo" and "tomcap" in meta["tags"]
    assert f"hf-hub:{REPO}@<commit>" in api.uploaded[CARD_FILE].decode()

    assert [name for name, _ in api.calls] == ["create_repo", "upload_folder"]
    assert api.call("create_repo") == {"repo_id": REPO, "repo_type": "model", "private": False, "exist_ok": True}
    upload = api.call("upload_folder")
    assert upload["revision"] is None and upload["delete_patterns"] == "*" and upload["repo_type"] == "model"
    assert result.commit == COMMIT and result.weights_spec == f"hf-hub:{REPO}@{COMMIT}"


def test_private_revision_and_message_reach_the_api(bundle_dir, capsys):
    api = FakeHfApi()
    code = push.main(["--weights", str(bundle_dir), "--repo", REPO, "--private", "--revision", "candidate",
                      "--commit-message", "shapes, rebuilt"], api=api)
    assert code == 0
    assert [name for name, _ in api.calls] == ["create_repo", "create_branch", "upload_folder"]
    assert api.call("create_repo")["private"] is True
    assert api.call("create_branch") == {"repo_id": REPO, "branch": "candidate", "repo_type": "model",
                                         "exist_ok": True}
    upload = api.call("upload_folder")
    assert upload["revision"] == "candidate" and upload["commit_message"] == "shapes, rebuilt"
    assert f"python app.py --weights hf-hub:{REPO}@{COMMIT}" in capsys.readouterr().out


def _flip_a_byte(bundle_dir: Path) -> None:
    weights = bundle_dir / "tomcap" / "trainable.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))


def _add_pickle(bundle_dir: Path) -> None:
    (bundle_dir / "maccap" / "adaptor_backup.json").write_bytes(b"\x80\x04\x95" + b"\x00" * 16)  # pickle bytes


def _remove_a_file(bundle_dir: Path) -> None:
    (bundle_dir / "vqa" / "answers.json").unlink()


@pytest.mark.parametrize("tamper", [_flip_a_byte, _add_pickle, _remove_a_file])
def test_a_tampered_bundle_is_refused_before_any_upload(bundle_dir, capsys, tamper):
    tamper(bundle_dir)
    api = FakeHfApi()
    assert push.main(["--weights", str(bundle_dir), "--repo", REPO], api=api) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: refusing to publish:") and error.count("\n") == 1
    assert api.calls == [] and not (bundle_dir / CARD_FILE).exists()
    with pytest.raises(BundleError):
        push.push_bundle(bundle_dir, REPO, api=api)
    assert api.calls == []


def test_push_needs_a_local_bundle_and_an_org_name_repo(bundle_dir):
    api = FakeHfApi()
    with pytest.raises(ValueError, match="local bundle folder"):
        push.push_bundle(f"hf-hub:{REPO}@{COMMIT}", REPO, api=api)
    with pytest.raises(ValueError, match="org/name"):
        push.push_bundle(bundle_dir, "just-a-name", api=api)
    assert api.calls == []


def test_push_is_a_training_subcommand():
    from training.__main__ import SUBCOMMANDS

    assert SUBCOMMANDS["push"][0] == push.__name__


def test_the_shipped_bundle_ships_its_current_card():
    """weights/shapes/README.md is what model_card makes of the bundle now (the shapes build writes it)."""
    assert (SHAPES / CARD_FILE).read_text(encoding="utf-8") == model_card(Bundle.load(SHAPES, verify=False))
