"""Stage ``frontier``: reports/frontier.{json,md,png}, AP against p50 latency at batch 1 (log axis) for every
artefact the benchmark measured, an arrow from each baseline student to its distilled student, and the
student sizes that ``make frontier`` measured (reports/frontier_sizes.json); logged to MLflow."""

import argparse
import json
from pathlib import Path

import _src  # noqa: F401,I001  (detkd from this checkout's src/, see _src.py)

from detkd.cli import run_main
from detkd.frontier import build_frontier, write
from detkd.tracking.mlflow_run import stage_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--benchmark", default="reports/benchmark.json")
    parser.add_argument("--summary", default="reports/summary.json")
    parser.add_argument("--sizes", default="reports/frontier_sizes.json", help="student sizes from `make frontier`")
    parser.add_argument("--out", default="reports/frontier.json")
    args = parser.parse_args()
    benchmark, summary = (json.loads(Path(p).read_text()) for p in (args.benchmark, args.summary))
    sizes = json.loads(Path(args.sizes).read_text()) if Path(args.sizes).exists() else {"sizes": []}
    with stage_run("frontier") as run:
        report = build_frontier(benchmark, summary, sizes)
        out = Path(args.out)
        write(report, out)
        for suffix in (".json", ".md", ".png"):
            run.log_artifact(out.with_suffix(suffix), "reports")
        print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    run_main(main)
