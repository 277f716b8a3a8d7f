"""Atomic writes leave files with the permissions the user's umask gives, as plain open() would."""

from __future__ import annotations

import os
import stat

import pytest

from qdetr_deploy.io import atomic_path, write_json, write_text


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_atomic_writes_follow_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        write_text(tmp_path / "b.md", "hello\n")
        with atomic_path(tmp_path / "c.bin") as tmp:
            tmp.write_bytes(b"\0")
        with open(tmp_path / "reference", "w") as f:  # what open() gives under the same umask
            f.write("x")
    finally:
        os.umask(old)
    expected = 0o666 & ~mask
    assert stat.S_IMODE((tmp_path / "reference").stat().st_mode) == expected
    for name in ("a.json", "b.md", "c.bin"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == expected, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.md", "c.bin", "reference"]
