"""Resuming is exact: a training stage killed with SIGKILL after a mid-epoch state, then re-run, ends
with the same weights and loss history, bit for bit, as the run that was never interrupted."""

import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import stage_command, stage_env, state_iteration

pytestmark = pytest.mark.fault


def test_sigkill_after_a_mid_epoch_state_then_resume_is_bit_identical(tiny_stage):
    root = tiny_stage
    subprocess.run(stage_command(root, "whole"), env=stage_env(), check=True, capture_output=True)

    proc = subprocess.Popen(stage_command(root, "killed"), env=stage_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    state = root / "killed-state" / "state.pt"
    deadline = time.monotonic() + 600
    seen = None
    while proc.poll() is None and time.monotonic() < deadline:
        seen = state_iteration(state)
        if seen is not None and seen % 3:  # a mid-epoch state is on disk: kill the stage where it stands
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the stage ended before a mid-epoch state was seen (rc {proc.returncode})"
    assert not (root / "killed.pt").exists()

    resumed = subprocess.run(stage_command(root, "killed"), env=stage_env(), check=True, capture_output=True, text=True)
    assert "resuming from" in resumed.stdout + resumed.stderr

    whole = torch.load(root / "whole.pt", map_location="cpu", weights_only=True)
    again = torch.load(root / "killed.pt", map_location="cpu", weights_only=True)
    weights = lambda ckpt: ckpt.get("model", ckpt)  # noqa: E731
    a, b = weights(whole), weights(again)
    assert a.keys() == b.keys()
    differing = [k for k in a if torch.is_tensor(a[k]) and not torch.equal(a[k], b[k])]
    assert not differing, f"weights differ after resuming from iteration {seen}: {differing[:5]}"
    assert (root / "whole.csv").read_text() == (root / "killed.csv").read_text()


def test_a_corrupt_state_is_moved_aside_and_stale_temporaries_removed(tiny_stage):
    root = tiny_stage
    state_dir = root / "corrupt-state"
    state_dir.mkdir()
    (state_dir / "state.pt").write_bytes(b"PK\x03\x04 cut short by a kill")
    stale = state_dir / ".state.pt.k1ll3d.tmp"  # what a write killed midway leaves (detkd.io.atomic_path)
    stale.write_bytes(b"\0" * 1024)
    proc = subprocess.run(stage_command(root, "corrupt"), env=stage_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "state.pt" in warnings[0] and "starting afresh" in warnings[0]
    assert (state_dir / "state.pt.corrupt").read_bytes().startswith(b"PK")
    assert not stale.exists()
    assert (root / "corrupt.pt").is_file()
