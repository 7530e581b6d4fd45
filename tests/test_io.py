"""Atomic outputs: all or nothing, with the permissions any other new file would get."""

import os
import stat

import pytest

from detkd.io import atomic_path, atomic_write_json


def test_atomic_write_gives_umask_permissions_and_leaves_no_temp(tmp_path):
    mask = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "m.json", {"b": 1, "a": float("nan")})
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "m.json").stat().st_mode) == 0o644
    assert (tmp_path / "m.json").read_text() == '{\n  "a": null,\n  "b": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_failed_write_keeps_the_previous_file(tmp_path):
    target = tmp_path / "r.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["r.txt"]
