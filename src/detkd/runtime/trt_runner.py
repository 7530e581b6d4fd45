"""TensorRT engine runner (TensorRT's Python API, imported lazily; CUDA buffers through torch).

An engine only runs on the TensorRT version and GPU model it was built for, so the builder writes a
sidecar ``<engine>.json`` (``engine_sidecar``) with the export metadata, the TensorRT version (and major),
the GPU name and compute capability, the precision and the largest batch. ``TensorRTRunner`` checks it
against this machine before deserialising (``check_engine_compatibility``) and says what to rebuild
instead of failing inside TensorRT: an engine of another TensorRT major version (a TensorRT 10 engine
under 11 included) or one without a strongly typed network under TensorRT 11 is refused first.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from detkd.errors import BackendUnavailableError, ModelFileError
from detkd.runtime.base import Runner
from detkd.runtime.metadata import ModelInfo, engine_sidecar
from detkd.runtime.onnx_runner import OUTPUTS


def import_tensorrt():
    """``tensorrt`` or ``BackendUnavailableError`` with the reason (module missing or no CUDA device)."""
    try:
        import tensorrt
    except ImportError:
        raise BackendUnavailableError("TensorRT is not installed (pip install -e '.[gpu]' on a machine with an NVIDIA "
                                      "GPU and driver)") from None
    import torch

    if not torch.cuda.is_available():
        raise BackendUnavailableError(f"TensorRT {tensorrt.__version__} is installed but no CUDA device is visible")
    return tensorrt


def tensorrt_major(version: str) -> int:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return 0


def this_machine(trt_version: str) -> dict:
    import torch

    major, minor = torch.cuda.get_device_capability()
    return {"tensorrt_version": trt_version, "tensorrt_major": tensorrt_major(trt_version),
            "device_name": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}"}


def check_engine_compatibility(built: dict, here: dict, engine: str) -> None:
    """Raise ``ModelFileError`` if ``built`` (the sidecar) names another TensorRT version or GPU than ``here``."""
    source = built.get("source") or "its ONNX file"
    built_major, here_major = tensorrt_major(built.get("tensorrt_version", "")), tensorrt_major(here["tensorrt_version"])
    if built_major != here_major:
        raise ModelFileError(f"{engine}: engine built by TensorRT {built.get('tensorrt_version')} cannot run under "
                             f"TensorRT {here['tensorrt_version']} (another major version); rebuild it from {source} "
                             "on this machine with `dvc repro export`")
    if here_major >= 11 and not built.get("strongly_typed", False):
        raise ModelFileError(f"{engine}: engine was built with TensorRT's removed weak-typing precision flags; "
                             f"TensorRT {here['tensorrt_version']} needs a strongly typed build: rebuild it from {source} "
                             "with `dvc repro export`")
    problems = [f"{key.replace('_', ' ')} {built.get(key)!r} (this machine: {here[key]!r})"
                for key in ("tensorrt_version", "device_name", "compute_capability") if built.get(key) != here[key]]
    if problems:
        raise ModelFileError(f"{engine}: engine was built for another setup: {'; '.join(problems)}; engines are not "
                             "portable, rebuild it on this machine from the ONNX file (`dvc repro export`)")


class TensorRTRunner(Runner):
    def __init__(self, path: str | Path):
        path = Path(path)
        sidecar = engine_sidecar(path)
        if not sidecar.is_file():
            raise ModelFileError(f"{path}: its description {sidecar.name} is missing (engines are written together "
                                 "with it by `dvc repro export`)")
        try:
            built = json.loads(sidecar.read_text())
            info = ModelInfo.from_metadata(built["metadata"], str(sidecar))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ModelFileError(f"{sidecar}: not a detkd engine description (JSON with 'metadata')") from None
        trt = import_tensorrt()
        check_engine_compatibility(built, this_machine(trt.__version__), str(path))
        import torch

        self._torch, self._trt = torch, trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise ModelFileError(f"{path}: TensorRT {trt.__version__} could not deserialise the engine (corrupt or "
                                 "built by another version); rebuild it with `dvc repro export`")
        self.context = self.engine.create_execution_context()
        super().__init__(path, info)
        self.max_batch = int(built.get("max_batch", 1))
        self.precision = built.get("precision", "")
        self.backend = f"tensorrt-{self.precision}"

    def _run(self, batch: np.ndarray):
        torch, trt = self._torch, self._trt
        images = torch.from_numpy(batch).cuda()
        self.context.set_input_shape("images", tuple(images.shape))
        self.context.set_tensor_address("images", images.data_ptr())
        outputs = {}
        for name in OUTPUTS:
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = torch.from_numpy(np.empty(0, dtype=trt.nptype(self.engine.get_tensor_dtype(name)))).dtype
            outputs[name] = torch.empty(shape, dtype=dtype, device="cuda")
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"{self.path}: TensorRT execution failed")
        stream.synchronize()
        return tuple(outputs[name].cpu().numpy() for name in OUTPUTS)
