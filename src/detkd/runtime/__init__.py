"""Torch-free inference on exported detectors: the code ``deploy/`` ships and the export gate runs.

``load_runner(path)`` opens an ONNX model (onnxruntime) or a TensorRT engine by its suffix; every runner
takes letterboxed ``[B, 3, S, S]`` float32 batches (``preprocess.letterbox``) and returns the padded
output contract of ``detkd.export.graph``; ``Runner.detect`` goes from images to detections in image
coordinates.
"""

from detkd.runtime.base import Runner, load_runner
from detkd.runtime.metadata import ModelInfo

__all__ = ["ModelInfo", "Runner", "load_runner"]
