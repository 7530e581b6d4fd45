"""One MLflow run per pipeline stage, linked to a parent run per pipeline execution.

Contract: ``with stage_run("train_teacher", params) as run:`` opens a run nested under the pipeline's
parent run and tags it with the git commit, the DVC experiment name and the pipeline id; ``run`` has
``log_params``, ``log_metrics``, ``log_artifact`` and ``set_tags``, and ``run.parent``, the pipeline's run
(which gets the params of ``params.yaml`` when it is created and the headline numbers from ``summary``).
Each stage run is tagged with the device it ran on and the library versions (``detkd.machine``). On an
exception the run is marked FAILED. With ``DETKD_TRACKING=off`` every call is a no-op (``run.enabled`` is False).

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
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from detkd.errors import ConfigError
from detkd.machine import environment_tags

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

    @property
    def parent(self) -> "_NullRun":
        """The pipeline's parent run (for the headline numbers); a no-op here."""
        return self

    def log_params(self, params: dict) -> None: ...
    def log_metrics(self, metrics: dict, step: Optional[int] = None) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None: ...
    def set_tags(self, tags: dict) -> None: ...
    def log_onnx_model(self, path: str | Path, name: str, registered_model: Optional[str] = None,
                       alias: Optional[str] = None, description: str = "", tags: Optional[dict] = None,
                       score: Optional[float] = None) -> Optional[dict]:
        return None

    def tag_model_versions(self, registered_model: str, pipeline: str, tags: dict) -> int:
        return 0


class _MlflowRun(_NullRun):
    """Logs to MLflow. A call that fails (the server died, the disk of the store filled) prints one
    warning and turns this stage's tracking off: training and the stage's outputs never depend on it."""

    enabled = True

    def __init__(self, client, run_id: str, parent_id: Optional[str] = None, health: Optional[dict] = None):
        self.client, self.run_id, self.parent_id = client, run_id, parent_id
        self.health = health if health is not None else {"broken": False}  # shared with the parent's handle

    @property
    def parent(self) -> "_NullRun":
        """The pipeline's parent run: the summary stage logs the headline numbers there too, so MLflow's runs
        table compares pipelines. Shares this run's client and its fate when tracking fails."""
        if self.parent_id is None:
            return _NullRun()
        return _MlflowRun(self.client, self.parent_id, health=self.health)  # one warning, one switch-off

    def _guard(self, what: str, fn: Callable[[], Any]) -> Any:
        if self.health["broken"]:
            return None
        try:
            return fn()
        except Exception as exc:  # MLflow raises many types (REST, SQLAlchemy, OS, requests)
            self.health["broken"] = True
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            from tqdm import tqdm  # writes above a progress bar rather than into it

            tqdm.write(f"warning: MLflow tracking at {self.client.tracking_uri} failed while {what} ({first}); "
                       "this stage goes on without tracking, its outputs are written as usual", file=sys.stderr)
            return None

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]

        def send():
            for start in range(0, len(items), 100):
                self.client.log_batch(self.run_id, params=items[start : start + 100])
        self._guard("logging params", send)

    def log_metrics(self, metrics: dict, step: Optional[int] = None) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(k.replace("/", "."), float(v), now, step or 0)
            for k, v in flatten(metrics).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        ]

        def send():
            for start in range(0, len(items), 500):
                self.client.log_batch(self.run_id, metrics=items[start : start + 500])
        self._guard("logging metrics", send)

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        if Path(path).exists():
            self._guard(f"uploading {path}", lambda: self.client.log_artifact(self.run_id, str(path), artifact_path))

    def set_tags(self, tags: dict) -> None:
        self._guard("setting tags", lambda: [self.client.set_tag(self.run_id, k, str(v)) for k, v in tags.items()])

    def terminate(self, run_id: str, status: str) -> None:
        self._guard(f"marking the run {status}", lambda: self.client.set_terminated(run_id, status=status))

    def log_onnx_model(self, path: str | Path, name: str, registered_model: Optional[str] = None,
                       alias: Optional[str] = None, description: str = "", tags: Optional[dict] = None,
                       score: Optional[float] = None) -> Optional[dict]:
        """Log ``path`` with MLflow's ONNX flavour and its input/output signature (``detkd.runtime`` contract).
        With ``registered_model``: register it with ``description`` and ``tags`` and move ``alias`` to the new
        version only when its ``score`` (the AP tag) beats the current holder's (``promote_rule``). Returns
        ``{"version", "alias_moved", "reason"}`` for a registered model, else None (also when tracking failed)."""
        import mlflow
        import mlflow.onnx
        import onnx

        def send():
            mlflow.set_tracking_uri(self.client.tracking_uri)
            model = onnx.load(str(path))
            with mlflow.start_run(run_id=self.run_id):
                logged = mlflow.onnx.log_model(model, name=name, registered_model_name=registered_model,
                                               save_as_external_data=False, signature=onnx_signature(model))
            version = getattr(logged, "registered_model_version", None)
            if not registered_model or version is None:
                return None
            version = str(version)
            if description:
                self.client.update_model_version(registered_model, version, description=description)
            for key, value in (tags or {}).items():
                self.client.set_model_version_tag(registered_model, version, key, str(value))
            moved, reason = promote_rule(self.client, registered_model, alias, score) if alias else (False, "no alias")
            if moved:
                self.client.set_registered_model_alias(registered_model, alias, version)
            return {"version": version, "alias_moved": moved, "reason": reason}
        return self._guard(f"logging the ONNX model {path}", send)

    def tag_model_versions(self, registered_model: str, pipeline: str, tags: dict) -> int:
        """Set ``tags`` on the versions of ``registered_model`` that this pipeline registered (their
        ``pipeline_id`` tag); returns how many (0 also when tracking failed)."""
        def send():
            found = self.client.search_model_versions(f"name='{registered_model}' and tags.pipeline_id = '{pipeline}'")
            for version in found:
                for key, value in tags.items():
                    self.client.set_model_version_tag(registered_model, version.version, key, str(value))
            return len(found)
        return self._guard(f"tagging {registered_model}", send) or 0


