"""MLflow tracking under concurrency: stages started at once on a fresh default store all land."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import free_port, stage_command, stage_env, state_iteration

pytestmark = pytest.mark.fault

STAGE = textwrap.dedent("""
    import sys
    from detkd.tracking.mlflow_run import stage_run
    with stage_run(sys.argv[1], {"k": sys.argv[1]}) as run:
        run.log_metrics({"x": 1.0})
        print(run.run_id)
""")


def test_concurrent_stages_on_a_fresh_sqlite_store_all_land(tmp_path):
    """Four processes open the default SQLite store before it exists, at the same moment (as queued DVC
    experiments or ``make compare --jobs 2`` do): every one finishes and every run is FINISHED."""
    repo = tmp_path / "repo"
    (repo / ".dvc").mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DETKD_TRACKING")}
    env["DETKD_PIPELINE_ID"] = "concurrent"
    procs = [subprocess.Popen([sys.executable, "-c", STAGE, f"stage{i}"], cwd=repo, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(4)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-1500:]
    run_ids = [out.strip().splitlines()[-1] for out, _ in outs]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    statuses = {rid: client.get_run(rid).info.status for rid in run_ids}
    assert set(statuses.values()) == {"FINISHED"}, json.dumps(statuses)
    assert Path(repo / "mlflow.db.lock").exists()


# ---- a tracking server that is not there, or dies mid-stage --------------------------------------------

@pytest.fixture
def mlflow_server(tmp_path):
    """A real ``mlflow server`` on loopback (its own process group, so a kill takes its workers too)."""
    import urllib.request

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--default-artifact-root", str(tmp_path / "server-artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(uri + "/health", timeout=1).close()
            break
        except OSError:
            assert proc.poll() is None, "mlflow server exited at start"
            time.sleep(0.5)
    else:
        pytest.fail("mlflow server did not answer within 120 s")
    yield uri, proc
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_an_unreachable_server_fails_the_stage_fast_with_one_line(tiny_stage):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    start = time.monotonic()
    proc = subprocess.run(stage_command(tiny_stage, "unreachable"), capture_output=True, text=True,
                          env=stage_env(DETKD_TRACKING="on", MLFLOW_TRACKING_URI=uri), timeout=120)
    assert time.monotonic() - start < 15 + 10  # the probe gives up within 5 s; the rest is python and torch imports
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and uri in lines[0] and "DETKD_TRACKING=off" in lines[0], proc.stderr[-1500:]
    assert not (tiny_stage / "unreachable.pt").exists()


def test_a_server_killed_mid_stage_costs_nothing_but_tracking(tiny_stage, mlflow_server):
    uri, server = mlflow_server
    stage = subprocess.Popen(stage_command(tiny_stage, "orphan"), text=True, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=stage_env(DETKD_TRACKING="on", MLFLOW_TRACKING_URI=uri))
    state = tiny_stage / "orphan-state" / "state.pt"
    deadline = time.monotonic() + 600
    while stage.poll() is None and state_iteration(state) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stage.poll() is None, "the stage finished before the server could be killed"
    os.killpg(server.pid, signal.SIGKILL)  # training is under way and logging to it
    server.wait()
    out, err = stage.communicate(timeout=600)
    assert stage.returncode == 0, err[-2000:]
    assert err.count("warning: MLflow tracking") == 1, err[-3000:]
    warning = next(line for line in err.splitlines() if line.startswith("warning: MLflow tracking"))  # its own line
    assert uri in warning and "goes on without tracking" in warning
    assert (tiny_stage / "orphan.pt").is_file() and (tiny_stage / "orphan.csv").is_file()


def test_sigterm_marks_the_stage_run_failed(tiny_stage, tmp_path):
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{tmp_path / 'term.db'}"
    env = stage_env(DETKD_TRACKING="on", MLFLOW_TRACKING_URI=store, DETKD_PIPELINE_ID="sigterm")
    stage = subprocess.Popen(stage_command(tiny_stage, "terminated"), text=True, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=env)
    state = tiny_stage / "terminated-state" / "state.pt"
    deadline = time.monotonic() + 600
    while stage.poll() is None and state_iteration(state) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stage.poll() is None, "the stage finished before it could be terminated"
    stage.send_signal(signal.SIGTERM)
    stage.communicate(timeout=120)
    assert stage.returncode != 0
    client = MlflowClient(tracking_uri=store)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    statuses = {r.data.tags.get("detkd.kind"): r.info.status for r in runs}
    assert statuses == {"stage": "FAILED", "pipeline": "FAILED"}, statuses
