"""The runner interface shared by onnxruntime, OpenVINO and TensorRT, and ``load_runner`` that opens a file.

Contract: ``Runner.infer(batch)`` takes a float32 ``[N, 3, S, S]`` array (``S = info.input_size``) and
returns ``(boxes [N, D, 4], scores [N, D], labels [N, D], num_dets [N])`` as numpy arrays; any other
shape or dtype is an ``InferenceInputError`` that states what the model expects. ``Runner.detect(images)``
letterboxes RGB uint8 images, runs them in batches and returns per image a dict of ``boxes`` (xyxy in
image pixels), ``scores``, ``labels`` (1..K) and ``class_names``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Optional

import numpy as np

from detkd.errors import InferenceInputError, ModelFileError
from detkd.runtime.metadata import ModelInfo
from detkd.runtime.preprocess import letterbox, to_image_coordinates

ENGINE_SUFFIXES = (".engine", ".plan", ".trt")


class Runner(ABC):
    backend = "abstract"
    max_batch: Optional[int] = None  # engines have an optimisation-profile limit; ONNX has none

    def __init__(self, path: str | Path, info: ModelInfo):
        self.path, self.info = Path(path), info

    @abstractmethod
    def _run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]: ...

    def expected_input(self) -> str:
        s = self.info.input_size
        return f"float32 array [N, 3, {s}, {s}]" + (f" with N <= {self.max_batch}" if self.max_batch else "")

    def infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        s = self.info.input_size
        if not isinstance(batch, np.ndarray):
            raise InferenceInputError(f"{self.path.name}: input must be a numpy array, got {type(batch).__name__}")
        ok_shape = batch.ndim == 4 and batch.shape[1:] == (3, s, s) and batch.shape[0] >= 1 \
            and (self.max_batch is None or batch.shape[0] <= self.max_batch)
        if batch.dtype != np.float32 or not ok_shape:
            raise InferenceInputError(f"{self.path.name}: input 'images' must be a {self.expected_input()}, "
                                      f"got {batch.dtype} {list(batch.shape)}")
        return self._run(np.ascontiguousarray(batch))

    def detect(self, images: list[np.ndarray], batch_size: int = 8) -> list[dict]:
        step = min(batch_size, self.max_batch or batch_size)
        results = []
        for start in range(0, len(images), step):
            chunk = images[start:start + step]
            prepared = [letterbox(img, self.info) for img in chunk]
            boxes, scores, labels, counts = self.infer(np.stack([p[0] for p in prepared]))
            for i, (img, (_, resized)) in enumerate(zip(chunk, prepared)):
                n = int(counts[i])
                labels_i = labels[i, :n].astype(np.int64)
                results.append({
                    "boxes": to_image_coordinates(boxes[i, :n].astype(np.float32), resized, img.shape[:2]),
                    "scores": scores[i, :n].astype(np.float32),
                    "labels": labels_i,
                    "class_names": [self.info.class_names[k - 1] for k in labels_i.tolist()],
                })
        return results


RUNTIMES = ("onnxruntime", "openvino", "tensorrt")


def load_runner(path: str | Path, runtime: str | None = None, **options) -> Runner:
    """A runner for ``path``: ``.onnx`` files run on ``runtime`` ``onnxruntime`` (default; options
    ``providers``, ``threads``) or ``openvino`` (options ``threads``, ``precision``); TensorRT engines
    (``.engine``/``.plan``/``.trt``) on ``tensorrt``. A file that the runtime cannot take is refused."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: model file not found")
    if runtime is not None and runtime not in RUNTIMES:
        raise ModelFileError(f"unknown runtime '{runtime}'; choose from {', '.join(RUNTIMES)}")
    if path.suffix == ".onnx":
        if runtime == "tensorrt":
            raise ModelFileError(f"{path}: TensorRT runs engines built from ONNX files (`dvc repro export` on a machine "
                                 "with a CUDA GPU and TensorRT), not the ONNX file itself")
        if runtime == "openvino":
            from detkd.runtime.openvino_runner import OpenVINORunner

            return OpenVINORunner(path, **options)
        from detkd.runtime.onnx_runner import OnnxRunner

        return OnnxRunner(path, **options)
    if path.suffix in ENGINE_SUFFIXES:
        if runtime not in (None, "tensorrt"):
            raise ModelFileError(f"{path}: a TensorRT engine runs only on the tensorrt runtime, not {runtime}")
        from detkd.runtime.trt_runner import TensorRTRunner

        return TensorRTRunner(path, **options)
    raise ModelFileError(f"{path}: unknown model type '{path.suffix}'; expected .onnx or one of {', '.join(ENGINE_SUFFIXES)}")
