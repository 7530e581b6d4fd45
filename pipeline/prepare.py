"""Stage ``prepare``: generate the synthetic dataset (or validate a COCO directory) and its manifest.

Reads params: seed, data. Writes: the prepared data directory, a preview contact sheet.
"""

import argparse

import _src  # noqa: F401,I001  (detkd from this checkout's src/, see _src.py)

from detkd.cli import run_main
from detkd.config import load_params
from detkd.data.dataset import open_split
from detkd.data.prepare import prepare_dataset
from detkd.data.preview import write_preview
from detkd.tracking.mlflow_run import stage_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default="data/prepared")
    parser.add_argument("--preview", default="reports/data_preview.png")
    args = parser.parse_args()

    params = load_params(args.params)
    with stage_run("prepare", {"seed": params.seed, "data": params.data.model_dump()}) as run:
        manifest = prepare_dataset(args.out, params.data, params.seed)
        write_preview(open_split(args.out, "val", params.data.min_box_size), args.preview)
        for split, stats in manifest["stats"].items():
            print(f"prepare: {split}: " + ", ".join(f"{k}={v}" for k, v in stats.items()))
        run.log_metrics({f"data.{split}": stats for split, stats in manifest["stats"].items()})
        run.log_artifact(f"{args.out}/dataset.json")
        run.log_artifact(args.preview)


if __name__ == "__main__":
    run_main(main)
