"""Reduced-precision ONNX artefacts made with NVIDIA ModelOpt: INT8 with explicit Q/DQ nodes, FP16 with AutoCast.

Precision travels inside the file (TensorRT 11 builds strongly typed networks and has no precision flags),
so the same ``<model>_int8.onnx`` / ``<model>_fp16.onnx`` runs on onnxruntime and OpenVINO on a CPU and
becomes a TensorRT engine on a GPU.

Contract:
- Only the convolutional network and the heads change precision: the nodes that ``network_nodes`` finds
  (ONNX names under ``NETWORK_SCOPES``, the exporter's names for the backbone + FPN, the RPN or RetinaNet
  head and the RoI box head and predictor). Box decoding, TopK, NMS, RoI pooling and the output-slot
  arithmetic stay FP32: measured on the default distilled student, ModelOpt's default scope took AP from
  0.507 to 0.455, this scope to 0.505.
- ``quantize_int8(src, dst, calibration, method)``: ModelOpt ONNX post-training quantization of the
  ``QUANTIZED_OPS`` in that scope, INT8 weights (stored as INT8, dequantized in the graph) and activations
  with zero zero-points (what TensorRT requires), calibrated on ``calibration``
  (float32 ``[N, 3, S, S]``, letterboxed train-split images), the unquantized rest kept FP32 so that CPU
  runtimes run it.
- ``convert_fp16(src, dst)``: ModelOpt AutoCast of the same scope to FP16, inputs and outputs FP32.
- Both copy ``src``'s detkd metadata into ``dst``, check the result with ``onnx.checker`` and the static
  TensorRT check, write ``dst`` atomically and return facts about the conversion.
- ``import_modelopt()`` raises ``BackendUnavailableError`` (with the install command) where ModelOpt or
  its ONNX dependencies are missing; the export stage records that and keeps the FP32 file.
- ``calibration_set(index, info, count)``: ``count`` letterboxed images of a split as one array; too few
  images, an unreadable one or a zero count is a one-line ``ExportError``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import time
from pathlib import Path

import numpy as np

from detkd.errors import BackendUnavailableError, DetkdError, ExportError
from detkd.io import atomic_path

NETWORK_SCOPES = ("backbone", "head", "box_head", "box_predictor")
# INT8 ops: the compute. Elementwise ops (normalisation affine Mul/Add, pooling, upsampling) stay FP32 between
# them; quantizing GroupNorm's affine Mul also breaks ModelOpt's INT8 weight storage (RetinaNet heads).
QUANTIZED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
QUANTIZE_INSTALL = "pip install -e '.[quantize]'"
CALIBRATION_METHODS = ("entropy", "max")


def import_modelopt():
    """``modelopt.onnx`` (quantization and AutoCast), or ``BackendUnavailableError`` saying what is missing."""
    try:
        import modelopt.onnx.autocast  # noqa: F401
        import modelopt.onnx.quantization  # noqa: F401
    except ImportError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BackendUnavailableError(f"NVIDIA ModelOpt's ONNX quantization is not importable ({first}); "
                                      f"install it with {QUANTIZE_INSTALL}") from None
    import modelopt.onnx

    return modelopt.onnx


def network_nodes(model) -> list[str]:
    """Names of the nodes that belong to the convolutional network and heads (see the module docstring)."""
    inside = re.compile(network_pattern())
    return [n.name for n in model.graph.node if inside.match(n.name)]


def _scope_alternatives() -> str:
    return "|".join(re.escape(scope) for scope in NETWORK_SCOPES)


def network_pattern() -> str:
    """One regex (``re.match``, as ModelOpt applies it) for every node name inside ``NETWORK_SCOPES``."""
    return f"^/(?:{_scope_alternatives()})/"


def outside_network_pattern() -> str:
    """One regex (``re.match``) for every node name outside ``NETWORK_SCOPES``."""
    return f"^(?!/(?:{_scope_alternatives()})/)"


def calibration_set(index, info, count: int, split: str = "train") -> np.ndarray:
    """``count`` letterboxed images of ``index`` (a ``CocoIndex`` of ``split``) as float32 ``[count, 3, S, S]``."""
    from detkd.runtime.preprocess import letterbox, read_image

    if count < 1:
        raise ExportError(f"export.quantize.calibration_images is {count}; INT8 calibration needs at least 1 image")
    if len(index.images) < count:
        raise ExportError(f"export.quantize.calibration_images is {count} but the {split} split has only "
                          f"{len(index.images)} images; lower it to at most {len(index.images)}")
    batch = []
    for record in index.images[:count]:
        try:
            batch.append(letterbox(read_image(record.path), info)[0])
        except DetkdError as exc:
            raise ExportError(f"INT8 calibration image unusable: {exc}") from None
    return np.stack(batch).astype(np.float32)


def check_calibration(calibration: np.ndarray, input_size: int) -> None:
    s = input_size
    if not isinstance(calibration, np.ndarray) or calibration.dtype != np.float32 or calibration.ndim != 4 \
            or calibration.shape[1:] != (3, s, s) or calibration.shape[0] < 1:
        got = f"{calibration.dtype} {list(calibration.shape)}" if isinstance(calibration, np.ndarray) \
            else type(calibration).__name__
        raise ExportError(f"INT8 calibration set must be a float32 array [N, 3, {s}, {s}] with N >= 1, got {got}")


@contextlib.contextmanager
def _quiet_modelopt():
    """ModelOpt logs every node it skips at INFO and onnxruntime's calibrator prints its progress to stdout;
    keep errors, drop the chatter (the stage prints one line per artefact)."""
    loggers = [logging.getLogger(n) for n in ("modelopt", "modelopt.onnx", "modelopt.onnx.autocast", "root")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _finish(model, source, dst: Path, facts: dict) -> dict:
    """Copy ``source``'s metadata into ``model``, check it, write it atomically to ``dst``."""
    import onnx

    from detkd.export.trt_check import TRT_VERSION, assert_tensorrt_compatible

    del model.metadata_props[:]
    for prop in source.metadata_props:
        entry = model.metadata_props.add()
        entry.key, entry.value = prop.key, prop.value
    model.producer_name = "detkd"
    onnx.checker.check_model(model)
    assert_tensorrt_compatible(model, str(dst))
    with atomic_path(dst) as tmp:
        onnx.save(model, str(tmp))
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return {**facts, "path": str(dst), "opset": opset, "nodes": len(model.graph.node),
            "quantize_nodes": counts.get("QuantizeLinear", 0), "dequantize_nodes": counts.get("DequantizeLinear", 0),
            "cast_nodes": counts.get("Cast", 0), "size_mb": dst.stat().st_size / 2**20,
            "tensorrt_static_check": {"version": TRT_VERSION, "passed": True}}


