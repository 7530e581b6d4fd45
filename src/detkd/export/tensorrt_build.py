"""TensorRT engines from the precision-carrying ONNX files: strongly typed networks, no precision flags.

TensorRT 11 removed the weak-typing API (the builder's precision flags and INT8 calibration): precision
now travels in the ONNX file. The export stage makes
``<model>_fp16.onnx`` (ModelOpt AutoCast) and ``<model>_int8.onnx`` (ModelOpt Q/DQ), and this module
builds each into ``<model>_<precision>.engine`` exactly as typed, on TensorRT 11 (where every network is
strongly typed) and on TensorRT 10 (where the ``STRONGLY_TYPED`` creation flag asks for the same).

Contract: ``build_engine(onnx_path, engine_path, precision, info, max_batch, workspace_gb)`` parses the
ONNX file with TensorRT's parser, builds a serialised engine for batch sizes 1..``max_batch``
(optimisation profile on ``images``) and writes it atomically with its sidecar
(``detkd.runtime.metadata.engine_sidecar``): TensorRT version and major, GPU, compute capability,
precision, ``strongly_typed``, largest batch, source file and the export metadata. TensorRT is imported
lazily: ``import_tensorrt`` raises ``BackendUnavailableError`` where it or a CUDA device is absent, which
the export stage records instead of failing. TensorRT before 10 is refused with the reason.
"""

from __future__ import annotations

import json
from pathlib import Path

from detkd.errors import BackendUnavailableError, ExportError
from detkd.io import atomic_path, atomic_write_text
from detkd.runtime.metadata import ModelInfo, engine_sidecar
from detkd.runtime.trt_runner import import_tensorrt, this_machine, tensorrt_major

PRECISIONS = ("fp32", "fp16", "int8")  # what the ONNX file carries; the build adds none


def network_flags(trt) -> int:
    """Creation flags of a strongly typed network: 0 on TensorRT 11 (always strongly typed), the
    ``STRONGLY_TYPED`` bit on TensorRT 10."""
    major = tensorrt_major(trt.__version__)
    if major >= 11:
        return 0
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None) if major == 10 else None
    if flag is None:
        raise BackendUnavailableError(f"TensorRT {trt.__version__} cannot build strongly typed networks from "
                                      "precision-carrying ONNX files; detkd needs TensorRT 10 or later")
    return 1 << int(flag)


def build_engine(onnx_path: str | Path, engine_path: str | Path, precision: str, info: ModelInfo, max_batch: int,
                 workspace_gb: float = 4.0) -> dict:
    if precision not in PRECISIONS:
        raise ExportError(f"export.precisions: unknown precision '{precision}'; choose from {', '.join(PRECISIONS)}")
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
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
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"{onnx_path}: TensorRT could not build a {precision} engine (see its log above)")
    with atomic_path(engine_path) as tmp:
        tmp.write_bytes(bytes(serialized))
    machine = this_machine(trt.__version__)
    sidecar = {**machine, "precision": precision, "strongly_typed": True, "max_batch": max_batch,
               "source": Path(onnx_path).name, "metadata": info.to_metadata()}  # the ONNX file beside the engine
    atomic_write_text(engine_sidecar(engine_path), json.dumps(sidecar, indent=2, sort_keys=True) + "\n")
    return {"precision": precision, "size_mb": Path(engine_path).stat().st_size / 2**20, "strongly_typed": True,
            "source": Path(onnx_path).name, **machine}
