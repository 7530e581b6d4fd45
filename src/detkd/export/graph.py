"""A trained torchvision detector re-expressed as a deployable graph with a fixed output contract.

Contract: ``DeployableDetector(detector)`` shares the detector's trained modules and computes the same
detections as its eval-mode forward for an input of exactly the export size, with static shapes apart
from the batch dimension, so that it exports to an ONNX graph TensorRT's parser accepts:

- input ``images``: float32 ``[B, 3, S, S]``, RGB in ``[0, 1]``, the image letterboxed (scaled as
  torchvision's transform scales it, top-left aligned) and padded with the normalisation mean (which
  normalises to 0, as torchvision's zero padding of the normalised batch);
- outputs ``boxes`` float32 ``[B, D, 4]`` (xyxy in input pixels), ``scores`` float32 ``[B, D]``,
  ``labels`` int64 ``[B, D]`` (1..K), ``num_dets`` int64 ``[B]``; rows past ``num_dets`` are zero.

Differences from the eager detector, by design: anchors are constants of the export size; boxes are
clipped to the padded input (torchvision clips to the unpadded resized image; the runner clips to the
original image afterwards); RetinaNet's background slot (label 0) is never reported. On inputs whose
letterboxed size equals the export size (the default dataset) the detections are the same up to float
rounding (tested).
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN, RetinaNet
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.ops import roi_align

from detkd.export.nms import gather_rows, nms_slots

INVALID_SCORE = -1.0  # scores of candidates that are filtered out; below every NMS score threshold


def export_size(detector: nn.Module) -> int:
    """Side of the square export input: the transform's ``max_size`` rounded up to its size divisor."""
    transform = detector.transform
    return int(math.ceil(transform.max_size / transform.size_divisible) * transform.size_divisible)


def accept_letterboxed(detector: nn.Module, size: int) -> tuple:
    """Make the eager detector's transform leave an ``S x S`` letterboxed input unscaled (``min_size =
    max_size = S``), so eager PyTorch sees exactly what the exported graph sees. Returns the previous
    ``(min_size, max_size)``."""
    transform = detector.transform
    saved = transform.min_size, transform.max_size
    transform.min_size, transform.max_size = (size,), size
    return saved


@contextlib.contextmanager
def letterboxed_input(detector: nn.Module, size: int):
    """``accept_letterboxed`` for the duration of the block."""
    saved = accept_letterboxed(detector, size)
    try:
        yield detector
    finally:
        detector.transform.min_size, detector.transform.max_size = saved


def _clip(boxes: Tensor, size: int) -> Tensor:
    return boxes.clamp(min=0.0, max=float(size))


def _not_small(boxes: Tensor, min_size: float) -> Tensor:
    return ((boxes[..., 2] - boxes[..., 0]) >= min_size) & ((boxes[..., 3] - boxes[..., 1]) >= min_size)


def _decode(box_coder, deltas: Tensor, anchors: Tensor) -> Tensor:
    """``deltas [B, N, 4*C]`` relative to ``anchors [B or 1, N, 4]`` -> ``[B, N, C, 4]`` boxes."""
    b, n = deltas.shape[:2]
    flat_anchors = anchors.expand(b, -1, -1).reshape(-1, 4)
    return box_coder.decode_single(deltas.reshape(b * n, -1), flat_anchors).reshape(b, n, -1, 4)