def quantize_int8(src: str | Path, dst: str | Path, calibration: np.ndarray, method: str = "entropy") -> dict:
    """INT8 Q/DQ file of ``src`` (see the module docstring); returns facts (scope size, Q/DQ count, seconds)."""
    import onnx

    src, dst = Path(src), Path(dst)
    if method not in CALIBRATION_METHODS:
        raise ExportError(f"export.quantize.calibration_method '{method}' is unknown; choose from "
                          f"{', '.join(CALIBRATION_METHODS)}")
    source = onnx.load(str(src))
    check_calibration(calibration, source.graph.input[0].type.tensor_type.shape.dim[-1].dim_value)
    mo = import_modelopt()
    start = time.perf_counter()
    with _quiet_modelopt(), atomic_path(dst) as raw:
        mo.quantization.quantize(str(src), quantize_mode="int8", calibration_data={"images": calibration},
                                 calibration_method=method, calibration_eps=["cpu"], nodes_to_quantize=[network_pattern()],
                                 op_types_to_quantize=list(QUANTIZED_OPS),
                                 high_precision_dtype="fp32", dq_only=True, log_level="WARNING", output_path=str(raw))
        model = onnx.load(str(raw))
    facts = {"precision": "int8", "tool": f"modelopt {_version('nvidia-modelopt')}", "calibration_images": len(calibration),
             "calibration_method": method, "scope_nodes": len(network_nodes(source)),
             "seconds": time.perf_counter() - start}
    return _finish(model, source, dst, facts)


def convert_fp16(src: str | Path, dst: str | Path) -> dict:
    """FP16 AutoCast file of ``src`` with FP32 inputs and outputs (see the module docstring)."""
    import onnx

    src, dst = Path(src), Path(dst)
    source = onnx.load(str(src))
    mo = import_modelopt()
    start = time.perf_counter()
    with _quiet_modelopt():  # AutoCast's own range rules still keep overflowing network nodes in FP32
        model = mo.autocast.convert_to_mixed_precision(str(src), low_precision_type="fp16", keep_io_types=True,
                                                       nodes_to_exclude=[outside_network_pattern()], providers=["cpu"])
    facts = {"precision": "fp16", "tool": f"modelopt {_version('nvidia-modelopt')} autocast",
             "scope_nodes": len(network_nodes(source)), "seconds": time.perf_counter() - start}
    return _finish(model, source, dst, facts)


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"
