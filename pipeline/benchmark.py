"""Stage ``benchmark``: latency of every exported artefact (and the PyTorch models) on this machine.

Reads params: benchmark, data.min_box_size. Writes: reports/benchmark.json (the detailed report; headline numbers go to summary.json),
reports/benchmark.md, reports/benchmark.png; all logged to MLflow.
"""

import argparse
import json
from pathlib import Path

import _src  # noqa: F401,I001  (detkd from this checkout's src/, see _src.py)

from detkd.bench.report import write
from detkd.bench.run import run_benchmark
from detkd.cli import parse_named_models, run_main
from detkd.config import load_params
from detkd.io import atomic_write_json
from detkd.tracking.mlflow_run import stage_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", default="data/prepared")
    parser.add_argument("--model", action="append", required=True, metavar="NAME=CHECKPOINT")
    parser.add_argument("--eval", default="reports/eval.json")
    parser.add_argument("--export", default="reports/export.json")
    parser.add_argument("--out", default="reports/benchmark.json")
    args = parser.parse_args()

    params = load_params(args.params)
    checkpoints = parse_named_models(args.model)
    with stage_run("benchmark", {"benchmark": params.benchmark.model_dump(), "models": checkpoints}) as run:
        report = run_benchmark(params, checkpoints, json.loads(Path(args.export).read_text()),
                               json.loads(Path(args.eval).read_text()), args.data)
        out = Path(args.out)
        atomic_write_json(out, report)
        write(report, out.with_suffix(".md"), out.with_suffix(".png"))
        run.log_metrics(report["results"])
        run.set_tags({"detkd.cpu": report["environment"]["cpu"], "detkd.gpu": report["environment"]["gpu"] or "none"})
        for path in (out, out.with_suffix(".md"), out.with_suffix(".png")):
            run.log_artifact(path, "reports")
        print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    run_main(main)
