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
