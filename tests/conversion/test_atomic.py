"""Crash-safe writes: all or nothing, the previous version survives a failure, normal permissions."""

from __future__ import annotations

import os
import stat

import pytest

from kvforge.conversion import atomic_directory, atomic_file


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_directory_and_file_get_the_permissions_a_plain_write_would(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "export") as tmp:
            (tmp / "config.json").write_text("{}")
        with atomic_file(tmp_path / "cache.bin") as tmp:
            tmp.write_bytes(b"x")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "export") == 0o755
    assert _mode(tmp_path / "cache.bin") == 0o644


def test_failure_keeps_the_previous_directory_and_leaves_no_temporary(tmp_path):
    out = tmp_path / "model"
    with atomic_directory(out) as tmp:
        (tmp / "weights").write_text("good")
    with pytest.raises(RuntimeError), atomic_directory(out, overwrite=True) as tmp:
        (tmp / "weights").write_text("half")
        raise RuntimeError("killed mid-write")
    assert (out / "weights").read_text() == "good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_existing_output_is_refused_without_overwrite(tmp_path):
    (tmp_path / "model").mkdir()
    with pytest.raises(FileExistsError, match="overwrite"), atomic_directory(tmp_path / "model"):
        pass


def test_overwrite_replaces_the_whole_directory(tmp_path):
    out = tmp_path / "model"
    with atomic_directory(out) as tmp:
        (tmp / "stale").write_text("old")
    with atomic_directory(out, overwrite=True) as tmp:
        (tmp / "fresh").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["fresh"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_failed_file_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "cache.bin"
    target.write_bytes(b"good")
    with pytest.raises(OSError), atomic_file(target) as tmp:
        tmp.write_bytes(b"partial")
        raise OSError("disk full")
    assert target.read_bytes() == b"good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.bin"]
