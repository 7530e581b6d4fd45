"""The backends a benchmark can time here, each as a ``Target``: a callable on a letterboxed batch.

Contract: ``targets(checkpoint, export_entry, backends, threads, eval_ap)`` yields ``(Target | None, label,
reason)`` (onnxruntime and OpenVINO: one target per thread count when ``threads`` is a list): for every requested backend, one ``Target`` per artefact it can run (PyTorch: the checkpoint;
onnxruntime and OpenVINO: every ONNX artefact, FP32, FP16 and INT8, that passed its gate; TensorRT: every
gated engine), else ``None`` and a one-line reason (no CUDA device, no onnxruntime provider, OpenVINO or
TensorRT absent, artefact rejected by its gate). A target's ``backend`` is its row key
(``row_key(backend, precision)``: ``onnxruntime-cpu``, ``openvino-cpu/int8``, ``tensorrt/fp16``...) and
``ap`` is the AP of that exact artefact on that runtime as the export gate measured it (CUDA providers
reuse the CPU-measured AP of the same file). Every target takes the same float32 ``[B, 3, S, S]``
letterboxed batch (what ``deploy/infer.py`` feeds), so PyTorch eager timings include its own
normalisation, RPN/NMS and post-processing, like the graphs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from detkd.errors import DetkdError
from detkd.export.graph import accept_letterboxed
from detkd.models.builder import model_size_mb
from detkd.runtime.onnx_runner import OnnxRunner, available_providers
from detkd.training import load_detector


@dataclass
class Target:
    backend: str  # row key: runtime-device[/precision]
    artefact: str  # the file timed
    precision: str
    size_mb: float
    run: Callable[[np.ndarray], object]
    ap: float = float("nan")
    synchronize: Optional[Callable[[], None]] = None
    max_batch: Optional[int] = None
    threads: Optional[int] = None  # CPU threads of an onnxruntime/OpenVINO session (0 = every core); None: not set here


def row_key(backend: str, precision: str) -> str:
    """Benchmark row key: the backend for FP32, ``<backend>/<precision>`` for reduced precision."""
    return backend if precision == "fp32" else f"{backend}/{precision}"


def split_row_key(key: str) -> tuple[str, str]:
    """``(backend, precision)`` of a row key (inverse of ``row_key``)."""
    backend, _, precision = key.partition("/")
    return backend, precision or "fp32"


def _mb(path: str) -> float:
    return Path(path).stat().st_size / 2**20


def _torch_target(checkpoint: str, device: str, input_size: int, ap: float) -> Target:
    detector, _ = load_detector(checkpoint, torch.device(device))
    accept_letterboxed(detector.eval(), input_size)  # every benchmark input is already letterboxed

    @torch.no_grad()
    def run(batch: np.ndarray):
        return detector(list(torch.from_numpy(batch).to(device)))

    sync = torch.cuda.synchronize if device == "cuda" else None
    return Target(f"torch-{device}", checkpoint, "fp32", model_size_mb(detector), run, ap, sync)


def _onnx_targets(export_entry: dict, backend: str, thread_options: list[int]):
    """onnxruntime (any provider) and OpenVINO targets for every gated ONNX artefact of the entry, one per
    thread count in ``thread_options`` (the benchmark keeps the fastest)."""
    runtime, device = backend.split("-", 1)
    gate_backend = f"{runtime}-cpu"  # where the artefact's AP was measured
    for artefact in export_entry["artefacts"].values():
        precision, path = artefact["precision"], artefact["path"]
        label = row_key(backend, precision)
        if artefact["status"] != "deployable" or gate_backend not in artefact.get("deployable_on", []):
            reason = artefact.get("reason") or f"{Path(path).name} did not pass its accuracy gate on {gate_backend}"
            yield None, label, reason
            continue
        ap = float(artefact["gates"][gate_backend]["metrics"]["AP"])
        for threads in thread_options:
            try:
                if runtime == "openvino":
                    from detkd.runtime.openvino_runner import OpenVINORunner

                    runner = OpenVINORunner(path, threads=threads, precision="f32")
                else:
                    runner = OnnxRunner(path, providers=(device, "cpu") if device != "cpu" else ("cpu",), threads=threads)
            except DetkdError as exc:  # runtime absent (BackendUnavailableError) or file refused
                yield None, label, str(exc)
                break
            yield Target(label, path, precision, _mb(path), runner.infer, ap, threads=threads), label, ""


def targets(checkpoint: str, export_entry: dict, backends: list[str], threads: int | list[int],
            eval_ap: float = float("nan")) -> Iterator[tuple[Optional[Target], str, str]]:
    thread_options = [threads] if isinstance(threads, int) else list(threads)
    for backend in backends:
        if backend == "torch-cpu":
            yield _torch_target(checkpoint, "cpu", export_entry["input_size"], eval_ap), backend, ""
        elif backend == "torch-cuda":
            if torch.cuda.is_available():
                yield _torch_target(checkpoint, "cuda", export_entry["input_size"], eval_ap), backend, ""
            else:
                yield None, backend, "no CUDA device"
        elif backend.startswith("onnxruntime-"):
            provider = backend.split("-", 1)[1]
            if provider not in available_providers():
                yield None, backend, f"onnxruntime here has no {provider} provider (has {', '.join(available_providers())})"
                continue
            yield from _onnx_targets(export_entry, backend, thread_options)
        elif backend == "openvino-cpu":
            from detkd.runtime.openvino_runner import import_openvino

            try:
                import_openvino()
            except DetkdError as exc:
                yield None, backend, str(exc)
                continue
            yield from _onnx_targets(export_entry, backend, thread_options)
        elif backend == "tensorrt":
            engines = {p: e for p, e in export_entry.get("engines", {}).items() if e.get("status") == "deployable"}
            if not engines:
                yield None, backend, "no gated TensorRT engine was built (see reports/export.json 'tensorrt')"
                continue
            from detkd.runtime.trt_runner import TensorRTRunner

            for precision, engine in engines.items():
                runner = TensorRTRunner(engine["path"])
                yield Target(row_key("tensorrt", precision), engine["path"], precision, _mb(engine["path"]), runner.infer,
                             float(engine["metrics"]["AP"]), torch.cuda.synchronize, runner.max_batch), backend, ""
        else:
            yield None, backend, f"unknown backend '{backend}'"
