"""Reduced-precision artefacts (ModelOpt INT8 Q/DQ, FP16 AutoCast) and the OpenVINO runner on real exported graphs."""

import sys

import numpy as np
import onnx
import pytest

from detkd.errors import BackendUnavailableError, ExportError
from detkd.export.gate import Tolerance, match_detections
from detkd.export.onnx_export import export_onnx
from detkd.export.quantize import (NETWORK_SCOPES, calibration_set, check_calibration, convert_fp16, import_modelopt,
                                   network_nodes, quantize_int8)
from detkd.export.trt_check import check_model
from detkd.runtime.metadata import read_model_info

from test_export import SIZE, tiny_detector, tiny_info

pytest.importorskip("modelopt.onnx.quantization", reason="NVIDIA ModelOpt is not installed (pip install -e '.[quantize]')")

# what must stay FP32: box decoding, top-k selection, NMS and the output-slot arithmetic
FLOAT_ONLY_OPS = {"TopK", "NonMaxSuppression", "Exp", "Log", "CumSum", "ScatterND", "NonZero", "GatherElements"}


def _inside_network(name: str) -> bool:
    return name.startswith(tuple(f"/{s}/" for s in NETWORK_SCOPES))


@pytest.fixture(scope="module", params=["fasterrcnn", "retinanet"])
def exported(request, tmp_path_factory):
    model = tiny_detector(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    export_onnx(model, tiny_info(model), folder / "m.onnx")
    calibration = np.random.default_rng(0).random((8, 3, SIZE, SIZE), dtype=np.float32)
    int8 = quantize_int8(folder / "m.onnx", folder / "m_int8.onnx", calibration)
    fp16 = convert_fp16(folder / "m.onnx", folder / "m_fp16.onnx")
    return request.param, model, folder, int8, fp16


def test_int8_qdq_only_in_the_network_never_on_decoding_topk_or_nms(exported):
    family, _, folder, facts, _ = exported
    model = onnx.load(str(folder / "m_int8.onnx"))
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert facts["dequantize_nodes"] > 10 and len(qdq) == facts["quantize_nodes"] + facts["dequantize_nodes"]
    for node in qdq:
        for consumer in consumers.get(node.output[0], []):
            assert consumer.op_type not in FLOAT_ONLY_OPS, (node.name, consumer.name)
            if node.op_type == "DequantizeLinear" and not _inside_network(consumer.name):
                # outside the network a dequantized tensor only feeds float ops that read features (RoI pooling)
                assert consumer.op_type in ("RoiAlign", "Shape"), (family, node.name, consumer.name, consumer.op_type)
    # the convolutions themselves are quantized: every network Conv reads a dequantized activation
    producers = {o: n for n in model.graph.node for o in n.output}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert convs and all(producers[c.input[0]].op_type == "DequantizeLinear" for c in convs)
    # weights are stored as INT8 (DQ-only weights): the file is much smaller than the FP32 one
    assert facts["size_mb"] < 0.4 * (folder / "m.onnx").stat().st_size / 2**20
    assert any(i.data_type == onnx.TensorProto.INT8 for i in model.graph.initializer)


def test_reduced_precision_files_keep_the_contract_metadata_and_pass_the_tensorrt_check(exported):
    _, _, folder, int8, fp16 = exported
    for path, facts in ((folder / "m_int8.onnx", int8), (folder / "m_fp16.onnx", fp16)):
        model = onnx.load(str(path))
        assert check_model(model) == [] and facts["tensorrt_static_check"]["passed"]
        assert [i.name for i in model.graph.input] == ["images"]
        assert [o.name for o in model.graph.output] == ["boxes", "scores", "labels", "num_dets"]
        assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # FP32 in and out
        assert [o.type.tensor_type.elem_type for o in model.graph.output][:2] == [onnx.TensorProto.FLOAT] * 2
        assert read_model_info(path) == read_model_info(folder / "m.onnx")
    assert fp16["cast_nodes"] > 0 and int8["calibration_images"] == 8


def test_fp16_casts_only_inside_the_network(exported):
    _, _, folder, _, _ = exported
    model = onnx.load(str(folder / "m_fp16.onnx"))
    to_fp16 = [n for n in model.graph.node if n.op_type == "Cast"
               and next(a.i for a in n.attribute if a.name == "to") == onnx.TensorProto.FLOAT16]
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    assert to_fp16
    for cast in to_fp16:
        assert all(_inside_network(c.name) or c.op_type == "Cast" for c in consumers.get(cast.output[0], [])), cast.name
    fp16_weights = [i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16]
    assert fp16_weights and len(network_nodes(model)) > 0


def test_openvino_fp32_equals_onnxruntime_within_the_raw_output_tolerance(exported):
    pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install -e '.[openvino]')")
    from detkd.runtime.onnx_runner import OnnxRunner
    from detkd.runtime.openvino_runner import OpenVINORunner

    _, _, folder, _, _ = exported
    ov, ort = OpenVINORunner(folder / "m.onnx", precision="f32"), OnnxRunner(folder / "m.onnx")
    assert ov.precision_hint == "f32" and ov.backend == "openvino-cpu"
    batch = np.random.default_rng(5).random((3, 3, SIZE, SIZE), dtype=np.float32)
    a, b = ort.infer(batch), ov.infer(batch)
    assert np.array_equal(a[3], b[3])
    matched = 0
    for i in range(3):
        n = int(a[3][i])
        result = match_detections({"boxes": a[0][i, :n], "scores": a[1][i, :n], "labels": a[2][i, :n]},
                                  {"boxes": b[0][i, :n], "scores": b[1][i, :n], "labels": b[2][i, :n]}, Tolerance())
        assert result["unmatched"] == 0
        matched += result["matched"]
    assert matched > 5
    # every artefact loads on OpenVINO, and its outputs keep the contract's shapes and types
    for name in ("m_int8.onnx", "m_fp16.onnx"):
        out = OpenVINORunner(folder / name).infer(batch)
        assert out[0].shape == a[0].shape and out[2].dtype == np.int64 and out[0].dtype == np.float32


