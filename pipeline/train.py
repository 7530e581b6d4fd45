"""Stages ``train_teacher``, ``train_student`` and (with ``--teacher``) ``distill``: train one detector.

Reads params: seed, model, <role> (backbone and the role's architecture keys), train_<role> (+ distill with
--teacher). With ``--pretrained`` the backbone starts from the pretrain stage's file for the role. Writes: the model checkpoint,
the loss history (CSV for ``dvc plots``, every loss term) and its PNG, and (``--metrics``) the training
cost as JSON (iterations, seconds, s/it, peak memory: CUDA allocator peak, or the process's peak RSS on CPU). Under ``torchrun`` trains with
DistributedDataParallel; only rank 0 writes.
"""

import argparse
from pathlib import Path

import _src  # noqa: F401,I001  (detkd from this checkout's src/, see _src.py)

from detkd.cli import run_main
from detkd.config import load_params
from detkd.engine.distributed import cleanup, init_distributed
from detkd.io import atomic_write_json
from detkd.plots import plot_history, write_history_csv
from detkd.tracking.mlflow_run import stage_run
from detkd.training import train_detector


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--role", choices=["teacher", "student"], required=True)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", default="data/prepared")
    parser.add_argument("--out", required=True)
    parser.add_argument("--history", required=True, help="CSV of the loss curve")
    parser.add_argument("--metrics", default=None, help="JSON of training cost (DVC metrics: s/it, peak memory)")
    parser.add_argument("--state-dir", default=None, help="where resumable training states go")
    parser.add_argument("--teacher", default=None, help="distil the student from this teacher checkpoint")
    parser.add_argument("--pretrained", default=None,
                        help="the pretrain stage's directory: a role without backbone_weights starts from its file there")
    args = parser.parse_args()

    params = load_params(args.params)
    info = init_distributed()
    logged = {
        "seed": params.seed, "model": params.model.model_dump(), args.role: getattr(params, args.role).model_dump(),
        f"train_{args.role}": getattr(params, f"train_{args.role}").model_dump(), "world_size": info.world,
        "architecture": params.detector_config(args.role).model_dump(),  # what the checkpoint's spec will hold
    }
    stage = f"train_{args.role}"
    if args.teacher:
        stage = "distill"
        from detkd.distill.base import resolve_hparams

        family, method = params.model.family, params.distill.method
        logged["distill"] = {"method": method, "teacher": args.teacher,  # every value the method runs with
                             method: resolve_hparams(method, family, params.distill.hparams(family))}
    try:
        with stage_run(stage, logged, rank_zero=info.is_main) as run:
            result = train_detector(
                params, args.role, args.data, args.out, args.state_dir or f"checkpoints/{stage}", info,
                on_log=lambda step, row: run.log_metrics(row, step), run_id=run.run_id, teacher_path=args.teacher,
                pretrained_dir=args.pretrained,
            )
            if info.is_main:
                write_history_csv(args.history, result.history)
                plot_path = str(Path(args.history).with_suffix(".png"))
                plot_history(plot_path, result.history, stage)
                cost = {"iterations": result.iterations, "train_seconds": round(result.seconds, 2),
                        "seconds_per_iter": round(result.seconds_per_iter, 4),
                        "peak_memory_mb": round(result.peak_memory_mb, 1)}
                run.log_metrics(cost)
                if args.metrics:
                    atomic_write_json(args.metrics, cost)
                for path in (args.out, args.history, plot_path):
                    run.log_artifact(path)
                print(f"{stage}: {result.iterations} iterations, {result.seconds:.0f} s "
                      f"({result.seconds_per_iter:.3f} s/it) -> {args.out}")
    finally:
        cleanup(info)


if __name__ == "__main__":
    run_main(main)
