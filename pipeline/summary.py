"""Stage ``summary``: reports/summary.md (teacher, baseline and distilled student: AP, latency per backend,
size, speed-up) from the evaluate, export and benchmark reports; logged to MLflow."""

import argparse
import json
from pathlib import Path

from detkd.cli import run_main
from detkd.io import atomic_write_text
from detkd.summary import build_summary
from detkd.tracking.mlflow_run import stage_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--eval", default="reports/eval.json")
    parser.add_argument("--export", default="reports/export.json")
    parser.add_argument("--benchmark", default="reports/benchmark.json")
    parser.add_argument("--out", default="reports/summary.md")
    args = parser.parse_args()
    reports = [json.loads(Path(p).read_text()) for p in (args.eval, args.export, args.benchmark)]
    with stage_run("summary") as run:
        text = build_summary(*reports)
        atomic_write_text(args.out, text)
        run.log_artifact(args.out, "reports")
        print(text)


if __name__ == "__main__":
    run_main(main)
