"""Triton Inference Server model repository for an exported detector: an ONNX file (FP32, FP16 or INT8 Q/DQ)
on Triton's onnxruntime or OpenVINO backend, or a TensorRT engine.

Contract: ``write_model_repository(model_path, repository, name=None, max_batch=None, instance=None,
runtime=None)`` creates ``repository/<name>/config.pbtxt``, ``repository/<name>/1/model.onnx`` (or
``model.plan``) and ``repository/<name>/labels.txt`` (class names, one per line, background first). The
config declares the export contract (``images`` FP32 ``[3, S, S]``; ``boxes`` ``[D, 4]``, ``scores``,
``labels``, ``num_dets``), Triton's batch dimension up to ``max_batch`` with dynamic batching, and the
backend:

- ``runtime`` defaults from the file: ``.onnx`` -> ``onnxruntime`` (``platform: onnxruntime_onnx``; or
  ``openvino``: ``backend: "openvino"`` reading ``model.onnx``), engines -> ``tensorrt`` (``tensorrt_plan``);
- ``instance`` defaults to ``KIND_CPU`` for onnxruntime and OpenVINO and ``KIND_GPU`` for TensorRT;
- ``max_batch`` defaults to 8 for ONNX files and, for an engine, to its optimisation profile's largest batch
  (read from its ``<engine>.json`` sidecar; a larger value is refused);
- ``name`` defaults to ``detkd_<file stem>`` (``detkd_distilled_int8``), with ``_openvino`` appended for the
  OpenVINO backend, so every artefact gets its own model.

Triton's OpenVINO backend has no inference-precision parameter; on CPUs with AVX512-BF16 the OpenVINO CPU
plugin may then run in bf16 (detkd's own runner sets f32 explicitly). The config says so in a comment.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Optional

from detkd.errors import ModelFileError
from detkd.runtime.base import ENGINE_SUFFIXES
from detkd.runtime.metadata import ModelInfo, engine_sidecar, read_model_info

BACKENDS = {"onnxruntime": ('platform: "onnxruntime_onnx"', "model.onnx"),
            "openvino": ('backend: "openvino"\ndefault_model_filename: "model.onnx"', "model.onnx"),
            "tensorrt": ('platform: "tensorrt_plan"', "model.plan")}
INSTANCE_KINDS = ("KIND_CPU", "KIND_GPU")


def default_runtime(model_path: Path) -> str:
    return "tensorrt" if model_path.suffix in ENGINE_SUFFIXES else "onnxruntime"


def default_name(model_path: Path, runtime: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9_]", "_", model_path.stem)
    return f"detkd_{stem}" + ("_openvino" if runtime == "openvino" else "")


def config_pbtxt(info: ModelInfo, name: str, runtime: str, max_batch: int, instance: str) -> str:
    s, d = info.input_size, info.max_detections
    backend_lines, _ = BACKENDS[runtime]
    extra = ""
    if runtime == "openvino":
        extra = ('parameters { key: "PERFORMANCE_HINT", value: { string_value: "LATENCY" } }\n'
                 "# Triton's OpenVINO backend takes no inference-precision setting: on CPUs with AVX512-BF16 the CPU\n"
                 "# plugin may run in bf16 (AP barely moves; raw outputs drift). detkd's gate measured f32.\n")
    return f"""name: "{name}"
{backend_lines}
max_batch_size: {max_batch}
input [
  {{ name: "images", data_type: TYPE_FP32, dims: [ 3, {s}, {s} ] }}
]
output [
  {{ name: "boxes", data_type: TYPE_FP32, dims: [ {d}, 4 ] }},
  {{ name: "scores", data_type: TYPE_FP32, dims: [ {d} ] }},
  {{ name: "labels", data_type: TYPE_INT64, dims: [ {d} ], label_filename: "labels.txt" }},
  {{ name: "num_dets", data_type: TYPE_INT64, dims: [ 1 ], reshape: {{ shape: [ ] }} }}
]
dynamic_batching {{ }}
instance_group [ {{ count: 1, kind: {instance} }} ]
{extra}parameters {{ key: "detkd.input_format", value: {{ string_value: {json.dumps(info.input_format)} }} }}
parameters {{ key: "detkd.git_commit", value: {{ string_value: "{info.git_commit}" }} }}
"""


def engine_max_batch(engine_path: Path) -> int:
    """The largest batch of an engine's optimisation profile, from its ``<engine>.json`` sidecar."""
    sidecar = engine_sidecar(engine_path)
    try:
        value = json.loads(sidecar.read_text())["max_batch"]
    except (OSError, ValueError, KeyError) as exc:
        raise ModelFileError(f"{sidecar}: cannot read the engine's max_batch ({type(exc).__name__}: {exc}); "
                             "rebuild the engine with `dvc repro export`") from None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ModelFileError(f"{sidecar}: max_batch must be a positive integer, got {value!r}")
    return value


def write_model_repository(model_path: str | Path, repository: str | Path, name: Optional[str] = None,
                           max_batch: Optional[int] = None, instance: Optional[str] = None,
                           runtime: Optional[str] = None) -> Path:
    model_path, repository = Path(model_path), Path(repository)
    if model_path.suffix != ".onnx" and model_path.suffix not in ENGINE_SUFFIXES:
        raise ModelFileError(f"{model_path}: expected .onnx or a TensorRT engine ({'/'.join(ENGINE_SUFFIXES)})")
    if not model_path.is_file():
        raise ModelFileError(f"{model_path}: model file not found")
    runtime = runtime or default_runtime(model_path)
    if runtime not in BACKENDS:
        raise ModelFileError(f"unknown Triton backend '{runtime}'; choose from {', '.join(BACKENDS)}")
    if (runtime == "tensorrt") != (model_path.suffix in ENGINE_SUFFIXES):
        raise ModelFileError(f"{model_path}: the {runtime} backend takes "
                             f"{'a TensorRT engine' if runtime == 'tensorrt' else 'an ONNX file'}")
    instance = instance or ("KIND_GPU" if runtime == "tensorrt" else "KIND_CPU")
    if instance not in INSTANCE_KINDS:
        raise ModelFileError(f"instance kind must be one of {', '.join(INSTANCE_KINDS)}, got {instance}")
    if runtime == "tensorrt":  # an engine serves at most its profile's batch
        built = engine_max_batch(model_path)
        if max_batch is not None and max_batch > built:
            raise ModelFileError(f"{model_path}: max batch {max_batch} is above the engine's profile ({built}, from "
                                 f"{engine_sidecar(model_path).name}); rebuild it with export.tensorrt.max_batch")
        max_batch = max_batch or built
    max_batch = 8 if max_batch is None else max_batch
    if max_batch < 1:
        raise ModelFileError(f"max batch must be at least 1, got {max_batch}")
    info = read_model_info(model_path)
    name = name or default_name(model_path, runtime)
    target = repository / name
    (target / "1").mkdir(parents=True, exist_ok=True)
    shutil.copy2(model_path, target / "1" / BACKENDS[runtime][1])
    (target / "labels.txt").write_text("\n".join(["__background__", *info.class_names]) + "\n")
    (target / "config.pbtxt").write_text(config_pbtxt(info, name, runtime, max_batch, instance))
    return target