def test_calibration_set_errors_are_one_line(coco_like):
    from detkd.data.coco import read_coco

    annotations, images = coco_like
    index = read_coco(annotations, images)
    info = tiny_info(tiny_detector("fasterrcnn"))
    batch = calibration_set(index, info, 2)
    assert batch.shape == (2, 3, SIZE, SIZE) and batch.dtype == np.float32
    with pytest.raises(ExportError, match=r"calibration_images is 99 but the train split has only \d+ images"):
        calibration_set(index, info, 99)
    with pytest.raises(ExportError, match="needs at least 1 image"):
        calibration_set(index, info, 0)
    index.images[0].path.write_bytes(b"garbage")
    with pytest.raises(ExportError, match="INT8 calibration image unusable: .*not a readable image"):
        calibration_set(index, info, 1)
    with pytest.raises(ExportError, match=r"float32 array \[N, 3, 64, 64\] with N >= 1, got float64 \[2, 3, 32, 32\]"):
        check_calibration(np.zeros((2, 3, 32, 32)), SIZE)


def test_modelopt_absent_is_a_reason_not_a_crash(monkeypatch):
    for name in [m for m in sys.modules if m == "modelopt" or m.startswith("modelopt.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "modelopt", None)  # what `import modelopt` sees when it is not installed
    with pytest.raises(BackendUnavailableError, match=r"ModelOpt.*pip install -e '\.\[quantize\]'"):
        import_modelopt()


def test_one_onnxruntime_build_in_the_environment():
    """ModelOpt's [onnx] extra would add onnxruntime-gpu into the same package folder; the quantize extra must not."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(dist):
        try:
            return version(dist)
        except PackageNotFoundError:
            return None

    builds = [d for d in ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino") if installed(d)]
    assert len(builds) == 1, builds
