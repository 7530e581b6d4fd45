"""DistributedDataParallel under torchrun (Gloo on the CPU): two ranks train, only rank 0 writes."""

import os
import subprocess
import sys

import pytest
import torch
import yaml

from detkd.config import deep_merge
from detkd.engine.checkpoint import load_model_checkpoint
from detkd.smoke import SMOKE_OVERRIDES

from conftest import REPO


@pytest.mark.slow
def test_torchrun_two_ranks(tmp_path):
    raw = deep_merge(yaml.safe_load((REPO / "params.yaml").read_text()), SMOKE_OVERRIDES)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    env = {**os.environ, "DETKD_TRACKING": "off", "OMP_NUM_THREADS": "1"}
    run = lambda *cmd: subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run(sys.executable, str(REPO / "pipeline/prepare.py")).returncode == 0
    proc = run(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO / "pipeline/train.py"), "--role", "student", "--out", "models/student.pt",
               "--history", "reports/student.csv")
    assert proc.returncode == 0, proc.stderr[-3000:]
    state, meta = load_model_checkpoint(tmp_path / "models/student.pt")
    # 12 images, 2 ranks, batch 4 -> 2 iterations per epoch on each rank
    assert meta["train"]["iterations"] == 2
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["student.pt"]  # rank 1 wrote nothing
    assert (tmp_path / "reports/student.csv").read_text().count("\n") >= 2
