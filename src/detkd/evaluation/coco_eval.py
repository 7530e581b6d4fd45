"""COCO box AP with pycocotools, shared by every runner (PyTorch now, ONNX/TensorRT later).

Contract:
- ``predict(model, index, ...)`` runs a detector in eval mode over a split and returns detections in
  COCO result form (xywh boxes, the *file's* category ids, scores).
- ``evaluate_detections(annotation_file, detections, category_ids)`` returns
  ``{"metrics": {AP, AP50, AP75, APs, APm, APl, AR100}, "per_class": {name: AP}, "pr_curve": [...]}``.
  pycocotools' -1 ("no ground truth in this range") is kept as -1. No detections at all is a valid input
  (AP 0), not a crash.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
import torch
from tqdm import tqdm

from detkd.data.coco import CocoIndex
from detkd.data.dataset import DetectionDataset, make_loader

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100")


def detections_to_coco(
    image_id: int, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, category_ids: list[int]
) -> list[dict]:
    """xyxy boxes + contiguous labels (1..K) -> COCO result dicts (xywh, file category ids)."""
    out = []
    for (x0, y0, x1, y1), score, label in zip(boxes.tolist(), scores.tolist(), labels.tolist()):
        if not 1 <= label <= len(category_ids):
            continue  # background or an unused class slot
        out.append(
            {
                "image_id": int(image_id),
                "category_id": int(category_ids[label - 1]),
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "score": float(score),
            }
        )
    return out


@torch.no_grad()
def predict(
    model: torch.nn.Module, index: CocoIndex, batch_size: int = 8, device: torch.device = torch.device("cpu"),
    workers: int = 0, description: str = "predict",
) -> list[dict]:
    model.eval().to(device)
    loader = make_loader(DetectionDataset(index), batch_size, workers)
    detections: list[dict] = []
    for images, targets in tqdm(loader, desc=description, dynamic_ncols=True, mininterval=1.0):
        outputs = model([img.to(device) for img in images])
        for target, out in zip(targets, outputs):
            detections += detections_to_coco(
                target["image_id"], out["boxes"].cpu().numpy(), out["scores"].cpu().numpy(),
                out["labels"].cpu().numpy(), index.category_ids,
            )
    return detections


def _quiet(fn: Callable, *args):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def evaluate_detections(annotation_file: str | Path, detections: Iterable[dict], category_ids: list[int],
                        category_names: Optional[list[str]] = None) -> dict:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = _quiet(COCO, str(annotation_file))
    detections = list(detections)
    if detections:
        dt = _quiet(gt.loadRes, copy.deepcopy(detections))
    else:  # loadRes cannot take an empty list; an empty result set is still a valid (AP 0) answer
        dt = COCO()
        dt.dataset = {"images": gt.dataset["images"], "categories": copy.deepcopy(gt.dataset["categories"]), "annotations": []}
        _quiet(dt.createIndex)
    ev = COCOeval(gt, dt, "bbox")
    ev.params.catIds = list(category_ids)
    _quiet(ev.evaluate)
    _quiet(ev.accumulate)
    _quiet(ev.summarize)
    metrics = {name: float(v) for name, v in zip(METRIC_NAMES, ev.stats[[0, 1, 2, 3, 4, 5, 6, 7, 8]])}

    # precision: [T iou, R recall, K class, A area, M maxdets]; -1 where undefined
    precision = ev.eval["precision"]
    names = category_names or [str(c) for c in category_ids]
    per_class = {}
    for k, name in enumerate(names):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        per_class[name] = float(p.mean()) if p.size else -1.0
    # PR curve at IoU 0.5, all areas, 100 dets, averaged over the classes that have ground truth
    p50 = precision[0, :, :, 0, -1]  # [R, K]
    valid = (p50 > -1).all(axis=0)
    curve = p50[:, valid].mean(axis=1) if valid.any() else np.zeros(p50.shape[0])
    pr_curve = [{"recall": float(r), "precision": float(p)} for r, p in zip(ev.params.recThrs, curve)]
    return {"metrics": metrics, "per_class": per_class, "pr_curve": pr_curve, "num_detections": len(detections)}


def write_detections(path: str | Path, detections: list[dict]) -> None:
    from detkd.io import atomic_write_text

    atomic_write_text(path, json.dumps(detections))
