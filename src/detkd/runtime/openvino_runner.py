"""OpenVINO runner for exported ONNX detectors (FP32, FP16 and INT8 Q/DQ files alike), on the CPU.

``OpenVINORunner(path, threads=0, precision="f32")`` reads the ONNX file with OpenVINO's ONNX frontend and
compiles it for the CPU with an explicit ``INFERENCE_PRECISION_HINT``. The hint matters: on CPUs with
AVX512-BF16 OpenVINO otherwise runs in bf16, and its outputs then drift past the export's raw-output gate
(AP barely moves, so nothing else would notice). The precision the artefact was made for travels in the
file (FP16 casts, INT8 Q/DQ nodes), so ``f32`` is right for all of them; ``bf16`` is for users who want
it on purpose. ``threads=0`` lets OpenVINO use every core. OpenVINO absent is a
``BackendUnavailableError`` with the install command; an unreadable file is a ``ModelFileError``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from detkd.errors import BackendUnavailableError, ModelFileError
from detkd.runtime.base import Runner
from detkd.runtime.metadata import read_model_info
from detkd.runtime.onnx_runner import OUTPUTS

PRECISION_HINTS = ("f32", "bf16")
OPENVINO_INSTALL = "pip install -e '.[openvino]'"


def import_openvino():
    try:
        import openvino
    except ImportError:
        raise BackendUnavailableError(f"OpenVINO is not installed ({OPENVINO_INSTALL})") from None
    return openvino


def openvino_version() -> str | None:
    try:
        return import_openvino().__version__.split("-")[0]
    except BackendUnavailableError:
        return None


class OpenVINORunner(Runner):
    def __init__(self, path: str | Path, threads: int = 0, precision: str = "f32"):
        path = Path(path)
        if precision not in PRECISION_HINTS:
            raise BackendUnavailableError(f"OpenVINO inference precision '{precision}' is not offered here; choose from "
                                          f"{', '.join(PRECISION_HINTS)}")
        ov = import_openvino()
        info = read_model_info(path)  # also refuses missing, corrupt and foreign files with one line
        core = ov.Core()
        config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            model = core.read_model(str(path))
            self.compiled = core.compile_model(model, "CPU", config)
        except Exception as exc:  # OpenVINO raises RuntimeError with multi-line C++ context
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelFileError(f"{path}: OpenVINO {ov.__version__} cannot compile it for the CPU ({first[:200]})") from None
        names = [o.get_any_name() for o in self.compiled.outputs]
        if names != list(OUTPUTS) or [i.get_any_name() for i in self.compiled.inputs] != ["images"]:
            raise ModelFileError(f"{path}: inputs/outputs do not follow the export contract images -> {', '.join(OUTPUTS)}")
        super().__init__(path, info)
        self.request = self.compiled.create_infer_request()
        hint = self.compiled.get_property("INFERENCE_PRECISION_HINT")  # an ov.Type: f32, bf16
        self.precision_hint = hint.to_string() if hasattr(hint, "to_string") else str(hint)
        if self.precision_hint != precision:
            raise BackendUnavailableError(f"OpenVINO compiled {path.name} with inference precision {self.precision_hint}, "
                                          f"not the {precision} asked for (this CPU may lack it)")
        self.backend = "openvino-cpu"

    def _run(self, batch: np.ndarray):
        results = self.request.infer({"images": batch})
        return tuple(np.array(results[output], copy=True) for output in self.compiled.outputs)  # buffers are reused
