"""The ``export`` stage's library half: export, quantize, gate, build engines, record.

Contract: ``export_models(params, checkpoints, data_dir, reference_ap, out_dir, run_id)`` writes, for every
``name -> checkpoint``, one ONNX artefact per ``export.precisions``: ``out_dir/<name>.onnx`` (FP32),
``<name>_fp16.onnx`` (ModelOpt AutoCast) and ``<name>_int8.onnx`` (ModelOpt Q/DQ, calibrated on
``export.quantize.calibration_images`` *train*-split images). Each artefact is gated on every CPU runtime of
``export.gate.runtimes`` (onnxruntime, OpenVINO with f32 inference precision): COCO AP on the val split
within ``export.gate.max_ap_drop[precision]`` of the PyTorch model's, and the raw outputs compared with
PyTorch on ``export.gate.sample_images`` val images (gated for FP32, recorded for FP16/INT8, whose boxes
move by design). TensorRT engines are built from every kept artefact where TensorRT and a CUDA GPU exist
(else the report says why not) and gated the same way.

Outcomes, per artefact: ``deployable`` (passed on at least one runtime; ``deployable_on`` lists which),
``rejected`` (failed everywhere: its numbers stay in the report, the file moves to ``out_dir/rejected/``
so that the deployment set holds only gated files, and the stage says which) or ``skipped`` (ModelOpt or
OpenVINO absent: the reason is recorded). The FP32 file must pass on every runtime; ``failures(report)``
lists where it did not, and the stage fails after writing the report, so the numbers are on disk.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, Optional

import torch

from detkd.config import Params
from detkd.data.dataset import open_split
from detkd.engine.checkpoint import check_same_classes, load_model_checkpoint
from detkd.errors import BackendUnavailableError, DetkdError
from detkd.export.gate import Tolerance, ap_gate, compare_outputs, evaluate_runner
from detkd.export.onnx_export import export_onnx, model_info
from detkd.runtime.metadata import ModelInfo
from detkd.runtime.preprocess import read_image
from detkd.runtime.trt_runner import TensorRTRunner, import_tensorrt
from detkd.tracking.mlflow_run import git_commit
from detkd.training import load_detector

RUNTIME_BACKENDS = {"onnxruntime": "onnxruntime-cpu", "openvino": "openvino-cpu"}


def artefact_path(out_dir: Path, name: str, precision: str) -> Path:
    return out_dir / (f"{name}.onnx" if precision == "fp32" else f"{name}_{precision}.onnx")


def tensorrt_status() -> dict:
    try:
        trt = import_tensorrt()
    except BackendUnavailableError as exc:
        return {"available": False, "reason": str(exc)}
    return {"available": True, "version": trt.__version__, "device": torch.cuda.get_device_name()}


def _open_cpu_runner(runtime: str, path: Path, threads: int):
    if runtime == "openvino":
        from detkd.runtime.openvino_runner import OpenVINORunner

        return OpenVINORunner(path, threads=threads, precision="f32")
    from detkd.runtime.onnx_runner import OnnxRunner

    return OnnxRunner(path, providers=("cpu",), threads=threads)


def gate_artefact(runner, detector, index, sample, reference_ap: float, params: Params, precision: str,
                  label: str) -> dict:
    """AP gate (tolerance of ``precision``) and raw-output comparison of one artefact on one runtime."""
    gate = params.export.gate
    result = evaluate_runner(runner, index, params.eval.batch_size, description=f"gate {label}")
    entry = {"path": str(runner.path), "backend": runner.backend, "metrics": result["metrics"],
             "ap_gate": ap_gate(reference_ap, result["metrics"]["AP"], getattr(gate.max_ap_drop, precision))}
    outputs = compare_outputs(detector, runner, sample, Tolerance(gate.box_atol, gate.score_atol, gate.max_unmatched))
    outputs["gated"] = precision == "fp32"  # reduced precision moves boxes by design: recorded; its AP is gated
    if not outputs["gated"]:
        outputs["passed"] = True
    if getattr(runner, "precision_hint", None):
        entry["inference_precision"] = runner.precision_hint
    entry["raw_outputs"] = outputs
    entry["passed"] = bool(entry["ap_gate"]["passed"] and outputs["passed"])
    return entry


def _make_artefact(precision: str, fp32_path: Path, path: Path, calibration) -> dict:
    from detkd.export.quantize import convert_fp16, quantize_int8

    if precision == "fp16":
        return convert_fp16(fp32_path, path)
    return quantize_int8(fp32_path, path, calibration())


def _gate_everywhere(path: Path, precision: str, detector, index, sample, reference_ap: float, params: Params,
                     log: Callable[[str], None]) -> dict:
    gates, skipped = {}, {}
    for runtime in params.export.gate.runtimes:
        backend = RUNTIME_BACKENDS[runtime]
        try:
            runner = _open_cpu_runner(runtime, path, params.benchmark.threads)
        except BackendUnavailableError as exc:
            skipped[backend] = str(exc)
            log(f"export: {path.name} not gated on {backend}: {exc}")
            continue
        gates[backend] = gate_artefact(runner, detector, index, sample, reference_ap, params, precision,
                                       f"{path.name} {backend}")
        g = gates[backend]
        raw = g["raw_outputs"]
        log(f"export: {path.name} on {backend}: AP {g['metrics']['AP']:.4f} vs PyTorch {reference_ap:.4f} "
            f"(allowed +-{g['ap_gate']['max_difference']}: {'pass' if g['passed'] else 'FAIL'}); raw outputs "
            f"{raw['matched']} matched, {raw['unmatched']} unmatched, {raw['tied']} tied"
            f"{'' if raw['gated'] else ' (recorded)'}")
    return {"gates": gates, "not_gated": skipped}


def export_models(params: Params, checkpoints: dict[str, str], data_dir: str | Path, reference_ap: dict[str, float],
                  out_dir: str | Path, run_id: str = "", log: Callable[[str], None] = print) -> dict:
    out_dir = Path(out_dir)
    index = open_split(data_dir, "val", params.data.min_box_size)
    for checkpoint in checkpoints.values():  # every model before any file is written
        check_same_classes(checkpoint, load_model_checkpoint(checkpoint)[1], index.category_ids, "the val split")
    sample = [read_image(r.path) for r in index.images[: params.export.gate.sample_images]]
    trt_status = tensorrt_status()
    if not trt_status["available"]:
        log(f"export: TensorRT engines skipped: {trt_status['reason']} (recorded in the report; not a failure)")
    report: dict = {"tensorrt": trt_status, "precisions": list(params.export.precisions), "models": {}}
    commit = git_commit()
    calibration_cache: dict[int, object] = {}
    for name, checkpoint in checkpoints.items():
        detector, meta = load_detector(checkpoint, torch.device("cpu"))
        info = model_info(detector, meta, commit, run_id)
        fp32_path = artefact_path(out_dir, name, "fp32")
        graph = export_onnx(detector, info, fp32_path, params.export.opset, params.export.simplify)
        entry = {"checkpoint": checkpoint, "family": info.family, "backbone": info.backbone, "input_size": info.input_size,
                 "graph": graph, "artefacts": {}, "engines": {}}

        def calibration(info=info):
            if info.input_size not in calibration_cache:
                from detkd.export.quantize import calibration_set

                train = open_split(data_dir, "train", params.data.min_box_size)
                calibration_cache[info.input_size] = calibration_set(train, info, params.export.quantize.calibration_images)
            return calibration_cache[info.input_size]

        for precision in params.export.precisions:
            path = artefact_path(out_dir, name, precision)
            record: dict = {"path": str(path), "precision": precision}
            if precision == "fp32":
                record["made"] = graph
            else:
                try:
                    record["made"] = _make_artefact(precision, fp32_path, path, calibration)
                except BackendUnavailableError as exc:
                    entry["artefacts"][precision] = {**record, "status": "skipped", "reason": str(exc)}
                    log(f"export: {path.name} skipped: {exc}")
                    continue
                log(f"export: {path.name} made in {record['made']['seconds']:.1f} s "
                    f"({record['made']['size_mb']:.1f} MB, {record['made']['quantize_nodes']} Q / "
                    f"{record['made']['dequantize_nodes']} DQ nodes, {record['made']['cast_nodes']} casts)")
            record.update(_gate_everywhere(path, precision, detector, index, sample, reference_ap[name], params, log))
            entry["artefacts"][precision] = settle(record, out_dir, log)
        if trt_status["available"]:
            _build_engines(entry, name, info, detector, index, sample, reference_ap[name], params, out_dir, log)
        report["models"][name] = entry
    return report


def relocate_paths(report, staging: Path, final: Path):
    """``report`` with every ``"path"`` under ``staging`` rewritten to the same place under ``final`` (the
    stage writes its files into a staging directory and publishes them as ``final``)."""
    if isinstance(report, list):
        return [relocate_paths(v, staging, final) for v in report]
    if not isinstance(report, dict):
        return report
    out = {}
    for key, value in report.items():
        if key == "path" and isinstance(value, str) and Path(value).is_relative_to(staging):
            value = str(final / Path(value).relative_to(staging))
        out[key] = relocate_paths(value, staging, final)
    return out


def settle(record: dict, out_dir: Path, log: Callable[[str], None] = print) -> dict:
    """Decide an artefact's fate from its gates: ``deployable`` on the runtimes it passed on, else
    ``rejected``; a rejected FP16/INT8 file moves to ``out_dir/rejected/`` (the FP32 one stays: its failure
    fails the stage)."""
    record["deployable_on"] = [b for b, g in record["gates"].items() if g["passed"]]
    record["status"] = "deployable" if record["deployable_on"] else "rejected"
    path = Path(record["path"])
    if record["status"] == "rejected" and record["precision"] != "fp32":
        target = out_dir / "rejected" / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(path), target)
        record["path"] = str(target)
        aps = ", ".join(f"{b} AP {g['metrics']['AP']:.4f} vs {g['ap_gate']['reference_ap']:.4f}"
                        for b, g in record["gates"].items())
        log(f"export: {path.name} REJECTED: failed its accuracy gate on every runtime ({aps}); moved to "
            f"rejected/{path.name}; the FP32 file stays deployable")
    return record


def _build_engines(entry: dict, name: str, info: ModelInfo, detector, index, sample, reference_ap: float,
                   params: Params, out_dir: Path, log: Callable[[str], None]) -> None:
    from detkd.export.tensorrt_build import build_engine

    trt_cfg = params.export.tensorrt
    for precision, artefact in entry["artefacts"].items():
        if artefact["status"] != "deployable":
            continue
        engine_path = out_dir / f"{name}_{precision}.engine"
        try:
            built = build_engine(artefact["path"], engine_path, precision, info, trt_cfg.max_batch, trt_cfg.workspace_gb)
        except DetkdError as exc:
            entry["engines"][precision] = {"path": str(engine_path), "precision": precision, "passed": False,
                                           "status": "rejected", "reason": str(exc)}
            log(f"export: {engine_path.name} not built: {exc}")
            continue
        gate = gate_artefact(TensorRTRunner(engine_path), detector, index, sample, reference_ap, params, precision,
                             engine_path.name)
        entry["engines"][precision] = {**built, **gate, "status": "deployable" if gate["passed"] else "rejected"}
        log(f"export: {engine_path.name} (TensorRT {built['tensorrt_version']}): AP {gate['metrics']['AP']:.4f} "
            f"({'pass' if gate['passed'] else 'FAIL'})")


def failures(report: dict) -> list[str]:
    """The FP32 gates that failed (ONNX on each CPU runtime, the FP32 engine): these fail the stage."""
    out = []
    for name, entry in report["models"].items():
        fp32 = entry["artefacts"]["fp32"]
        gates = [(f"{Path(fp32['path']).name} on {b}", g) for b, g in fp32["gates"].items()]
        if "fp32" in entry["engines"] and "ap_gate" in entry["engines"]["fp32"]:
            gates.append((f"{name}_fp32.engine", entry["engines"]["fp32"]))
        for label, gate in gates:
            if not gate["passed"]:
                ap, raw = gate["ap_gate"], gate["raw_outputs"]
                out.append(f"{label}: AP {ap['ap']:.4f} vs PyTorch {ap['reference_ap']:.4f} (allowed "
                           f"+-{ap['max_difference']}), raw outputs {raw['unmatched']} of "
                           f"{raw['matched'] + raw['unmatched'] + raw.get('tied', 0)} "
                           f"detections unmatched (allowed share {raw['tolerance']['max_unmatched']})")
    return out


def rejected(report: dict) -> list[str]:
    """Reduced-precision artefacts and engines that failed their gates (recorded, not deployed)."""
    out = []
    for name, entry in report["models"].items():
        for precision, a in entry["artefacts"].items():
            if precision != "fp32" and a["status"] == "rejected":
                aps = ", ".join(f"{b} AP {g['metrics']['AP']:.4f}" for b, g in a["gates"].items())
                out.append(f"{name} {precision} ({aps}; allowed drop {next(iter(a['gates'].values()))['ap_gate']['max_difference']})")
        out += [f"{name} TensorRT {p}" for p, e in entry["engines"].items() if e.get("status") == "rejected"]
    return out


def deployable_artefacts(entry: dict) -> list[dict]:
    """The entry's kept ONNX artefacts (FP32 first), each with ``deployable_on``."""
    return [a for a in entry["artefacts"].values() if a["status"] == "deployable"]


def registrable(report: dict, name: str) -> Optional[Path]:
    """The FP32 ONNX file of ``name`` when it passed on every gated runtime (what the registry gets)."""
    entry = report["models"].get(name)
    if not entry:
        return None
    fp32 = entry["artefacts"]["fp32"]
    return Path(fp32["path"]) if fp32["gates"] and all(g["passed"] for g in fp32["gates"].values()) else None
