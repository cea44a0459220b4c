"""atomic_output: the target is the old file or the whole new one, and no temp file stays behind."""

from __future__ import annotations

import pytest

from capdemo.fileio import atomic_output


def test_a_finished_block_replaces_the_file(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    with atomic_output(target) as tmp:
        assert tmp.parent == target.parent and not target.exists()
        tmp.write_text("new")
    assert target.read_text() == "new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.txt"]


def test_a_failing_block_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="writer died"):
        with atomic_output(target) as tmp:
            tmp.write_text("half of the new")
            raise RuntimeError("writer died")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_a_durable_write_syncs_the_file_and_its_folder(tmp_path, monkeypatch):
    import os

    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.path.isdir(f"/proc/self/fd/{fd}")) or real_fsync(fd))
    with atomic_output(tmp_path / "plain.txt") as tmp:
        tmp.write_text("a")
    assert synced == []
    with atomic_output(tmp_path / "durable.txt", durable=True) as tmp:
        tmp.write_text("b")
    assert synced == [False, True]  # the temp file before the rename, then the folder
    assert (tmp_path / "durable.txt").read_text() == "b"


def test_a_safetensors_header_gets_its_metadata_sorted_without_touching_the_tensors(tmp_path):
    import json
    import struct

    import torch
    from safetensors.torch import load_file, safe_open, save_file

    from capdemo.fileio import sort_safetensors_metadata

    path = tmp_path / "stats.safetensors"
    tensors = {"mu": torch.arange(4.0), "sigma": torch.ones(3)}
    metadata = {"n_text": "2518", "n_image": "2000", "format": "capdemo.gapstats/1", "encoder_name": "tiny"}
    save_file(tensors, str(path), metadata=metadata)
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    header["__metadata__"] = dict(reversed(sorted(metadata.items())))  # the order a hash map may have written
    scrambled = json.dumps(header, separators=(",", ":")).encode().ljust(length, b" ")
    path.write_bytes(raw[:8] + scrambled + raw[8 + length:])
    sort_safetensors_metadata(path)
    fixed = path.read_bytes()
    assert len(fixed) == len(raw) and fixed[8 + length:] == raw[8 + length:]  # same size, same tensor bytes
    assert list(json.loads(fixed[8:8 + length])["__metadata__"]) == sorted(metadata)
    with safe_open(str(path), "pt") as file:
        assert file.metadata() == metadata
    assert all(torch.equal(load_file(str(path))[name], tensor) for name, tensor in tensors.items())
    before = path.read_bytes()
    sort_safetensors_metadata(path)  # already sorted: unchanged
    assert path.read_bytes() == before


def test_save_safetensors_writes_the_metadata_sorted(tmp_path):
    import json
    import struct

    import torch

    from capdemo.fileio import save_safetensors

    metadata = {f"key{i}": str(i) for i in (5, 3, 8, 1, 7, 2, 6, 4)}  # a hash map's order is one of 8! here
    save_safetensors({"x": torch.zeros(2)}, tmp_path / "a.safetensors", metadata)
    raw = (tmp_path / "a.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    assert list(json.loads(raw[8:8 + length])["__metadata__"]) == sorted(metadata)
