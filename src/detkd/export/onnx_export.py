"""Trained detector -> ONNX file with the deployment contract, simplified, described and checked.

Contract: ``export_onnx(detector, info, path, opset)`` writes ``path`` atomically and returns facts about
the graph. The file holds ``detkd.export.graph.DeployableDetector`` (input ``images [B, 3, S, S]``, outputs
``boxes``, ``scores``, ``labels``, ``num_dets``; dynamic ``B``), simplified with onnxslim when asked,
``ModelInfo`` as metadata, and it passes ``onnx.checker`` and the static TensorRT check (otherwise
``ExportError`` naming the node and rule, and nothing is written).
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from detkd.errors import ExportError
from detkd.export.graph import DeployableDetector, export_size
from detkd.export.trt_check import TRT_VERSION, assert_tensorrt_compatible
from detkd.io import atomic_path
from detkd.runtime.metadata import ModelInfo
from detkd.runtime.onnx_runner import OUTPUTS

MIN_OPSET = 17


def model_info(detector: nn.Module, meta: dict, git_commit: str = "unknown", mlflow_run_id: str = "") -> ModelInfo:
    """``ModelInfo`` of a detector loaded from a detkd checkpoint (``meta`` is the checkpoint's metadata).

    ``git_commit`` and ``mlflow_run_id`` are the export's (the run that logs the ONNX model); the training
    run's are kept in ``extra``."""
    transform = detector.transform
    spec = meta["spec"]
    return ModelInfo(
        class_names=list(meta["category_names"]), category_ids=[int(c) for c in meta["category_ids"]],
        input_size=export_size(detector), min_size=int(transform.min_size[-1]), max_size=int(transform.max_size),
        image_mean=[float(v) for v in transform.image_mean], image_std=[float(v) for v in transform.image_std],
        max_detections=int(detector.roi_heads.detections_per_img if hasattr(detector, "roi_heads")
                           else detector.detections_per_img),
        family=spec["family"], backbone=spec["backbone"], git_commit=git_commit, mlflow_run_id=mlflow_run_id,
        extra={"training_git_commit": meta.get("git_commit", ""), "training_mlflow_run_id": meta.get("mlflow_run_id", ""),
               "role": meta.get("role", "")},
    )


def declare_output_shapes(model, max_detections: int) -> None:
    """Write the contract's static output dimensions into ``model`` (tracing leaves some symbolic, e.g. the
    4 of ``boxes``): boxes [batch, D, 4], scores and labels [batch, D], num_dets [batch]; a traced dimension
    that disagrees is an ``ExportError``."""
    expected = {"boxes": ("batch", max_detections, 4), "scores": ("batch", max_detections),
                "labels": ("batch", max_detections), "num_dets": ("batch",)}
    for output in model.graph.output:
        dims = output.type.tensor_type.shape.dim
        want = expected[output.name]
        if len(dims) != len(want):
            raise ExportError(f"ONNX output {output.name} has rank {len(dims)}, the contract says {len(want)}")
        for dim, value in zip(dims, want):
            if isinstance(value, str):
                continue
            if dim.HasField("dim_value") and dim.dim_value != value:
                raise ExportError(f"ONNX output {output.name} has a dimension {dim.dim_value} where the contract says "
                                  f"{value}")
            dim.dim_value = value  # replaces a symbolic dim_param


def export_onnx(detector: nn.Module, info: ModelInfo, path: str | Path, opset: int = MIN_OPSET,
                simplify: bool = True) -> dict:
    import onnx

    if opset < MIN_OPSET:
        raise ExportError(f"export.opset {opset}: the export needs opset {MIN_OPSET} or later")
    graph = DeployableDetector(detector.eval().cpu()).eval()
    example = torch.rand(2, 3, info.input_size, info.input_size)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw_path = Path(tmp) / "raw.onnx"
        torch.onnx.export(
            graph, (example,), str(raw_path), dynamo=False, opset_version=opset, input_names=["images"],
            output_names=list(OUTPUTS), dynamic_axes={name: {0: "batch"} for name in ("images", *OUTPUTS)},
        )
        model = onnx.load(str(raw_path))
    nodes_before = len(model.graph.node)
    if simplify:
        import onnxslim

        model = onnxslim.slim(model)
    declare_output_shapes(model, info.max_detections)
    del model.metadata_props[:]
    for key, value in info.to_metadata().items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.producer_name = "detkd"
    onnx.checker.check_model(model)
    assert_tensorrt_compatible(model, str(path))  # raises ExportError naming node and rule
    with atomic_path(path) as tmp_path:
        onnx.save(model, str(tmp_path))
    return {
        "opset": opset, "nodes": len(model.graph.node), "nodes_before_simplify": nodes_before,
        "size_mb": Path(path).stat().st_size / 2**20, "tensorrt_static_check": {"version": TRT_VERSION, "passed": True},
    }
