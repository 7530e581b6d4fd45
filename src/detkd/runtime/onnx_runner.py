"""onnxruntime runner for exported ONNX detectors.

``OnnxRunner(path, providers=("cpu",), threads=0)``: ``providers`` are short names (``cpu``, ``cuda``,
``tensorrt``) tried in order; asking for one this onnxruntime build lacks is a
``BackendUnavailableError`` that lists what it has. ``threads=0`` lets onnxruntime use every core. A
missing, truncated or corrupt file is a ``ModelFileError``, not an onnxruntime traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from detkd.errors import BackendUnavailableError, ModelFileError
from detkd.runtime.base import Runner
from detkd.runtime.metadata import ModelInfo

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
OUTPUTS = ("boxes", "scores", "labels", "num_dets")


def available_providers() -> list[str]:
    import onnxruntime as ort

    names = {v: k for k, v in PROVIDERS.items()}
    return [names[p] for p in ort.get_available_providers() if p in names]


class OnnxRunner(Runner):
    def __init__(self, path: str | Path, providers: Sequence[str] = ("cpu",), threads: int = 0):
        import onnxruntime as ort

        path = Path(path)
        unknown = [p for p in providers if p not in PROVIDERS]
        if unknown:
            raise BackendUnavailableError(f"unknown onnxruntime provider(s) {unknown}; choose from {', '.join(PROVIDERS)}")
        available = available_providers()
        missing = [p for p in providers if p not in available]
        if missing:
            raise BackendUnavailableError(f"onnxruntime {ort.__version__} here has no {', '.join(missing)} provider "
                                          f"(available: {', '.join(available)})")
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads)
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), options, providers=[PROVIDERS[p] for p in providers])
        except Exception as exc:  # onnxruntime raises InvalidProtobuf, Fail, ... for unusable files
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelFileError(f"{path}: not a loadable ONNX model ({first[:200]})") from None
        info = ModelInfo.from_metadata(self.session.get_modelmeta().custom_metadata_map, str(path))
        names = [o.name for o in self.session.get_outputs()]
        if names != list(OUTPUTS) or [i.name for i in self.session.get_inputs()] != ["images"]:
            raise ModelFileError(f"{path}: inputs/outputs {[i.name for i in self.session.get_inputs()]} -> {names} "
                                 f"do not follow the export contract images -> {', '.join(OUTPUTS)}")
        super().__init__(path, info)
        self.providers = list(providers)
        self.backend = f"onnxruntime-{providers[0]}"

    def _run(self, batch: np.ndarray):
        return tuple(self.session.run(list(OUTPUTS), {"images": batch}))
