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
from torchvision.models.detection._utils import BoxCoder, Matcher
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import fastrcnn_loss
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.ops import box_iou


@dataclass
class DenseOutputs:
    """Per-anchor predictions: RetinaNet's head, or Faster R-CNN's RPN (one objectness logit)."""

    logits: Tensor  # [N, HWA, C] class logits (RetinaNet, C = K+1) or objectness (RPN, C = 1)
    deltas: Tensor  # [N, HWA, 4]
    anchors: list[Tensor]  # per image [HWA, 4]
    num_per_level: list[int]  # anchors per level (HWA split)
    box_coder: BoxCoder
    matcher: Matcher  # the detector's own anchor assigner

    def match(self, boxes_per_image: list[Tensor]) -> list[Tensor]:
        """Assign anchors to ``boxes`` with the detector's matcher: [HWA] per image, -1 bg, -2 ignored."""
        out = []
        for anchors, boxes in zip(self.anchors, boxes_per_image):
            if boxes.numel() == 0:
                out.append(torch.full((anchors.shape[0],), -1, dtype=torch.int64, device=anchors.device))
            else:
                out.append(self.matcher(box_iou(boxes, anchors)))
        return out

    def decode(self, image: int, index: Tensor, deltas: Optional[Tensor] = None) -> Tensor:
        """Boxes [k, 4] decoded from the deltas (default: these outputs') at anchor ``index`` of ``image``."""
        d = (self.deltas if deltas is None else deltas)[image][index]
        return self.box_coder.decode_single(d.float(), self.anchors[image][index])


def rpn_dense(model: nn.Module, images: ImageList, features) -> DenseOutputs:
    rpn = model.rpn
    levels = list(features.values())
    objectness, deltas = rpn.head(levels)
    anchors = rpn.anchor_generator(images, levels)
    per_level = [o.shape[1] * o.shape[2] * o.shape[3] for o in objectness]
    objectness, deltas = concat_box_prediction_layers(objectness, deltas)
    n = len(anchors)
    return DenseOutputs(objectness.view(n, -1, 1), deltas.view(n, -1, 4), anchors, per_level, rpn.box_coder,
                        rpn.proposal_matcher)


def retinanet_dense(model: nn.Module, images: ImageList, features) -> DenseOutputs:
    levels = list(features.values())
    out = model.head(levels)
    anchors = model.anchor_generator(images, levels)
    hw = [f.shape[-2] * f.shape[-1] for f in levels]
    per_anchor = out["cls_logits"].shape[1] // sum(hw)
    return DenseOutputs(out["cls_logits"], out["bbox_regression"], anchors, [x * per_anchor for x in hw],
                        model.box_coder, model.proposal_matcher)


def dense_outputs(model: nn.Module, images: ImageList, features) -> DenseOutputs:
    return rpn_dense(model, images, features) if hasattr(model, "roi_heads") else retinanet_dense(model, images, features)


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
    # dense: RetinaNet's head or Faster R-CNN's RPN
    dense: Optional[DenseOutputs] = None
    matched_idxs: Optional[list[Tensor]] = None  # GT match per anchor [HWA] (RetinaNet), -1 bg, -2 ignored


def transform_batch(model: nn.Module, images: list[Tensor], targets: Optional[list[dict]] = None):
    """Resize + normalise with the model's own ``GeneralizedRCNNTransform`` -> (ImageList, targets)."""
    return model.transform(images, targets)


def fasterrcnn_forward(model: nn.Module, images: ImageList, targets: list[dict]) -> DetectorTensors:
    """Faster R-CNN training forward (``model.training`` must be True); the RPN steps are torchvision's
    ``RegionProposalNetwork.forward`` spelled out so its dense outputs can be returned."""
    features = model.backbone(images.tensors)
    rpn = model.rpn
    dense = rpn_dense(model, images, features)
    objectness, deltas = dense.logits.reshape(-1, 1), dense.deltas.reshape(-1, 4)
    n = len(dense.anchors)
    proposals = rpn.box_coder.decode(deltas.detach(), dense.anchors).view(n, -1, 4)
    proposals, _scores = rpn.filter_proposals(proposals, objectness, images.image_sizes, dense.num_per_level)
    labels_a, matched_boxes = rpn.assign_targets_to_anchors(dense.anchors, targets)
    regression_targets = rpn.box_coder.encode(matched_boxes, dense.anchors)
    loss_objectness, loss_rpn_box_reg = rpn.compute_loss(objectness, deltas, labels_a, regression_targets)

    heads = model.roi_heads
    rois, _matched, labels, regression_targets = heads.select_training_samples(proposals, targets)
    pooled = heads.box_roi_pool(features, rois, images.image_sizes)  # [R, C, 7, 7]
    class_logits, box_deltas = heads.box_predictor(heads.box_head(pooled))
    loss_classifier, loss_box_reg = fastrcnn_loss(class_logits, box_deltas, labels, regression_targets)
    losses = {"loss_objectness": loss_objectness, "loss_rpn_box_reg": loss_rpn_box_reg,
              "loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}
    return DetectorTensors(features, losses, proposals=[p.detach() for p in proposals], rois=rois, roi_labels=labels,
                           roi_features=pooled, class_logits=class_logits, box_deltas=box_deltas, dense=dense)


def retinanet_forward(model: nn.Module, images: ImageList, targets: list[dict]) -> DetectorTensors:
    """RetinaNet training forward (``model.training`` must be True)."""
    features = model.backbone(images.tensors)
    dense = retinanet_dense(model, images, features)
    matched = dense.match([t["boxes"] for t in targets])
    head_outputs = {"cls_logits": dense.logits, "bbox_regression": dense.deltas}
    losses = model.head.compute_loss(targets, head_outputs, dense.anchors, matched)
    return DetectorTensors(features, losses, dense=dense, matched_idxs=matched)


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


def classification_branch(model: nn.Module) -> nn.Module:
    """The module the classification branch applies per level: RetinaNet's 4-conv cls tower, or Faster
    R-CNN's RPN head shared 3x3 conv (+ReLU)."""
    return model.rpn.head.conv if hasattr(model, "roi_heads") else model.head.classification_head.conv


def classification_features(model: nn.Module, features) -> list[Tensor]:
    """Per level, the features the classification branch sees. [N, C, H_l, W_l] each."""
    branch = classification_branch(model)
    return [branch(f) for f in features.values()]
