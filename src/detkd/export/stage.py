"""The ``export`` stage's library half: export, gate, build engines, record, register.

Contract: ``export_models(params, checkpoints, data_dir, reference_ap, out_dir, run)`` exports every
``name -> checkpoint`` to ``out_dir/<name>.onnx``, evaluates it with onnxruntime on the val split, compares
raw outputs with PyTorch on ``export.gate.sample_images`` val images, builds and gates TensorRT engines
where TensorRT and a CUDA GPU exist (else records why not), and returns the report
(``reports/export.json``). ``failures(report)`` lists the gates that failed; the stage writes the report
first and fails afterwards, so the numbers that failed are on disk.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from detkd.config import Params
from detkd.data.dataset import open_split
from detkd.errors import BackendUnavailableError
from detkd.export.gate import Tolerance, ap_gate, compare_outputs, evaluate_runner
from detkd.export.onnx_export import export_onnx, model_info
from detkd.runtime.onnx_runner import OnnxRunner
from detkd.runtime.preprocess import letterbox, read_image
from detkd.runtime.trt_runner import TensorRTRunner, import_tensorrt
from detkd.tracking.mlflow_run import git_commit
from detkd.training import load_detector


def tensorrt_status() -> dict:
    try:
        trt = import_tensorrt()
    except BackendUnavailableError as exc:
        return {"available": False, "reason": str(exc)}
    return {"available": True, "version": trt.__version__, "device": torch.cuda.get_device_name()}


def _calibration_batches(index, info, count: int, batch: int) -> list[np.ndarray]:
    images = [letterbox(read_image(r.path), info)[0] for r in index.images[:count]]
    return [np.stack(images[i:i + batch]) for i in range(0, len(images) - batch + 1, batch)] or [np.stack(images)]


def _gate_artefact(runner, detector, index, sample, reference_ap: float, params: Params, raw: bool, label: str) -> dict:
    gate = params.export.gate
    result = evaluate_runner(runner, index, params.eval.batch_size, description=f"gate {label}")
    entry = {"path": str(runner.path), "metrics": result["metrics"], "ap_gate": ap_gate(reference_ap, result["metrics"]["AP"],
                                                                                       gate.max_ap_drop)}
    outputs = compare_outputs(detector, runner, sample, Tolerance(gate.box_atol, gate.score_atol, gate.max_unmatched))
    if not raw:  # reduced precision: recorded, not gated (the AP gate is)
        outputs["passed"], outputs["gated"] = True, False
    entry["raw_outputs"] = outputs
    entry["passed"] = bool(entry["ap_gate"]["passed"] and outputs["passed"])
    return entry


def export_models(params: Params, checkpoints: dict[str, str], data_dir: str | Path, reference_ap: dict[str, float],
                  out_dir: str | Path, run_id: str = "", log: Callable[[str], None] = print) -> dict:
    out_dir = Path(out_dir)
    index = open_split(data_dir, "val", params.data.min_box_size)
    sample = [read_image(r.path) for r in index.images[: params.export.gate.sample_images]]
    trt_status = tensorrt_status()
    if not trt_status["available"]:
        log(f"export: TensorRT engines skipped: {trt_status['reason']} (recorded in the report; not a failure)")
    report: dict = {"tensorrt": trt_status, "models": {}}
    commit = git_commit()
    for name, checkpoint in checkpoints.items():
        detector, meta = load_detector(checkpoint, torch.device("cpu"))
        info = model_info(detector, meta, commit, run_id)
        onnx_path = out_dir / f"{name}.onnx"
        graph = export_onnx(detector, info, onnx_path, params.export.opset, params.export.simplify)
        entry = {"checkpoint": checkpoint, "family": info.family, "backbone": info.backbone, "input_size": info.input_size,
                 "graph": graph}
        runner = OnnxRunner(onnx_path, providers=("cpu",), threads=params.benchmark.threads)
        entry["onnx"] = _gate_artefact(runner, detector, index, sample, reference_ap[name], params, True, f"{name}.onnx")
        log(f"export: {name}.onnx: AP {entry['onnx']['metrics']['AP']:.4f} vs PyTorch {reference_ap[name]:.4f} "
            f"({'pass' if entry['onnx']['passed'] else 'FAIL'}); raw outputs: {entry['onnx']['raw_outputs']['matched']} "
            f"matched, {entry['onnx']['raw_outputs']['unmatched']} unmatched, max box diff "
            f"{entry['onnx']['raw_outputs']['max_box_diff']:.2g} px")
        entry["engines"] = {}
        if trt_status["available"]:
            from detkd.export.tensorrt_build import build_engine

            trt_cfg = params.export.tensorrt
            for precision in trt_cfg.precisions:
                engine_path = out_dir / f"{name}_{precision}.engine"
                calibration = _calibration_batches(index, info, trt_cfg.calibration_images, trt_cfg.max_batch) \
                    if precision == "int8" else None
                built = build_engine(onnx_path, engine_path, precision, info, trt_cfg.max_batch, calibration,
                                     out_dir / f"{name}_int8.calib", trt_cfg.workspace_gb)
                gate = _gate_artefact(TensorRTRunner(engine_path), detector, index, sample, reference_ap[name], params,
                                      precision == "fp32", engine_path.name)
                entry["engines"][precision] = {**built, **gate}
                log(f"export: {engine_path.name}: AP {gate['metrics']['AP']:.4f} ({'pass' if gate['passed'] else 'FAIL'})")
        report["models"][name] = entry
    return report


def failures(report: dict) -> list[str]:
    out = []
    for name, entry in report["models"].items():
        for label, gate in [("onnx", entry["onnx"]), *[(f"tensorrt {p}", e) for p, e in entry["engines"].items()]]:
            if not gate["passed"]:
                ap, raw = gate["ap_gate"], gate["raw_outputs"]
                out.append(f"{name} {label}: AP {ap['ap']:.4f} vs PyTorch {ap['reference_ap']:.4f} (allowed "
                           f"+-{ap['max_difference']}), raw outputs {raw['unmatched']} of {raw['matched'] + raw['unmatched']} "
                           f"detections unmatched (allowed share {raw['tolerance']['max_unmatched']})")
    return out


def registrable(report: dict, name: str) -> Optional[Path]:
    entry = report["models"].get(name)
    return Path(entry["onnx"]["path"]) if entry and entry["onnx"]["passed"] else None
