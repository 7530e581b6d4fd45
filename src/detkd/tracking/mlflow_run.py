"""One MLflow run per pipeline stage, linked to a parent run per pipeline execution.

Contract: ``with stage_run("train_teacher", params) as run:`` opens a run nested under the pipeline's
parent run and tags it with the git commit, the DVC experiment name and the pipeline id; ``run`` has
``log_params``, ``log_metrics``, ``log_artifact`` and ``set_tags``. On an exception the run is marked
FAILED. With ``DETKD_TRACKING=off`` every call is a no-op (``run.enabled`` is False).

Where runs go: ``MLFLOW_TRACKING_URI`` if set; otherwise a SQLite file ``mlflow.db`` at the absolute
path of the repository root (artefacts in ``mlartifacts/`` beside it), so that queued DVC experiments,
which run in temporary copies under ``.dvc/tmp/exps``, all write to the user's one store.

Linking: the pipeline id is ``DETKD_PIPELINE_ID`` if set (``make repro`` sets one per invocation), else
the DVC experiment name, else ``<commit>-<hash of params.yaml>``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
from pathlib import Path
from typing import Any, Iterator, Optional

EXPERIMENT = os.environ.get("DETKD_MLFLOW_EXPERIMENT", "detkd")


def repository_root(start: Optional[Path] = None) -> Path:
    """The user's repository, also from inside a DVC experiment's temporary workspace."""
    here = (start or Path.cwd()).resolve()
    parts = here.parts
    for k in range(len(parts) - 2):
        if parts[k] == ".dvc" and parts[k + 1] == "tmp" and parts[k + 2] == "exps":
            return Path(*parts[:k])
    for candidate in (here, *here.parents):
        if (candidate / ".dvc").is_dir() or (candidate / ".git").exists():
            return candidate
    return here


def default_tracking_uri(root: Optional[Path] = None) -> str:
    return f"sqlite:///{(root or repository_root()) / 'mlflow.db'}"


def git_commit(root: Optional[Path] = None) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root or Path.cwd(), capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def pipeline_id(params_file: Path = Path("params.yaml")) -> str:
    explicit = os.environ.get("DETKD_PIPELINE_ID") or os.environ.get("DVC_EXP_NAME")
    if explicit:
        return explicit
    digest = hashlib.sha256(params_file.read_bytes()).hexdigest()[:8] if params_file.is_file() else "noparams"
    return f"{git_commit()[:8]}-{digest}"


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a.b.c": value} (lists become strings), the shape MLflow params want."""
    out: dict[str, Any] = {}
    if isinstance(data, dict):
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = data if not isinstance(data, (list, tuple)) else str(list(data))
    return out


class _NullRun:
    enabled = False
    run_id: Optional[str] = None

    def log_params(self, params: dict) -> None: ...
    def log_metrics(self, metrics: dict, step: Optional[int] = None) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None: ...
    def set_tags(self, tags: dict) -> None: ...
    def log_onnx_model(self, path: str | Path, name: str, registered_model: Optional[str] = None,
                       alias: Optional[str] = None) -> Optional[str]:
        return None


class _MlflowRun(_NullRun):
    enabled = True

    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: dict, step: Optional[int] = None) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(k.replace("/", "."), float(v), now, step or 0)
            for k, v in flatten(metrics).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        ]
        for start in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[start : start + 500])

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        if Path(path).exists():
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: dict) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def log_onnx_model(self, path: str | Path, name: str, registered_model: Optional[str] = None,
                       alias: Optional[str] = None) -> Optional[str]:
        """Log ``path`` with MLflow's ONNX flavour; with ``registered_model`` register it and point ``alias`` at
        the new version. Returns the registered version (or None)."""
        import mlflow
        import mlflow.onnx
        import onnx

        mlflow.set_tracking_uri(self.client.tracking_uri)
        with mlflow.start_run(run_id=self.run_id):
            logged = mlflow.onnx.log_model(onnx.load(str(path)), name=name, registered_model_name=registered_model,
                                           save_as_external_data=False)
        version = getattr(logged, "registered_model_version", None)
        if registered_model and alias and version is not None:
            self.client.set_registered_model_alias(registered_model, alias, str(version))
        return None if version is None else str(version)


def tracking_enabled() -> bool:
    return os.environ.get("DETKD_TRACKING", "on").lower() not in ("0", "off", "false", "no")


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """An exclusive lock (``<store>.lock`` beside a SQLite store) held while a process opens the store and
    finds or creates the experiment. MLflow creates a new SQLite store's tables on first access; two
    stages doing that at once (queued DVC experiments, ``make compare --jobs 2``) failed with "table ...
    already exists". Other URIs (a server, a directory) need no lock."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    db = Path(uri.removeprefix("sqlite:///"))  # sqlite:////abs/path -> /abs/path; sqlite:///rel -> rel
    if not db.is_absolute():
        db = Path.cwd() / db
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _experiment_id(client, root: Path) -> str:
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is not None:
        return exp.experiment_id
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    location = None if uri and not uri.startswith("sqlite:") else (root / "mlartifacts").as_uri()
    try:
        return client.create_experiment(EXPERIMENT, artifact_location=location)
    except Exception:  # created concurrently by a queued experiment
        return client.get_experiment_by_name(EXPERIMENT).experiment_id


def _parent_run(client, experiment_id: str, pid: str, tags: dict) -> str:
    found = client.search_runs(
        [experiment_id], filter_string=f"tags.`detkd.pipeline_id` = '{pid}' and tags.`detkd.kind` = 'pipeline'",
        max_results=1,
    )
    if found:
        return found[0].info.run_id
    run = client.create_run(experiment_id, run_name=f"pipeline {pid}", tags={**tags, "detkd.kind": "pipeline"})
    return run.info.run_id


@contextlib.contextmanager
def stage_run(stage: str, params: Optional[dict] = None, rank_zero: bool = True) -> Iterator[_NullRun]:
    """Open the MLflow run of ``stage`` (see module docstring). Non-zero ranks get a no-op run."""
    if not (tracking_enabled() and rank_zero):
        yield _NullRun()
        return
    import logging

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    from mlflow.tracking import MlflowClient

    root = repository_root()
    uri = os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(root)
    with _store_lock(uri):  # the first access creates a SQLite store's schema: one process at a time
        client = MlflowClient(tracking_uri=uri)
        experiment_id = _experiment_id(client, root)
    pid = pipeline_id()
    tags = {
        "detkd.pipeline_id": pid,
        "detkd.git_commit": git_commit(),
        "detkd.dvc_experiment": os.environ.get("DVC_EXP_NAME", ""),
    }
    parent = _parent_run(client, experiment_id, pid, tags)
    run = client.create_run(
        experiment_id, run_name=stage, tags={**tags, "detkd.kind": "stage", "detkd.stage": stage, "mlflow.parentRunId": parent}
    )
    handle = _MlflowRun(client, run.info.run_id)
    if params:
        handle.log_params(params)
    try:
        yield handle
    except BaseException:
        client.set_terminated(run.info.run_id, status="FAILED")
        raise
    client.set_terminated(run.info.run_id, status="FINISHED")
    client.set_terminated(parent, status="FINISHED")
