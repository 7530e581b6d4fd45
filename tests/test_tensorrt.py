"""TensorRT path without a GPU: the builder uses only TensorRT 11's strongly typed API, skips with its reason
where TensorRT is absent, and engines from another TensorRT major version are refused before loading."""

import ast
import json
import sys
import types
from pathlib import Path

import pytest

from detkd.errors import BackendUnavailableError, ModelFileError
from detkd.runtime.trt_runner import check_engine_compatibility

from conftest import REPO

TRT_MODULES = [REPO / "src/detkd/export/tensorrt_build.py", REPO / "src/detkd/runtime/trt_runner.py"]
# TensorRT 11 removed these (NVIDIA's "Migrating from TensorRT 10.x to 11.x"); no code path may call them
REMOVED = {"BuilderFlag", "int8_calibrator", "set_calibration_profile", "IInt8Calibrator", "IInt8EntropyCalibrator",
           "IInt8EntropyCalibrator2", "IInt8MinMaxCalibrator", "IInt8LegacyCalibrator", "platform_has_fast_fp16",
           "platform_has_fast_int8", "set_quantization_flag", "OBEY_PRECISION_CONSTRAINTS"}
# the TensorRT 11 Python API that detkd's builder and runner use (all present in 11.x)
TRT11_API = {"__version__", "Logger", "WARNING", "Builder", "create_network", "OnnxParser", "parse_from_file", "num_errors",
             "get_error", "create_builder_config", "set_memory_pool_limit", "MemoryPoolType", "WORKSPACE",
             "create_optimization_profile", "set_shape", "add_optimization_profile", "build_serialized_network", "Runtime",
             "deserialize_cuda_engine", "create_execution_context", "set_input_shape", "set_tensor_address",
             "get_tensor_shape", "get_tensor_dtype", "execute_async_v3", "nptype", "NetworkDefinitionCreationFlag",
             "STRONGLY_TYPED"}


TRT_OBJECTS = {"trt", "builder", "network", "parser", "config", "profile"}  # local names bound to TensorRT objects


