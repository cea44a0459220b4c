"""Bundles: exact round trips, tamper/truncation/pickle/format refusal, config JSON round trips."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
import torch

from capdemo.bundle import MANIFEST, Bundle, BundleError, BundleWriter, update_info
from capdemo.config import Config, ConfigError
from capdemo.encoders import EncoderConfig, add_encoder_to_bundle, encoder_from_bundle
from capdemo.testing import tiny_encoder, tiny_encoder_config


@pytest.fixture()
def bundle_dir(tmp_path):
    encoder = tiny_encoder(seed=7)
    writer = BundleWriter(tmp_path / "tiny", name="tiny", description="test bundle")
    add_encoder_to_bundle(writer, encoder, tiny_encoder_config(), copy_weights=True)
    writer.add_tensors("extra/vector.safetensors", {"v": torch.arange(5.0)})
    writer.add_json("extra/answers.json", ["yes", "no"])
    writer.add_file("extra/notes.txt", b"hello")
    path = writer.finish()
    return path, encoder


def test_round_trip_gives_identical_outputs(bundle_dir):
    path, original = bundle_dir
    bundle = Bundle.load(path)
    rebuilt = encoder_from_bundle(bundle)
    pixels = torch.randn(2, 3, 32, 32)
    a, b = original.encode_images(pixels), rebuilt.encode_images(pixels)
    assert torch.equal(a.token_embeds, b.token_embeds) and torch.equal(a.attention, b.attention)
    assert torch.equal(original.encode_text(["a red circle"]), rebuilt.encode_text(["a red circle"]))
    assert torch.equal(bundle.tensors("extra/vector.safetensors")["v"], torch.arange(5.0))
    assert bundle.json("extra/answers.json") == ["yes", "no"]
    assert bundle.name == "tiny" and bundle.has("encoder") and not bundle.has("maccap")


def test_manifest_lists_every_file_with_hash(bundle_dir):
    path, _ = bundle_dir
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["format"] == "capdemo-bundle" and manifest["format_version"] == 1
    on_disk = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} - {MANIFEST}
    assert set(manifest["files"]) == on_disk
    assert all(len(entry["sha256"]) == 64 for entry in manifest["files"].values())
    assert manifest["components"]["encoder"]["pretrained"] == "bundle:encoder/open_clip_model.safetensors"


def test_changed_byte_fails_verification(bundle_dir):
    path, _ = bundle_dir
    target = path / "encoder" / "open_clip_model.safetensors"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256 mismatch") as info:
        Bundle.load(path)
    assert "open_clip_model.safetensors" in str(info.value) and "\n" not in str(info.value)


def test_truncated_and_missing_files_refused(bundle_dir):
    path, _ = bundle_dir
    notes = path / "extra" / "notes.txt"
    notes.write_bytes(b"hel")
    with pytest.raises(BundleError, match="truncated"):
        Bundle.load(path)
    notes.unlink()
    with pytest.raises(BundleError, match="missing"):
        Bundle.load(path)


@pytest.mark.parametrize("name,content", [("evil.pkl", b"cos\nsystem\n"), ("model.bin", b"\x80\x04\x95")])
def test_pickle_file_in_bundle_refused(bundle_dir, name, content):
    path, _ = bundle_dir
    (path / name).write_bytes(content)
    with pytest.raises(BundleError, match="pickle"):
        Bundle.load(path)


def test_unknown_format_version_refused(bundle_dir):
    path, _ = bundle_dir
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["format_version"] = 99
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="format_version 99 is not supported"):
        Bundle.load(path)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="not a capdemo bundle"):
        Bundle.load(tmp_path)


def test_rewrite_replaces_atomically(bundle_dir):
    path, _ = bundle_dir
    writer = BundleWriter(path, name="tiny-v2")
    writer.add_json("only.json", {"a": 1})
    writer.finish()
    bundle = Bundle.load(path)
    assert bundle.name == "tiny-v2" and set(bundle.manifest["files"]) == {"only.json"}
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".tiny")]  # no staging left behind


def test_path_escape_refused(tmp_path):
    writer = BundleWriter(tmp_path / "b", name="b")
    with pytest.raises(BundleError, match="bad file name"):
        writer.add_json("../outside.json", {})
    writer.abort()


@dataclass
class _Inner(Config):
    width: int = 4
    scale: float = 1.0


@dataclass
class _Outer(Config):
    name: str = "x"
    inner: _Inner = field(default_factory=_Inner)
    sizes: tuple[int, ...] = (1, 2)
    maybe: str | None = None


def test_config_round_trip_and_unknown_keys():
    config = _Outer(name="y", inner=_Inner(width=8, scale=2), sizes=(3, 4, 5), maybe="z")
    data = json.loads(json.dumps(config.to_dict()))
    assert _Outer.from_dict(data) == config
    assert isinstance(_Outer.from_dict({"inner": {"scale": 3}}).inner.scale, float)
    with pytest.raises(ConfigError, match=r"_Outer.inner: unknown field\(s\) depth"):
        _Outer.from_dict({"inner": {"depth": 2}})
    encoder = tiny_encoder_config()
    assert EncoderConfig.from_dict(json.loads(json.dumps(encoder.to_dict()))) == encoder


def test_update_info_sets_unhashed_fields_and_refuses_hashed_ones(bundle_dir):
    path, _ = bundle_dir
    before = Bundle.load(path).manifest
    update_info(path, training={"build_seconds": 7}, domain={"summary": "s"})
    after = Bundle.load(path).manifest  # verifies: no listed file changed
    assert after["training"] == {"build_seconds": 7} and after["domain"] == {"summary": "s"}
    assert after["files"] == before["files"] and after["components"] == before["components"]
    with pytest.raises(BundleError, match="cannot change files"):
        update_info(path, files={})
    assert Bundle.load(path).manifest == after


def test_extending_keeps_other_components(bundle_dir):
    path, original = bundle_dir
    writer = BundleWriter.extending(path, description="with a method")
    writer.remove("extra")
    writer.add_component("maccap", {"n_cr": 10})
    writer.add_json("maccap/config.json", {"n_cr": 10})
    writer.finish()
    bundle = Bundle.load(path)
    assert set(bundle.components) == {"encoder", "maccap"}
    assert bundle.name == "tiny" and bundle.manifest["description"] == "with a method"
    assert not any(rel.startswith("extra/") for rel in bundle.manifest["files"])
    rebuilt = encoder_from_bundle(bundle)
    pixels = torch.randn(1, 3, 32, 32)
    assert torch.equal(rebuilt.encode_images(pixels).image_embeds, original.encode_images(pixels).image_embeds)


# A writer that SIGKILLs itself at the n-th os.replace of BundleWriter.finish: 1 = before the swap (the
# finished staging folder is about to replace the old bundle), 2 = between the swap's two renames.
_KILLED_WRITER = """
import os, signal, sys
import capdemo.bundle as bundle
calls = 0
real_replace = os.replace
def replace(src, dst):
    global calls
    calls += 1
    if calls == int(sys.argv[2]):
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst)
bundle.os.replace = replace
writer = bundle.BundleWriter.extending(sys.argv[1])
writer.add_json("b/notes.json", {"written": "second"})
writer.add_component("b", {"n": 2})
writer.finish()
"""


def _kill_a_writer_of(target, at_rename: int) -> None:
    import signal
    import subprocess
    import sys

    from tests.kill_resume import REPO_ROOT

    done = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(target), str(at_rename)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr


def _first_bundle(path):
    writer = BundleWriter(path, name="kept")
    writer.add_json("a/notes.json", {"written": "first"})
    writer.add_component("a", {"n": 1})
    return writer.finish()


@pytest.mark.parametrize("next_step", ["load", "extend"])
@pytest.mark.parametrize("at_rename", [1, 2])
def test_a_writer_killed_mid_finish_loses_nothing(tmp_path, at_rename, next_step):
    target = _first_bundle(tmp_path / "kept")
    _kill_a_writer_of(target, at_rename)
    leftovers = sorted(p.name.split("-")[0] for p in tmp_path.iterdir() if p.name.startswith(".kept."))
    if at_rename == 1:  # killed before the swap: the old bundle stands, a staging folder is left over
        assert target.is_dir() and leftovers == [".kept.staging"]
    else:  # killed between the renames: no bundle at the path, the previous one set aside
        assert not target.exists() and leftovers == [".kept.old", ".kept.staging"]
    if next_step == "load":  # a reader: verified, and the previous bundle is back where it was
        bundle = Bundle.load(target)
        assert set(bundle.components) == {"a"} and bundle.json("a/notes.json") == {"written": "first"}
    writer = BundleWriter.extending(target)  # the next training command: keeps what was there, clears the rest
    writer.add_component("b", {"n": 3})
    writer.finish()
    assert set(Bundle.load(target).components) == {"a", "b"}
    assert [p.name for p in tmp_path.iterdir()] == ["kept"]


def test_leftovers_of_a_live_or_unknown_writer_are_left_alone(tmp_path):
    import subprocess
    import sys

    from capdemo.bundle import _host

    target = _first_bundle(tmp_path / "kept")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        kept = [tmp_path / f".kept.staging-{_host()}-{live.pid}-x",  # a writer still running here
                tmp_path / ".kept.staging-elsewhere-1-x"]  # a writer on another host: cannot tell
        for folder in kept:
            folder.mkdir()
        writer = BundleWriter.extending(target)
        writer.add_component("b", {"n": 2})
        writer.finish()
        assert all(folder.is_dir() for folder in kept)
    finally:
        live.kill()
        live.wait()
    BundleWriter(target, name="again").abort()  # its writer now dead, the local leftover goes
    assert not kept[0].exists() and kept[1].is_dir()


def test_a_live_writer_in_this_process_keeps_its_staging_whatever_the_path_spelling(tmp_path, monkeypatch):
    from capdemo.bundle import recover_interrupted_write

    monkeypatch.chdir(tmp_path)
    writer = BundleWriter("kept", name="kept")  # a relative path here, an absolute one below
    writer.add_component("a", {"n": 1})
    recover_interrupted_write(tmp_path / "kept")
    assert writer._staging.is_dir()
    assert set(Bundle.load(writer.finish()).components) == {"a"}
