"""Resuming is exact: a training stage killed with SIGKILL after a mid-epoch state, then re-run, ends
with the same weights and loss history, bit for bit, as the run that was never interrupted."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from detkd.config import deep_merge, parse_params
from detkd.smoke import SMOKE_OVERRIDES

REPO = Path(__file__).resolve().parents[1]
# 12 train images, batch 4: 3 iterations per epoch; a state every 2 iterations falls mid-epoch at 2, 4, 8, 10
RESUME_OVERRIDES = {"train_student": {"epochs": 4, "checkpoint_every": 2, "hflip": 0.5}, "data": {"dev_fraction": 0.0}}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from detkd.data.prepare import prepare_dataset

    root = tmp_path_factory.mktemp("resume")
    raw = deep_merge(deep_merge(yaml.safe_load((REPO / "params.yaml").read_text()), SMOKE_OVERRIDES), RESUME_OVERRIDES)
    raw["pretrain"]["enabled"] = False
    params = parse_params(raw)
    prepare_dataset(root / "prepared", params.data, params.seed)
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    return root


def _command(root: Path, name: str) -> list[str]:
    return [sys.executable, str(REPO / "pipeline/train.py"), "--role", "student", "--params", str(root / "params.yaml"),
            "--data", str(root / "prepared"), "--out", str(root / f"{name}.pt"), "--history", str(root / f"{name}.csv"),
            "--state-dir", str(root / f"{name}-state")]


def _env() -> dict:
    return dict(os.environ, DETKD_TRACKING="off", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def _state_iteration(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)["iteration"]
    except Exception:  # not there yet
        return None


def test_sigkill_after_a_mid_epoch_state_then_resume_is_bit_identical(setup):
    root = setup
    subprocess.run(_command(root, "whole"), env=_env(), check=True, capture_output=True)

    proc = subprocess.Popen(_command(root, "killed"), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    state = root / "killed-state" / "state.pt"
    deadline = time.monotonic() + 600
    seen = None
    while proc.poll() is None and time.monotonic() < deadline:
        seen = _state_iteration(state)
        if seen is not None and seen % 3:  # a mid-epoch state is on disk: kill the stage where it stands
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the stage ended before a mid-epoch state was seen (rc {proc.returncode})"
    assert not (root / "killed.pt").exists()

    resumed = subprocess.run(_command(root, "killed"), env=_env(), check=True, capture_output=True, text=True)
    assert "resuming from" in resumed.stdout + resumed.stderr

    whole = torch.load(root / "whole.pt", map_location="cpu", weights_only=True)
    again = torch.load(root / "killed.pt", map_location="cpu", weights_only=True)
    weights = lambda ckpt: ckpt.get("model", ckpt)  # noqa: E731
    a, b = weights(whole), weights(again)
    assert a.keys() == b.keys()
    differing = [k for k in a if torch.is_tensor(a[k]) and not torch.equal(a[k], b[k])]
    assert not differing, f"weights differ after resuming from iteration {seen}: {differing[:5]}"
    assert (root / "whole.csv").read_text() == (root / "killed.csv").read_text()


def test_a_corrupt_state_is_moved_aside_and_stale_temporaries_removed(setup):
    root = setup
    state_dir = root / "corrupt-state"
    state_dir.mkdir()
    (state_dir / "state.pt").write_bytes(b"PK\x03\x04 cut short by a kill")
    stale = state_dir / ".state.pt.k1ll3d.tmp"  # what a write killed midway leaves (detkd.io.atomic_path)
    stale.write_bytes(b"\0" * 1024)
    proc = subprocess.run(_command(root, "corrupt"), env=_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "state.pt" in warnings[0] and "starting afresh" in warnings[0]
    assert (state_dir / "state.pt.corrupt").read_bytes().startswith(b"PK")
    assert not stale.exists()
    assert (root / "corrupt.pt").is_file()
