"""Disk faults as they happen, on real small filesystems (tmpfs mounts; skipped where mounting is not
allowed): an optional periodic state that does not fit warns once and training goes on; a final output
that cannot be written fails in one line naming the place, and the previous output stays intact."""

import subprocess
import uuid
from pathlib import Path

import pytest
from conftest import stage_command, stage_env

pytestmark = pytest.mark.fault


@pytest.fixture
def small_fs(tmp_path):
    """mount(size, read_only=False, seed_files=None) -> the mount point of a fresh tmpfs of ``size``."""
    mounted = []

    def mount(size: str, read_only: bool = False, seed_files: dict | None = None) -> Path:
        point = tmp_path / f"fs-{uuid.uuid4().hex[:6]}"
        point.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here ({proc.stderr.strip() or 'mount failed'}); "
                        "these tests need root with mount permission")
        mounted.append(point)
        for name, data in (seed_files or {}).items():
            (point / name).write_bytes(data)
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(point)], check=True)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def _with_out(command: list[str], out: Path) -> list[str]:
    command = list(command)
    command[command.index("--out") + 1] = str(out)
    return command


def _error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr[-2000:]
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_a_periodic_state_that_does_not_fit_warns_once_and_training_goes_on(tiny_stage, small_fs):
    states = small_fs("64k")
    command = stage_command(tiny_stage, "nospace-state")
    command[command.index("--state-dir") + 1] = str(states / "student")
    proc = subprocess.run(command, env=stage_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.count("warning: periodic training state not saved") == 1, proc.stderr[-2000:]
    assert "no space left on" in proc.stderr
    assert (tiny_stage / "nospace-state.pt").is_file()
    assert not list((states / "student").glob("*.tmp")) and not list((states / "student").glob(".*.tmp"))


@pytest.mark.parametrize("read_only, expected", [(False, "no space left on"), (True, "is read-only")])
def test_a_final_output_that_cannot_be_written_fails_in_one_line_and_keeps_the_previous(
        tiny_stage, small_fs, read_only, expected):
    previous = b"the previous model" * 1000
    fs = small_fs("32k", read_only=read_only, seed_files={"model.pt": previous})
    proc = subprocess.run(_with_out(stage_command(tiny_stage, f"final-{read_only}"), fs / "model.pt"),
                          env=stage_env(), capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = _error_lines(proc.stderr)
    assert len(errors) == 1 and expected in errors[0] and str(fs) in errors[0], proc.stderr[-2000:]
    assert "previous model.pt is intact" in errors[0]
    assert (fs / "model.pt").read_bytes() == previous
    assert sorted(p.name for p in fs.iterdir()) == ["model.pt"]  # no temporary left behind
