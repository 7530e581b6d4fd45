"""TensorRT engines from the exported ONNX file: FP32, FP16 and INT8 (entropy calibration on val images).

Contract: ``build_engine(onnx_path, engine_path, precision, info, max_batch, calibration_batches,
cache_path)`` parses the ONNX file with TensorRT's parser, builds a serialised engine for batch sizes
1..``max_batch`` (optimisation profile on ``images``) and writes it atomically with its sidecar
(``detkd.runtime.metadata.engine_sidecar``). INT8 uses ``IInt8EntropyCalibrator2`` fed by
``calibration_batches`` (letterboxed float32 arrays) and reuses/writes ``cache_path``. TensorRT is
imported lazily: ``import_tensorrt`` raises ``BackendUnavailableError`` where it is absent, which the
export stage records instead of failing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from detkd.errors import ExportError
from detkd.io import atomic_path, atomic_write_text
from detkd.runtime.metadata import ModelInfo, engine_sidecar
from detkd.runtime.trt_runner import import_tensorrt, this_machine

PRECISIONS = ("fp32", "fp16", "int8")


def _calibrator(trt, batches: list[np.ndarray], cache_path: Path):
    import torch

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            super().__init__()
            self.batches, self.position, self.device_batch = batches, 0, None

        def get_batch_size(self) -> int:
            return int(self.batches[0].shape[0])

        def get_batch(self, names):
            if self.position >= len(self.batches):
                return None
            self.device_batch = torch.from_numpy(self.batches[self.position]).cuda()
            self.position += 1
            return [int(self.device_batch.data_ptr())]

        def read_calibration_cache(self):
            return cache_path.read_bytes() if cache_path.is_file() else None

        def write_calibration_cache(self, cache) -> None:
            with atomic_path(cache_path) as tmp:
                tmp.write_bytes(bytes(cache))

    return EntropyCalibrator()


def build_engine(onnx_path: str | Path, engine_path: str | Path, precision: str, info: ModelInfo, max_batch: int,
                 calibration_batches: Optional[Iterable[np.ndarray]] = None, cache_path: Optional[str | Path] = None,
                 workspace_gb: float = 4.0) -> dict:
    if precision not in PRECISIONS:
        raise ExportError(f"export.tensorrt.precisions: unknown precision '{precision}'; choose from {', '.join(PRECISIONS)}")
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"{onnx_path}: TensorRT's ONNX parser rejected the graph: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * 2**30))
    s = info.input_size
    profile = builder.create_optimization_profile()
    profile.set_shape("images", (1, 3, s, s), (max(1, max_batch // 2), 3, s, s), (max_batch, 3, s, s))
    config.add_optimization_profile(profile)
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    calibrator = None
    if precision == "int8":
        batches = list(calibration_batches or [])
        if not batches:
            raise ExportError("INT8 needs calibration images (export.tensorrt.calibration_images > 0)")
        config.set_flag(trt.BuilderFlag.INT8)
        calibrator = _calibrator(trt, batches, Path(cache_path or f"{engine_path}.calib"))
        config.int8_calibrator = calibrator
        config.set_calibration_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"{onnx_path}: TensorRT could not build a {precision} engine (see its log above)")
    with atomic_path(engine_path) as tmp:
        tmp.write_bytes(bytes(serialized))
    machine = this_machine(trt.__version__)
    sidecar = {**machine, "precision": precision, "max_batch": max_batch, "source": str(onnx_path),
               "metadata": info.to_metadata()}
    atomic_write_text(engine_sidecar(engine_path), json.dumps(sidecar, indent=2, sort_keys=True) + "\n")
    return {"precision": precision, "size_mb": Path(engine_path).stat().st_size / 2**20, **machine}