def _used_on_tensorrt(path: Path) -> set[str]:
    """Attribute names used on TensorRT: ``trt.X``, ``trt.X.Y``, ``trt.Runtime(...).X`` and methods of the
    objects TensorRT returned (``builder.X``, ``self.engine.X``, ``self.context.X``...)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Attribute):
            continue
        base = node.value
        if isinstance(base, ast.Call):
            base = base.func
            if isinstance(base, ast.Attribute) and isinstance(base.value, ast.Name) and base.value.id == "trt":
                names.add(node.attr)
            continue
        if isinstance(base, ast.Name) and base.id in TRT_OBJECTS:
            names.add(node.attr)
        elif isinstance(base, ast.Attribute) and isinstance(base.value, ast.Name):
            if base.value.id == "trt" or (base.value.id == "self" and base.attr in ("engine", "context")):
                names.add(node.attr)
    return names


def test_no_code_path_calls_an_api_that_tensorrt_11_removed():
    for path in [*(REPO / "src").rglob("*.py"), *(REPO / "deploy").rglob("*.py"), *(REPO / "pipeline").rglob("*.py")]:
        code = {n.attr for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Attribute)}
        code |= {n.id for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Name)}
        hits = sorted(code & REMOVED)  # code only: docstrings may name what was removed
        assert not hits, f"{path} uses removed TensorRT API {hits}"


def test_the_builder_and_runner_use_only_the_tensorrt_11_api():
    used = set().union(*(_used_on_tensorrt(p) for p in TRT_MODULES))
    assert {"create_network", "build_serialized_network", "execute_async_v3", "deserialize_cuda_engine"} <= used
    assert used <= TRT11_API, f"not in TensorRT 11's API list: {sorted(used - TRT11_API)}"


class _Recorder:
    """A stand-in for TensorRT 11's Python module with exactly the API the builder may use; every call is recorded
    and anything else raises AttributeError, as it would on a real TensorRT 11 install."""

    def __init__(self, version: str):
        self.calls: list[tuple] = []
        self.module = self._module(version)

    def _obj(self, kind: str, **methods):
        recorder = self

        class Obj:
            def __getattr__(self, name):
                if name not in methods:
                    raise AttributeError(f"TensorRT {kind} has no attribute {name!r}")
                return lambda *args: (recorder.calls.append((f"{kind}.{name}", args)), methods[name](*args))[1]
        return Obj()

    def _module(self, version: str):
        trt = types.SimpleNamespace(__version__=version)
        trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
        trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
        trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1)
        profile = self._obj("IOptimizationProfile", set_shape=lambda *a: None)
        config = self._obj("IBuilderConfig", set_memory_pool_limit=lambda *a: None, add_optimization_profile=lambda p: 0)
        network = self._obj("INetworkDefinition")
        builder = self._obj("Builder", create_network=lambda flags: network, create_builder_config=lambda: config,
                            create_optimization_profile=lambda: profile,
                            build_serialized_network=lambda n, c: b"serialized-engine")
        trt.Builder = lambda logger: builder
        trt.OnnxParser = lambda network, logger: self._obj("OnnxParser", parse_from_file=lambda path: True)
        return trt


@pytest.mark.parametrize("version, flags", [("11.4.0", 0), ("10.15.1", 1 << 1)])
def test_builder_builds_strongly_typed_without_precision_flags(version, flags, tmp_path, monkeypatch):
    from detkd.export import tensorrt_build
    from test_export import tiny_detector, tiny_info

    fake = _Recorder(version)
    monkeypatch.setattr(tensorrt_build, "import_tensorrt", lambda: fake.module)
    monkeypatch.setattr(tensorrt_build, "this_machine", lambda v: {"tensorrt_version": v, "tensorrt_major": int(v[:2]),
                                                                    "device_name": "GPU", "compute_capability": "9.0"})
    info = tiny_info(tiny_detector("fasterrcnn"))
    onnx_path = tmp_path / "m_int8.onnx"
    onnx_path.write_bytes(b"onnx")
    built = tensorrt_build.build_engine(onnx_path, tmp_path / "m_int8.engine", "int8", info, max_batch=4)
    assert (tmp_path / "m_int8.engine").read_bytes() == b"serialized-engine"
    assert ("Builder.create_network", (flags,)) in fake.calls
    assert ("IOptimizationProfile.set_shape", ("images", (1, 3, 64, 64), (2, 3, 64, 64), (4, 3, 64, 64))) in fake.calls
    assert not any("flag" in name.lower() or "calibr" in name.lower() for name, _ in fake.calls)
    sidecar = json.loads((tmp_path / "m_int8.engine.json").read_text())
    assert sidecar["tensorrt_version"] == version and sidecar["strongly_typed"] and sidecar["precision"] == "int8"
    assert sidecar["source"] == onnx_path.name and built["strongly_typed"]


def test_tensorrt_9_cannot_build_strongly_typed_and_says_so():
    from detkd.export.tensorrt_build import network_flags

    old = types.SimpleNamespace(__version__="9.3.0", NetworkDefinitionCreationFlag=types.SimpleNamespace())
    with pytest.raises(BackendUnavailableError, match="TensorRT 9.3.0 cannot build strongly typed.*TensorRT 10 or later"):
        network_flags(old)


def test_tensorrt_absent_is_skipped_with_its_reason(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # what `import tensorrt` sees when it is not installed
    from detkd.export.stage import tensorrt_status
    from detkd.export.tensorrt_build import build_engine

    status = tensorrt_status()
    assert status == {"available": False, "reason": status["reason"]} and "TensorRT is not installed" in status["reason"]
    with pytest.raises(BackendUnavailableError, match=r"TensorRT is not installed \(pip install -e '\.\[gpu\]'"):
        build_engine("m.onnx", "m.engine", "fp32", None, 1)


def test_engine_from_another_tensorrt_major_or_weakly_typed_is_refused_with_rebuild_advice():
    here = {"tensorrt_version": "11.4.0", "tensorrt_major": 11, "device_name": "NVIDIA H100", "compute_capability": "9.0"}
    trt10 = {**here, "tensorrt_version": "10.15.1", "source": "models/export/distilled_fp16.onnx", "strongly_typed": True}
    with pytest.raises(ModelFileError, match=r"TensorRT 10.15.1 cannot run under TensorRT 11.4.0 \(another major version\); "
                                             r"rebuild it from models/export/distilled_fp16.onnx"):
        check_engine_compatibility(trt10, here, "x.engine")
    weak = {**here, "source": "m.onnx"}  # an 11.x sidecar without strongly_typed: written by the old builder
    with pytest.raises(ModelFileError, match="removed weak-typing precision flags.*rebuild it from m.onnx"):
        check_engine_compatibility(weak, here, "x.engine")
    check_engine_compatibility({**here, "strongly_typed": True}, here, "x.engine")  # same machine: fine
