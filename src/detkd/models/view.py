"""Training-mode forwards of torchvision detectors that expose their intermediate tensors.

Distillation needs what ``model(images, targets)`` computes but does not return: the FPN features, the
sampled RoIs with their labels, the pooled RoI features, head logits and box deltas, anchors and their
matches. These functions call the model's own sub-modules in the same order as torchvision's
``forward`` so the detector losses are identical, and return the tensors beside the losses.

Contracts (shapes in comments): images are already transformed (``ImageList`` from the *student's*
``model.transform``) and targets are in that resized input frame, so teacher and student see exactly the
same batch.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import fastrcnn_loss


@dataclass
class DetectorTensors:
    """What one training forward exposes. Fields a family does not have stay ``None``/empty."""

    features: "OrderedDict[str, Tensor]"  # level name -> [N, C, H_l, W_l]
    losses: dict[str, Tensor] = field(default_factory=dict)
    # two-stage
    proposals: Optional[list[Tensor]] = None  # RPN output per image [P_i, 4] (detached)
    rois: Optional[list[Tensor]] = None  # sampled RoIs per image [R_i, 4]
    roi_labels: Optional[list[Tensor]] = None  # [R_i], 0 = background
    roi_features: Optional[Tensor] = None  # pooled [R, C, 7, 7]
    class_logits: Optional[Tensor] = None  # [R, K+1]
    box_deltas: Optional[Tensor] = None  # [R, (K+1)*4]
    # one-stage
    head_outputs: Optional[dict[str, Tensor]] = None  # cls_logits [N, HWA, K+1], bbox_regression [N, HWA, 4]
    anchors: Optional[list[Tensor]] = None  # per image [HWA, 4]
    matched_idxs: Optional[list[Tensor]] = None  # per image [HWA], -1 bg, -2 ignore, else GT index


def transform_batch(model: nn.Module, images: list[Tensor], targets: Optional[list[dict]] = None):
    """Resize + normalise with the model's own ``GeneralizedRCNNTransform`` -> (ImageList, targets)."""
    return model.transform(images, targets)


def fasterrcnn_forward(model: nn.Module, images: ImageList, targets: list[dict]) -> DetectorTensors:
    """Faster R-CNN training forward (``model.training`` must be True)."""
    features = model.backbone(images.tensors)
    proposals, rpn_losses = model.rpn(images, features, targets)
    heads = model.roi_heads
    rois, _matched, labels, regression_targets = heads.select_training_samples(proposals, targets)
    pooled = heads.box_roi_pool(features, rois, images.image_sizes)  # [R, C, 7, 7]
    class_logits, box_deltas = heads.box_predictor(heads.box_head(pooled))
    loss_classifier, loss_box_reg = fastrcnn_loss(class_logits, box_deltas, labels, regression_targets)
    losses = {**rpn_losses, "loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}
    return DetectorTensors(features, losses, proposals=[p.detach() for p in proposals], rois=rois, roi_labels=labels,
                           roi_features=pooled, class_logits=class_logits, box_deltas=box_deltas)


def retinanet_forward(model: nn.Module, images: ImageList, targets: list[dict]) -> DetectorTensors:
    """RetinaNet training forward (``model.training`` must be True)."""
    features = model.backbone(images.tensors)
    levels = list(features.values())
    head_outputs = model.head(levels)
    anchors = model.anchor_generator(images, levels)
    matched = []
    for anchors_i, t in zip(anchors, targets):
        if t["boxes"].numel() == 0:
            matched.append(torch.full((anchors_i.shape[0],), -1, dtype=torch.int64, device=anchors_i.device))
        else:
            from torchvision.ops import box_iou

            matched.append(model.proposal_matcher(box_iou(t["boxes"], anchors_i)))
    losses = model.head.compute_loss(targets, head_outputs, anchors, matched)
    return DetectorTensors(features, losses, head_outputs=head_outputs, anchors=anchors, matched_idxs=matched)


def train_forward(model: nn.Module, images: ImageList, targets: list[dict]) -> DetectorTensors:
    """Dispatch on the detector family."""
    return fasterrcnn_forward(model, images, targets) if hasattr(model, "roi_heads") else retinanet_forward(model, images, targets)


def roi_head_outputs(model: nn.Module, features, rois: list[Tensor], image_sizes) -> tuple[Tensor, Tensor, Tensor]:
    """Pool ``rois`` from ``features`` with ``model``'s RoI pooler and run its box head:
    (pooled [R, C, 7, 7], class logits [R, K+1], box deltas [R, (K+1)*4])."""
    heads = model.roi_heads
    pooled = heads.box_roi_pool(features, rois, image_sizes)
    logits, deltas = heads.box_predictor(heads.box_head(pooled))
    return pooled, logits, deltas