def onnx_signature(model):
    """MLflow signature of a detkd ONNX file: its inputs and outputs with their dtypes and shapes (-1 for the
    symbolic batch)."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec
    from onnx import helper

    def specs(values):
        out = []
        for value in values:
            tensor = value.type.tensor_type
            shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim)
            out.append(TensorSpec(np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type)), shape, value.name))
        return Schema(out)

    return ModelSignature(inputs=specs(model.graph.input), outputs=specs(model.graph.output))


def promote_rule(client, registered_model: str, alias: str, score: Optional[float]) -> tuple[bool, str]:
    """Whether a new version with AP ``score`` takes ``alias``: when no version holds it, or when ``score``
    beats the holder's ``AP`` tag. Returns (decision, reason)."""
    try:
        holder = client.get_model_version_by_alias(registered_model, alias)
    except Exception:  # no version holds the alias yet
        return True, f"no version held @{alias}"
    held = holder.tags.get("AP")
    if score is None:
        return False, "the new version has no AP"
    if held is None:
        return True, f"version {holder.version} holding @{alias} has no AP tag"
    if score > float(held):
        return True, f"AP {score:.4f} beats version {holder.version}'s {float(held):.4f}"
    return False, f"AP {score:.4f} does not beat version {holder.version}'s {float(held):.4f} (@{alias} stays)"


# Bounds on every MLflow HTTP call (MLflow's own defaults: 120 s per request, 7 retries with exponential
# backoff, several minutes before a dead server surfaces). A user's own settings win.
HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
               "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
PROBE_TIMEOUT_S = 5.0


def check_reachable(uri: str) -> None:
    """For an http(s) tracking URI: ``ConfigError`` in at most ``PROBE_TIMEOUT_S`` seconds, one line naming the
    URI and how to run without tracking, when its server does not answer. Other URIs are local stores."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return  # something answers (a proxy, an older server without /health): MLflow's calls will tell
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ConfigError(f"MLflow tracking server {uri} is not reachable ({reason}); start it, fix "
                          "MLFLOW_TRACKING_URI, or run with DETKD_TRACKING=off") from None


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


# MLflow 3's UI opens an experiment in its GenAI view unless the experiment says it holds model training.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def _experiment_id(client, root: Path) -> str:
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is not None:
        if exp.tags.get("mlflow.experimentKind") is None:  # a store made before detkd set the kind
            client.set_experiment_tag(exp.experiment_id, *next(iter(EXPERIMENT_KIND.items())))
        return exp.experiment_id
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    location = None if uri and not uri.startswith("sqlite:") else (root / "mlartifacts").as_uri()
    try:
        return client.create_experiment(EXPERIMENT, artifact_location=location, tags=EXPERIMENT_KIND)
    except Exception:  # created concurrently by a queued experiment
        return client.get_experiment_by_name(EXPERIMENT).experiment_id


def _parent_run(client, experiment_id: str, pid: str, tags: dict) -> tuple[str, bool]:
    """The run id of the pipeline's parent run, and whether this call created it."""
    found = client.search_runs(
        [experiment_id], filter_string=f"tags.`detkd.pipeline_id` = '{pid}' and tags.`detkd.kind` = 'pipeline'",
        max_results=1,
    )
    if found:
        return found[0].info.run_id, False
    run = client.create_run(experiment_id, run_name=f"pipeline {pid}", tags={**tags, "detkd.kind": "pipeline"})
    return run.info.run_id, True


def pipeline_params(params_file: Path = Path("params.yaml")) -> dict:
    """The pipeline's params (the parent run's params, so pipelines compare in MLflow's runs table)."""
    import yaml

    try:
        data = yaml.safe_load(params_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}  # the stage itself reports a bad params file in one line
    return data if isinstance(data, dict) else {}


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
    for key, value in HTTP_LIMITS.items():
        os.environ.setdefault(key, value)
    check_reachable(uri)
    pid = pipeline_id()
    tags = {
        "detkd.pipeline_id": pid,
        "detkd.git_commit": git_commit(),
        "detkd.dvc_experiment": os.environ.get("DVC_EXP_NAME", ""),
    }
    try:
        with _store_lock(uri):  # the first access creates a SQLite store's schema: one process at a time
            client = MlflowClient(tracking_uri=uri)
            experiment_id = _experiment_id(client, root)
        parent, created = _parent_run(client, experiment_id, pid, tags)
        run = client.create_run(experiment_id, run_name=stage, tags={**tags, **environment_tags(), "detkd.kind": "stage",
                                                                     "detkd.stage": stage, "mlflow.parentRunId": parent})
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ConfigError(f"MLflow tracking at {uri} failed while opening the stage's run ({first}); "
                          "fix the store or MLFLOW_TRACKING_URI, or run with DETKD_TRACKING=off") from None
    handle = _MlflowRun(client, run.info.run_id, parent)
    if created:
        handle.parent.log_params(pipeline_params())
    if params:
        handle.log_params(params)
    with _sigterm_as_exit():
        try:
            yield handle
        except BaseException:
            handle.terminate(run.info.run_id, "FAILED")
            handle.terminate(parent, "FAILED")
            raise
    handle.terminate(run.info.run_id, "FINISHED")
    handle.terminate(parent, "FINISHED")


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """While the stage runs, SIGTERM (``kill``, a job scheduler, ``dvc queue kill``) raises ``SystemExit(143)``
    in the main thread, so the run is marked FAILED instead of being left RUNNING."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
