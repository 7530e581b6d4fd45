import json

import pytest

from detkd.evaluation.coco_eval import detections_to_coco, evaluate_detections

from conftest import write_coco


@pytest.fixture
def gt_file(tmp_path):
    images = [{"id": i, "file_name": f"{i}.png", "width": 100, "height": 100} for i in (1, 2)]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 10, 20, 20], "area": 400, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 8, "bbox": [50, 50, 40, 30], "area": 1200, "iscrowd": 0},
        {"id": 3, "image_id": 2, "category_id": 3, "bbox": [5, 60, 60, 35], "area": 2100, "iscrowd": 0},
    ]
    cats = [{"id": 3, "name": "car"}, {"id": 8, "name": "truck"}]
    return write_coco(tmp_path / "gt.json", images, anns, cats)


def test_perfect_predictions_give_ap_one(gt_file):
    gt = json.loads(gt_file.read_text())
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9} for a in gt["annotations"]]
    result = evaluate_detections(gt_file, dets, [3, 8], ["car", "truck"])
    assert result["metrics"]["AP"] == pytest.approx(1.0)
    assert result["metrics"]["AP50"] == pytest.approx(1.0)
    assert result["per_class"] == {"car": pytest.approx(1.0), "truck": pytest.approx(1.0)}
    assert result["metrics"]["APl"] == -1.0  # no ground truth in that size range: pycocotools' -1 is kept


def test_no_predictions_give_ap_zero(gt_file):
    result = evaluate_detections(gt_file, [], [3, 8])
    assert result["metrics"]["AP"] == 0.0 and result["metrics"]["AP50"] == 0.0
    assert result["num_detections"] == 0


def test_wrong_class_or_box_lowers_ap(gt_file):
    dets = [{"image_id": 1, "category_id": 8, "bbox": [10, 10, 20, 20], "score": 0.9},  # wrong class
            {"image_id": 1, "category_id": 8, "bbox": [50, 50, 40, 30], "score": 0.8},
            {"image_id": 2, "category_id": 3, "bbox": [5, 60, 60, 35], "score": 0.7}]
    result = evaluate_detections(gt_file, dets, [3, 8], ["car", "truck"])
    assert result["per_class"]["truck"] < 1.0 and 0.0 < result["metrics"]["AP"] < 1.0


def test_contiguous_labels_map_back_to_file_ids():
    import numpy as np

    out = detections_to_coco(7, np.array([[1.0, 2.0, 11.0, 22.0], [0, 0, 5, 5]]), np.array([0.5, 0.4]), np.array([2, 0]), [3, 8])
    assert out == [{"image_id": 7, "category_id": 8, "bbox": [1.0, 2.0, 10.0, 20.0], "score": 0.5}]
