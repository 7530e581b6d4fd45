"""The backends a benchmark can time here, each as a ``Target``: a callable on a letterboxed batch.

Contract: ``targets(name, checkpoint, export_entry, backends, threads)`` yields ``(Target | None, backend,
reason)`` for every requested backend: a ``Target`` when it can run on this machine, else ``None`` and a
one-line reason (no CUDA device, no onnxruntime provider, TensorRT absent, no engine built). Every
target takes the same float32 ``[B, 3, S, S]`` letterboxed batch (what ``deploy/infer.py`` feeds), so
PyTorch eager timings include its own normalisation, RPN/NMS and post-processing, like the graphs.
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
    backend: str
    artefact: str  # the file timed
    precision: str
    size_mb: float
    run: Callable[[np.ndarray], object]
    synchronize: Optional[Callable[[], None]] = None
    max_batch: Optional[int] = None


def _torch_target(checkpoint: str, device: str, input_size: int) -> Target:
    detector, _ = load_detector(checkpoint, torch.device(device))
    accept_letterboxed(detector.eval(), input_size)  # every benchmark input is already letterboxed

    @torch.no_grad()
    def run(batch: np.ndarray):
        return detector(list(torch.from_numpy(batch).to(device)))

    sync = torch.cuda.synchronize if device == "cuda" else None
    return Target(f"torch-{device}", checkpoint, "fp32", model_size_mb(detector), run, sync)


def targets(checkpoint: str, export_entry: dict, backends: list[str], threads: int) -> Iterator[tuple[Optional[Target], str, str]]:
    onnx_path = export_entry["onnx"]["path"]
    for backend in backends:
        if backend == "torch-cpu":
            yield _torch_target(checkpoint, "cpu", export_entry["input_size"]), backend, ""
        elif backend == "torch-cuda":
            if torch.cuda.is_available():
                yield _torch_target(checkpoint, "cuda", export_entry["input_size"]), backend, ""
            else:
                yield None, backend, "no CUDA device"
        elif backend.startswith("onnxruntime-"):
            provider = backend.split("-", 1)[1]
            if provider not in available_providers():
                yield None, backend, f"onnxruntime here has no {provider} provider (has {', '.join(available_providers())})"
                continue
            try:
                runner = OnnxRunner(onnx_path, providers=(provider, "cpu") if provider != "cpu" else ("cpu",), threads=threads)
            except DetkdError as exc:
                yield None, backend, str(exc)
                continue
            yield Target(backend, onnx_path, "fp32", Path(onnx_path).stat().st_size / 2**20, runner.infer), backend, ""
        elif backend == "tensorrt":
            engines = export_entry.get("engines", {})
            if not engines:
                yield None, backend, "no TensorRT engine was built (see reports/export.json 'tensorrt')"
                continue
            from detkd.runtime.trt_runner import TensorRTRunner

            for precision, engine in engines.items():
                runner = TensorRTRunner(engine["path"])
                yield Target(f"tensorrt-{precision}", engine["path"], precision, Path(engine["path"]).stat().st_size / 2**20,
                             runner.infer, torch.cuda.synchronize, runner.max_batch), backend, ""
        else:
            yield None, backend, f"unknown backend '{backend}'"
