"""Deployable graph and ONNX export: same detections as the eager detector, TensorRT-checkable, described."""

import numpy as np
import onnx
import pytest
import torch

from detkd.config import DetectorConfig
from detkd.errors import ExportError
from detkd.export.graph import DeployableDetector, export_size
from detkd.export.nms import onnx_nms, pad_selection
from detkd.export.onnx_export import export_onnx
from detkd.export.trt_check import check_model
from detkd.models.builder import build_detector, make_spec
from detkd.runtime.metadata import ModelInfo
from detkd.runtime.onnx_runner import OnnxRunner

SIZE = 64


def tiny_detector(family: str, seed: int = 0, num_classes: int = 3):
    torch.manual_seed(seed)
    cfg = DetectorConfig(min_size=SIZE, max_size=SIZE, fpn_channels=16, representation_size=32,
                         rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=50, detections_per_image=20)
    model = build_detector(make_spec(family, "resnet18", num_classes, cfg)).eval()
    with torch.no_grad():  # random heads score everything ~uniformly; tilt them so that detections pass 0.05
        if family == "retinanet":
            model.head.classification_head.cls_logits.bias.fill_(-2.0)
        else:
            model.roi_heads.box_predictor.cls_score.bias[1:] += 2.0
    return model


def tiny_info(model, class_names=("a", "b", "c")) -> ModelInfo:
    return ModelInfo(class_names=list(class_names), category_ids=[1, 2, 3], input_size=export_size(model),
                     min_size=SIZE, max_size=SIZE, image_mean=list(model.transform.image_mean),
                     image_std=list(model.transform.image_std), max_detections=20, family="x", backbone="resnet18")


def images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["fasterrcnn", "retinanet"])
def test_deployable_graph_reproduces_the_eager_detections(family):
    model = tiny_detector(family)
    graph = DeployableDetector(model)
    batch = images(3)
    with torch.no_grad():
        reference = model(list(batch))
        boxes, scores, labels, counts = graph(batch)
    assert boxes.shape == (3, 20, 4) and scores.shape == (3, 20) and labels.dtype == torch.int64
    compared = 0
    for i, ref in enumerate(reference):
        fg = ref["labels"] > 0  # RetinaNet's background slot is never reported by the graph
        n = int(counts[i])
        m = min(n, int(fg.sum()))
        if family == "fasterrcnn":
            assert n == len(ref["boxes"])
        torch.testing.assert_close(boxes[i, :m], ref["boxes"][fg][:m])
        torch.testing.assert_close(scores[i, :m], ref["scores"][fg][:m])
        assert torch.equal(labels[i, :m], ref["labels"][fg][:m])
        assert (scores[i, n:] == 0).all() and (boxes[i, n:] == 0).all()  # padding rows are zero
        compared += m
    assert compared > 5  # the test compared real detections, not empty lists


def test_padded_selection_ranks_rows_per_image_whatever_their_order():
    selected = torch.tensor([[1, 0, 7], [0, 0, 3], [1, 0, 2], [0, 0, 9], [1, 0, 5]])
    padded = pad_selection(selected, torch.zeros(3, 4), 4)
    assert padded.tolist() == [[3, 9, -1, -1], [7, 2, 5, -1], [-1, -1, -1, -1]]


def test_nms_reference_semantics():
    boxes = torch.tensor([[[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30], [0, 0, 10, 10.]]])
    scores = torch.tensor([[0.9, 0.8, 0.7, -1.0]])
    rows = onnx_nms(boxes, scores, max_output=10, iou_threshold=0.5, score_threshold=0.0)
    assert rows.tolist() == [[0, 0, 0], [0, 0, 2]]  # the overlapping box and the filtered one are gone
    assert onnx_nms(boxes, scores, 1, 0.5, 0.0).tolist() == [[0, 0, 0]]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = tiny_detector("fasterrcnn")
    path = tmp_path_factory.mktemp("export") / "tiny.onnx"
    facts = export_onnx(model, tiny_info(model), path)
    return model, path, facts


def test_onnx_export_matches_pytorch_for_any_batch_and_passes_the_tensorrt_check(exported):
    model, path, facts = exported
    assert facts["opset"] == 17 and facts["nodes"] < facts["nodes_before_simplify"]
    proto = onnx.load(str(path))
    assert check_model(proto) == []
    ops = {n.op_type for n in proto.graph.node}
    assert "NonMaxSuppression" in ops and "RoiAlign" in ops
    shapes = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in proto.graph.output}
    detections = tiny_info(model).max_detections
    assert shapes == {"boxes": ["batch", detections, 4], "scores": ["batch", detections],
                      "labels": ["batch", detections], "num_dets": ["batch"]}  # static but for the batch
    runner = OnnxRunner(path)
    graph = DeployableDetector(model)
    for n in (1, 3):
        batch = images(n, seed=n)
        with torch.no_grad():
            expected = graph(batch)
        for got, want in zip(runner.infer(batch.numpy()), expected):
            np.testing.assert_allclose(got, want.numpy(), atol=1e-3, rtol=1e-4)


def test_metadata_round_trips(exported):
    model, path, _ = exported
    info = OnnxRunner(path).info
    assert info == tiny_info(model)
    assert info.input_size == SIZE and info.class_names == ["a", "b", "c"]


def test_opset_below_17_is_refused(tmp_path):
    model = tiny_detector("fasterrcnn")
    with pytest.raises(ExportError, match="opset 17"):
        export_onnx(model, tiny_info(model), tmp_path / "x.onnx", opset=16)
    assert not (tmp_path / "x.onnx").exists()


def test_retinanet_export_passes_the_tensorrt_check_and_matches(tmp_path):
    model = tiny_detector("retinanet")
    path = tmp_path / "retina.onnx"
    export_onnx(model, tiny_info(model), path)
    assert check_model(onnx.load(str(path))) == []
    batch = images(2)
    with torch.no_grad():
        expected = DeployableDetector(model)(batch)
    for got, want in zip(OnnxRunner(path).infer(batch.numpy()), expected):
        np.testing.assert_allclose(got, want.numpy(), atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("family", ["fasterrcnn", "retinanet"])
def test_images_without_detections_give_zero_rows_in_onnx(family, tmp_path):
    """NMS selecting nothing (every score under the threshold) is a valid, empty answer, not an error."""
    model = tiny_detector(family)
    with torch.no_grad():
        if family == "retinanet":
            model.head.classification_head.cls_logits.bias.fill_(-20.0)
        else:
            model.roi_heads.box_predictor.cls_score.bias[1:] -= 50.0
    path = tmp_path / "empty.onnx"
    export_onnx(model, tiny_info(model), path)
    boxes, scores, labels, counts = OnnxRunner(path).infer(images(2).numpy())
    assert counts.tolist() == [0, 0] and not scores.any() and not boxes.any() and not labels.any()
    with torch.no_grad():
        assert all(len(d["boxes"]) == 0 for d in model(list(images(2))))