class _Detections(nn.Module):
    """Shared tail: class-aware NMS over candidates, then the padded output contract."""

    def __init__(self, size: int, max_detections: int, nms_threshold: float):
        super().__init__()
        self.size, self.max_detections, self.nms_threshold = size, max_detections, nms_threshold

    def forward(self, boxes: Tensor, scores: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``boxes [B, N, 4]``, ``scores [B, N]`` (``INVALID_SCORE`` = dropped), ``labels [B, N]``."""
        index = nms_slots(boxes, scores, labels, self.size, self.max_detections, self.nms_threshold, INVALID_SCORE / 2)
        valid = index >= 0
        out_scores = torch.where(valid, gather_rows(scores, index), torch.zeros_like(index, dtype=scores.dtype))
        out_labels = torch.where(valid, gather_rows(labels, index), torch.zeros_like(index))
        out_boxes = gather_rows(boxes, index) * valid.unsqueeze(-1).to(boxes.dtype)
        return out_boxes, out_scores, out_labels, valid.to(torch.int64).sum(dim=1)


class DeployableDetector(nn.Module):
    """See the module docstring. ``detector`` must be in eval mode; its modules are shared, not copied."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        if not isinstance(detector, (FasterRCNN, RetinaNet)):
            raise TypeError(f"unsupported detector type {type(detector).__name__}")
        self.detector = detector.eval()
        self.size = export_size(detector)
        transform = detector.transform
        self.register_buffer("mean", torch.tensor(transform.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(transform.image_std).view(1, 3, 1, 1), persistent=False)
        anchors, shapes = self._constant_anchors()
        self.register_buffer("anchors", anchors.unsqueeze(0), persistent=False)  # [1, N, 4]
        self.level_sizes = [int(h * w) for h, w in shapes]  # feature positions per pyramid level
        if isinstance(detector, FasterRCNN):
            self.tail = _Detections(self.size, detector.roi_heads.detections_per_img, detector.roi_heads.nms_thresh)
        else:
            self.tail = _Detections(self.size, detector.detections_per_img, detector.nms_thresh)

    @torch.no_grad()
    def _constant_anchors(self) -> tuple[Tensor, list[tuple[int, int]]]:
        probe = torch.zeros(1, 3, self.size, self.size, device=self.mean.device)
        feature_dict = self.detector.backbone(probe)
        features = list(feature_dict.values())
        generator = self.detector.rpn.anchor_generator if isinstance(self.detector, FasterRCNN) \
            else self.detector.anchor_generator
        anchors = generator(ImageList(probe, [(self.size, self.size)]), features)[0]
        if isinstance(self.detector, FasterRCNN):  # fixes the RoI pooler's scales for this input size
            pooler = self.detector.roi_heads.box_roi_pool
            pooler.scales, pooler.map_levels = None, None
            pooler(feature_dict, [torch.zeros(1, 4)], [(self.size, self.size)])
        return anchors, [tuple(f.shape[-2:]) for f in features]

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        features = self.detector.backbone((images - self.mean) / self.std)
        if isinstance(self.detector, FasterRCNN):
            boxes, scores, labels = self._faster_rcnn(features)
        else:
            boxes, scores, labels = self._retinanet(list(features.values()))
        return self.tail(boxes, scores, labels)

    # -- Faster R-CNN -------------------------------------------------------------------------------------

    def _proposals(self, features: list[Tensor]) -> tuple[Tensor, Tensor]:
        """RPN: per-level top-k, decode, clip, drop tiny boxes, NMS per level, best ``post_nms_top_n``."""
        rpn = self.detector.rpn
        batch = features[0].shape[0]
        objectness, deltas = concat_box_prediction_layers(*rpn.head(features))
        objectness, deltas = objectness.reshape(batch, -1), deltas.reshape(batch, -1, 4)  # [B, N], [B, N, 4]
        boxes = _decode(rpn.box_coder, deltas, self.anchors)[:, :, 0]  # not squeeze: exports as an If
        picked_scores, picked_boxes, picked_levels, start = [], [], [], 0
        for level, n in enumerate(self.level_sizes):
            n_anchors = n * rpn.anchor_generator.num_anchors_per_location()[level]
            k = min(rpn.pre_nms_top_n(), n_anchors)
            top, idx = objectness[:, start:start + n_anchors].topk(k, dim=1)
            picked_scores.append(top)
            picked_boxes.append(gather_rows(boxes[:, start:start + n_anchors], idx))
            picked_levels.append(torch.full_like(idx, level))
            start += n_anchors
        boxes = _clip(torch.cat(picked_boxes, dim=1), self.size)
        prob = torch.sigmoid(torch.cat(picked_scores, dim=1))
        keep = _not_small(boxes, rpn.min_size) & (prob >= rpn.score_thresh)
        prob = torch.where(keep, prob, torch.full_like(prob, INVALID_SCORE))
        index = nms_slots(boxes, prob, torch.cat(picked_levels, dim=1), self.size, rpn.post_nms_top_n(),
                          rpn.nms_thresh, INVALID_SCORE / 2)  # NMS per level, as torchvision's RPN
        return gather_rows(boxes, index), index >= 0

    def _pool(self, features: list[Tensor], proposals: Tensor) -> Tensor:
        """MultiScaleRoIAlign: each RoI pooled once, from the level torchvision's ``LevelMapper`` assigns.

        The RoIs of a level are found with ``NonZero`` on a float mask (TensorRT's parser takes NonZero on
        FP32/FP16 only) and pooled; one ``Gather`` puts the pooled RoIs back in their original order."""
        pooler = self.detector.roi_heads.box_roi_pool
        b, k = proposals.shape[:2]
        boxes = proposals.reshape(-1, 4)
        batch_index = torch.arange(b, device=boxes.device).unsqueeze(1).expand(b, k).reshape(-1, 1)
        rois = torch.cat([batch_index.to(boxes.dtype), boxes], dim=1)
        level = pooler.map_levels([boxes])  # torchvision's LevelMapper: [R] level index (padding RoIs -> 0)
        members, pooled = [], []
        for i in range(len(pooler.featmap_names)):
            index = torch.nonzero((level == i).to(torch.float32)).reshape(-1)
            members.append(index)
            pooled.append(roi_align(features[i], rois[index], pooler.output_size, pooler.scales[i], pooler.sampling_ratio))
        order = torch.cat(members)  # RoIs grouped by level; position_of[r] says where RoI r went
        position_of = torch.zeros_like(order).index_put((order,), torch.arange(order.shape[0], device=order.device))
        return torch.cat(pooled)[position_of]

    def _faster_rcnn(self, features: dict) -> tuple[Tensor, Tensor, Tensor]:
        heads = self.detector.roi_heads
        levels = list(features.values())
        proposals, valid = self._proposals(levels)  # [B, P, 4], [B, P]
        pooled = self._pool([features[n] for n in heads.box_roi_pool.featmap_names], proposals)
        logits, deltas = heads.box_predictor(heads.box_head(pooled))
        b, p = proposals.shape[:2]
        classes = logits.shape[-1]
        boxes = _clip(_decode(heads.box_coder, deltas.reshape(b, p, -1), proposals), self.size)  # [B,P,C,4]
        scores = torch.softmax(logits.reshape(b, p, classes), dim=-1)
        labels = torch.arange(classes, device=scores.device).view(1, 1, -1).expand(b, p, -1)
        boxes, scores, labels = boxes[:, :, 1:].reshape(b, -1, 4), scores[:, :, 1:], labels[:, :, 1:]
        keep = (scores > heads.score_thresh) & valid.unsqueeze(-1)
        scores, labels = scores.reshape(b, -1), labels.reshape(b, -1)
        keep = keep.reshape(b, -1) & _not_small(boxes, 1e-2)
        return boxes, torch.where(keep, scores, torch.full_like(scores, INVALID_SCORE)), labels

    # -- RetinaNet ------------------------------------------------------------------------------------------

    def _retinanet(self, features: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Per level: top-k class scores, decode their anchors, clip; then the shared NMS tail."""
        model = self.detector
        head = model.head
        outputs = head(features)
        logits, deltas = outputs["cls_logits"], outputs["bbox_regression"]  # [B, N, C], [B, N, 4]
        classes = int(head.classification_head.num_classes)  # a Python int: TopK's K must be a constant
        a = model.anchor_generator.num_anchors_per_location()[0]
        picked_boxes, picked_scores, picked_labels, start = [], [], [], 0
        for n in self.level_sizes:
            n_anchors = n * a
            scores = torch.sigmoid(logits[:, start:start + n_anchors]).reshape(logits.shape[0], -1)
            k = min(model.topk_candidates, n_anchors * classes)
            top, idx = scores.topk(k, dim=1)
            anchor_idx = torch.div(idx, classes, rounding_mode="floor")
            label = idx - anchor_idx * classes
            level_boxes = _decode(model.box_coder, gather_rows(deltas[:, start:start + n_anchors], anchor_idx),
                                  gather_rows(self.anchors.expand(logits.shape[0], -1, -1)[:, start:start + n_anchors],
                                              anchor_idx))[:, :, 0]
            keep = (top > model.score_thresh) & (label > 0)
            picked_scores.append(torch.where(keep, top, torch.full_like(top, INVALID_SCORE)))
            picked_boxes.append(_clip(level_boxes, self.size))
            picked_labels.append(label)
            start += n_anchors
        return torch.cat(picked_boxes, dim=1), torch.cat(picked_scores, dim=1), torch.cat(picked_labels, dim=1)
