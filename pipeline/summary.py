"""Stage ``summary``: reports/summary.md (teacher, baseline and distilled student: AP, latency per backend,
size, speed-up, targets) and reports/summary.json (the headline numbers, flat, for ``dvc exp show``) from
the evaluate, export and benchmark reports; logged to MLflow."""

import argparse
import json
from pathlib import Path

import _src  # noqa: F401,I001  (detkd from this checkout's src/, see _src.py)

from detkd.cli import run_main
from detkd.config import load_params
from detkd.io import atomic_write_json, atomic_write_text
from detkd.summary import build_summary, headline
from detkd.machine import cpu_name
from detkd.tracking.mlflow_run import pipeline_id, stage_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--eval", default="reports/eval.json")
    parser.add_argument("--export", default="reports/export.json")
    parser.add_argument("--benchmark", default="reports/benchmark.json")
    parser.add_argument("--out", default="reports/summary.md")
    parser.add_argument("--metrics", default="reports/summary.json", help="flat headline numbers (DVC metrics)")
    args = parser.parse_args()
    reports = [json.loads(Path(p).read_text()) for p in (args.eval, args.export, args.benchmark)]
    with stage_run("summary") as run:
        text = build_summary(*reports)
        numbers = headline(*reports)
        atomic_write_text(args.out, text)
        atomic_write_json(args.metrics, numbers)
        run.log_metrics(numbers)
        run.parent.log_metrics(numbers)  # the pipeline's run carries its headline numbers (MLflow compares pipelines)
        if "distilled_p50_ms" in numbers:  # the registered student's latency, where this pipeline registered one
            run.tag_model_versions(load_params(args.params).export.registered_model, pipeline_id(),
                                   {"p50_ms": numbers["distilled_p50_ms"], "p50_measured_on": cpu_name()})
        for path in (args.out, args.metrics):
            run.log_artifact(path, "reports")
        print(text)


if __name__ == "__main__":
    run_main(main)
