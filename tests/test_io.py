"""Atomic outputs: all or nothing, with the permissions any other new file would get."""

import os
import stat

import pytest

from detkd.io import atomic_path, atomic_write_json, staged_directory


def test_atomic_write_gives_umask_permissions_and_leaves_no_temp(tmp_path):
    mask = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "m.json", {"b": 1, "a": float("nan")})
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "m.json").stat().st_mode) == 0o644
    assert (tmp_path / "m.json").read_text() == '{\n  "a": null,\n  "b": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


@pytest.mark.fault
def test_failed_write_keeps_the_previous_file(tmp_path):
    target = tmp_path / "r.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["r.txt"]


@pytest.mark.fault
def test_model_checkpoint_without_metadata_keys_is_refused_in_one_line(tmp_path):
    import pytest
    import torch

    from detkd.engine.checkpoint import load_model_checkpoint
    from detkd.errors import CheckpointError

    spec = {"family": "fasterrcnn", "backbone": "resnet18", "num_classes": 3, "model": {}}
    good = {"spec": spec, "category_ids": [1, 2, 3], "category_names": ["a", "b", "c"]}
    cases = {
        "no-names": ({k: v for k, v in good.items() if k != "category_names"}, "without meta.category_names"),
        "no-backbone": ({**good, "spec": {k: v for k, v in spec.items() if k != "backbone"}}, "meta.spec.backbone"),
        "no-spec": ({k: v for k, v in good.items() if k != "spec"}, "without meta.spec"),
        "lengths": ({**good, "category_names": ["a"]}, "differ in length"),
    }
    for name, (meta, expected) in cases.items():
        path = tmp_path / f"{name}.pt"
        torch.save({"model": {}, "meta": meta}, path)
        with pytest.raises(CheckpointError, match=expected) as info:
            load_model_checkpoint(path)
        assert "\n" not in str(info.value) and str(path) in str(info.value)
    torch.save({"model": {}, "meta": good}, tmp_path / "good.pt")
    assert load_model_checkpoint(tmp_path / "good.pt")[1] == good


@pytest.mark.fault
def test_staged_directory_replaces_the_old_set_whole_or_not_at_all(tmp_path):
    final = tmp_path / "export"
    final.mkdir()
    (final / "old.onnx").write_text("old")
    with pytest.raises(RuntimeError):
        with staged_directory(final) as staging:
            (staging / "new.onnx").write_text("new")
            raise RuntimeError("killed halfway")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"] and (final / "old.onnx").read_text() == "old"

    with staged_directory(final) as staging:
        assert staging.parent == tmp_path and not any(staging.iterdir())
        (staging / "new.onnx").write_text("new")
        (staging / "rejected").mkdir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    assert sorted(p.name for p in final.iterdir()) == ["new.onnx", "rejected"]
    assert stat.S_IMODE(final.stat().st_mode) == 0o777 & ~_umask()


@pytest.mark.fault
def test_staged_directory_removes_leftovers_of_dead_processes_only(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    for name in (f".export.partial-{dead_pid}", f".export.old-{dead_pid}", f".export.partial-{os.getppid()}",
                 ".export-notes"):
        (tmp_path / name).mkdir()
    with staged_directory(tmp_path / "export"):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["export", f".export.partial-{os.getppid()}",
                                                                 ".export-notes"])


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
