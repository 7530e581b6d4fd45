"""``make smoke``: run the real ``dvc.yaml`` end to end on a tiny override, in a throw-away copy.

The copy gets the repository's ``dvc.yaml``, ``pipeline/``, ``src/`` and a ``params.yaml`` with the
``SMOKE_OVERRIDES`` merged in, its own git + DVC repository and its own MLflow store, so neither the
user's workspace nor their tracking store is touched. Checks: every stage ran and wrote its outputs,
``reports/eval.json`` holds AP for every model, MLflow holds one linked stage run per stage, and a second
``dvc repro`` has nothing to do.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import yaml

from detkd.config import deep_merge, parse_params

SMOKE_OVERRIDES = {
    "data": {"synthetic": {"num_train": 12, "num_val": 6, "image_size": 64, "max_object_size": 30.0, "max_objects": 4,
                           "num_classes": 4}},
    "pretrain": {"iterations": 2, "batch_size": 4, "image_size": 32, "workers": 0},
    "model": {"min_size": 64, "max_size": 64},
    "teacher": {"backbone": "resnet18", "fpn_channels": 32,
                "fasterrcnn": {"representation_size": 64, "rpn_post_nms_top_n_train": 100, "box_batch_size_per_image": 32}},
    "student": {"backbone": "mobilenet_v3_small", "fpn_channels": 16,
                "fasterrcnn": {"representation_size": 32, "rpn_post_nms_top_n_train": 100, "box_batch_size_per_image": 32}},
    "train_teacher": {"epochs": 1, "batch_size": 4, "warmup_iters": 1, "checkpoint_every": 2, "log_every": 1},
    "train_student": {"epochs": 1, "batch_size": 4, "warmup_iters": 1, "checkpoint_every": 2, "log_every": 1},
    "eval": {"batch_size": 4},
    "export": {"gate": {"sample_images": 2}, "quantize": {"calibration_images": 8}, "tensorrt": {"max_batch": 2}},
    "benchmark": {"batch_sizes": [1, 2], "warmup": 1, "warmup_seconds": 0.0, "iterations": 2, "rounds": 2},
}


def _run(cmd: list[str], cwd: Path, env: dict) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout + proc.stderr


def stage_names(repo: Path) -> list[str]:
    return list(yaml.safe_load((repo / "dvc.yaml").read_text())["stages"])


def run_smoke(repo: Path, workdir: Path, extra_overrides: Optional[dict] = None) -> dict:
    """Build the throw-away copy in ``workdir`` and run the checks; return a summary (raises on failure)."""
    for name in ("dvc.yaml", "pipeline", "src"):
        src = repo / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, workdir / name,
                                                              **({"ignore": shutil.ignore_patterns("__pycache__")} if src.is_dir() else {}))
    raw = deep_merge(yaml.safe_load((repo / "params.yaml").read_text()), SMOKE_OVERRIDES)
    raw = deep_merge(raw, extra_overrides or {})
    parse_params(raw, "smoke params")  # fail fast on a bad override
    (workdir / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    (workdir / "reports").mkdir(exist_ok=True)
    (workdir / "reports" / "frontier_sizes.json").write_text('{"sizes": []}\n')  # no `make frontier` here

    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'smoke-mlflow.db'}", "DETKD_PIPELINE_ID": "smoke",
           "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "smoke", "GIT_AUTHOR_EMAIL": "smoke@localhost",
           "GIT_COMMITTER_NAME": "smoke", "GIT_COMMITTER_EMAIL": "smoke@localhost"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    _run(["git", "init", "-q"], workdir, env)
    _run(["dvc", "init", "-q"], workdir, env)
    shutil.copytree(repo / ".dvc" / "plots", workdir / ".dvc" / "plots")  # the plot templates dvc.yaml names
    (workdir / ".gitignore").write_text("smoke-mlflow.db\nmlartifacts/\ncheckpoints/\n")
    _run(["git", "add", "-A"], workdir, env)
    _run(["git", "commit", "-q", "-m", "smoke"], workdir, env)

    t0 = time.perf_counter()
    log = _run(["dvc", "repro"], workdir, env)
    first = time.perf_counter() - t0
    eval_json = json.loads((workdir / "reports" / "eval.json").read_text())
    t0 = time.perf_counter()
    second_log = _run(["dvc", "repro"], workdir, env)
    second = time.perf_counter() - t0
    status = _run(["dvc", "status"], workdir, env)
    return {"workdir": str(workdir), "eval": eval_json, "first_seconds": first, "second_seconds": second,
            "second_log": second_log, "status": status, "log": log, "stages": stage_names(workdir),
            "tracking_uri": env["MLFLOW_TRACKING_URI"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repo", default=".", help="repository whose dvc.yaml/pipeline/src to run")
    parser.add_argument("--family", choices=["fasterrcnn", "retinanet"], default=None)
    parser.add_argument("--keep", action="store_true", help="keep the throw-away copy for inspection")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="detkd-smoke-"))
    extra = {"model": {"family": args.family}} if args.family else None
    try:
        summary = run_smoke(Path(args.repo).resolve(), workdir, extra)
        for name, metrics in summary["eval"].items():
            print(f"smoke: {name}: AP={metrics['AP']:.3f}")
        print(f"smoke: dvc repro {summary['first_seconds']:.0f} s; second dvc repro {summary['second_seconds']:.1f} s "
              f"({summary['status'].strip().splitlines()[-1]})")
    finally:
        if args.keep:
            print(f"smoke: kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
