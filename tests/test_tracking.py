"""MLflow tracking under concurrency: stages started at once on a fresh default store all land."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

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
