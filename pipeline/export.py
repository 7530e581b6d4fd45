"""Stage ``export``: ONNX files per precision (FP32, FP16, INT8) of every model, and TensorRT engines where
possible, each gated on accuracy on every CPU runtime against the PyTorch models' AP from ``evaluate``.

Reads params: export, eval.batch_size, benchmark.threads, data.min_box_size. Writes: models/export/<name>.onnx,
<name>_fp16.onnx, <name>_int8.onnx (+ engines; rejected artefacts under models/export/rejected/),
reports/export.json (the detailed report; written after the files, which are made in a staging directory
and then replace models/export as one set, so a killed export leaves the old set or the new one, never a
mix, and never an old report beside new files), MLflow: the ONNX models (ONNX flavour), the other gated artefacts
and the registered student.
"""

import argparse
from pathlib import Path

import _src  # noqa: F401,I001  (detkd from this checkout's src/, see _src.py)

from detkd.cli import parse_named_models, run_main
from detkd.config import load_params
from detkd.errors import ExportError
from detkd.evaluation.report import read_model_aps
from detkd.export.stage import (deployable_artefacts, export_models, failures, registrable, rejected,
                                relocate_paths)
from detkd.io import atomic_write_json, staged_directory
from detkd.tracking.mlflow_run import git_commit, pipeline_id, stage_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", default="data/prepared")
    parser.add_argument("--model", action="append", required=True, metavar="NAME=CHECKPOINT",
                        help="NAME must be a model in --eval (its PyTorch AP is the gate's reference)")
    parser.add_argument("--eval", default="reports/eval.json")
    parser.add_argument("--out-dir", default="models/export")
    parser.add_argument("--report", default="reports/export.json")
    parser.add_argument("--register", default="distilled", help="model registered in MLflow when its gate passes")
    args = parser.parse_args()

    params = load_params(args.params)
    checkpoints = parse_named_models(args.model)
    reference_ap = read_model_aps(args.eval, list(checkpoints))
    with stage_run("export", {"export": params.export.model_dump(), "models": checkpoints}) as run:
        out_dir = Path(args.out_dir)
        with staged_directory(out_dir) as staging:  # the files and the report are published as one set
            report = relocate_paths(export_models(params, checkpoints, args.data, reference_ap, staging,
                                                  run.run_id or ""), staging, out_dir)
            Path(args.report).unlink(missing_ok=True)  # an old report never describes the new files
        atomic_write_json(args.report, report)
        run.log_metrics({name: {f"{p}_{backend.split('-')[0]}_AP": g["metrics"]["AP"]
                                for p, a in e["artefacts"].items() for backend, g in a.get("gates", {}).items()}
                         | {f"{p}_tensorrt_AP": g["metrics"]["AP"] for p, g in e["engines"].items() if "metrics" in g}
                         for name, e in report["models"].items()})
        run.log_artifact(args.report, "reports")
        run.set_tags({"detkd.tensorrt": "available" if report["tensorrt"]["available"] else report["tensorrt"]["reason"]})
        problems = failures(report)
        if problems:
            raise ExportError("accuracy gate failed: " + "; ".join(problems) + f" (details in {args.report})")
        for line in rejected(report):
            print(f"export: not deployable (failed its gate, kept out of models/export): {line}")
        commit, pipeline = git_commit(), pipeline_id()  # the registry tags (git once, not per model)
        for name, entry in report["models"].items():
            target = registrable(report, name) if name == args.register else None
            tags = {"AP": f"{reference_ap[name]:.4f}", "commit": commit, "method": params.distill.method,
                    "family": entry["family"], "backbone": entry["backbone"], "pipeline_id": pipeline}
            registered = run.log_onnx_model(
                entry["artefacts"]["fp32"]["path"], f"{name}-onnx", params.export.registered_model if target else None,
                params.export.alias, score=reference_ap[name], tags=tags,
                description=(f"detkd {name} ({entry['family']}, {entry['backbone']} backbone, distillation "
                             f"{params.distill.method}): FP32 ONNX, val AP {reference_ap[name]:.4f} in PyTorch, passed "
                             f"its accuracy gate on {', '.join(entry['artefacts']['fp32']['deployable_on'])}"))
            for artefact in deployable_artefacts(entry):
                if artefact["precision"] != "fp32":
                    run.log_artifact(artefact["path"], f"{name}-onnx-{artefact['precision']}")
            for engine in entry["engines"].values():
                if engine.get("status") == "deployable":
                    run.log_artifact(engine["path"], "engines")
            if registered:
                print(f"export: registered {params.export.registered_model} version {registered['version']}; "
                      f"@{params.export.alias} {'moved to it' if registered['alias_moved'] else 'not moved'}: "
                      f"{registered['reason']}")


if __name__ == "__main__":
    run_main(main)
