"""Stage ``evaluate``: COCO box AP (pycocotools) of every trained model on the val split.

Reads params: eval. Writes: reports/eval.json (the detailed report), reports/eval.md, PR curves (reports/pr/, drawn by dvc.yaml's top-level plots).
"""

import argparse
from pathlib import Path

import _src  # noqa: F401,I001  (detkd from this checkout's src/, see _src.py)

from detkd.cli import parse_named_models, run_main
from detkd.config import load_params
from detkd.data.dataset import open_split
from detkd.engine.distributed import DistInfo, pick_device
from detkd.evaluation.report import evaluate_checkpoint, write_reports
from detkd.tracking.mlflow_run import stage_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", default="data/prepared")
    parser.add_argument("--model", action="append", required=True, metavar="NAME=CHECKPOINT")
    parser.add_argument("--out", default="reports/eval.json")
    parser.add_argument("--pr-dir", default="reports/pr")
    args = parser.parse_args()

    models = parse_named_models(args.model)
    params = load_params(args.params)
    with stage_run("evaluate", {"eval": params.eval.model_dump(), "models": models}) as run:
        index = open_split(args.data, "val", params.data.min_box_size)
        device = pick_device(DistInfo())
        results = {name: evaluate_checkpoint(path, index, params.eval.batch_size, device) for name, path in models.items()}
        metrics = write_reports(results, args.out, args.pr_dir)
        for name, m in metrics.items():
            print(f"evaluate: {name}: AP={m['AP']:.3f} AP50={m['AP50']:.3f} AP75={m['AP75']:.3f}")
            run.log_metrics({name: m})
        for path in (args.out, Path(args.out).with_suffix(".md"), Path(args.out).parent / "pr_curves.png",
                     *Path(args.pr_dir).glob("*.json")):
            run.log_artifact(path, "reports")


if __name__ == "__main__":
    run_main(main)
