"""Triton Inference Server model repository for an exported detector (ONNX file or TensorRT engine).

Contract: ``write_model_repository(model_path, repository, name, max_batch, instance)`` creates
``repository/<name>/config.pbtxt``, ``repository/<name>/1/model.onnx`` (or ``model.plan``) and
``repository/<name>/labels.txt`` (class names, one per line, label 1 first). The config declares the
export contract (``images`` FP32 ``[3, S, S]``; ``boxes``, ``scores``, ``labels``, ``num_dets``), Triton's
batch dimension up to ``max_batch`` with dynamic batching, and the backend (``onnxruntime_onnx`` or
``tensorrt_plan``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from detkd.errors import ModelFileError
from detkd.runtime.metadata import ModelInfo, read_model_info

PLATFORMS = {".onnx": ("onnxruntime_onnx", "model.onnx"), ".engine": ("tensorrt_plan", "model.plan"),
             ".plan": ("tensorrt_plan", "model.plan"), ".trt": ("tensorrt_plan", "model.plan")}


def config_pbtxt(info: ModelInfo, name: str, platform: str, max_batch: int, instance: str) -> str:
    s, d = info.input_size, info.max_detections
    return f"""name: "{name}"
platform: "{platform}"
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
parameters {{ key: "detkd.input_format", value: {{ string_value: {json.dumps(info.input_format)} }} }}
parameters {{ key: "detkd.git_commit", value: {{ string_value: "{info.git_commit}" }} }}
"""


def write_model_repository(model_path: str | Path, repository: str | Path, name: str, max_batch: int = 8,
                           instance: str = "KIND_GPU") -> Path:
    model_path, repository = Path(model_path), Path(repository)
    if model_path.suffix not in PLATFORMS:
        raise ModelFileError(f"{model_path}: expected .onnx or a TensorRT engine (.engine/.plan/.trt)")
    if not model_path.is_file():
        raise ModelFileError(f"{model_path}: model file not found")
    if instance not in ("KIND_GPU", "KIND_CPU"):
        raise ValueError(f"instance must be KIND_GPU or KIND_CPU, got {instance}")
    info = read_model_info(model_path)
    platform, filename = PLATFORMS[model_path.suffix]
    target = repository / name
    (target / "1").mkdir(parents=True, exist_ok=True)
    shutil.copy2(model_path, target / "1" / filename)
    (target / "labels.txt").write_text("\n".join(["__background__", *info.class_names]) + "\n")
    (target / "config.pbtxt").write_text(config_pbtxt(info, name, platform, max_batch, instance))
    return target
