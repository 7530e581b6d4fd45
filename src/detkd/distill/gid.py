"""GID: General Instance Distillation for object detection (Dai et al., CVPR 2021), after the authors'
detectron2 re-implementation.

General Instance Selection (GISM), GT-free, on the dense predictions (RetinaNet's head; for Faster R-CNN
the RPN, as the paper does for two-stage detectors):
    score_r = max_c |sigmoid(z_T^rc) - sigmoid(z_S^rc)|          (the paper's form; LD's implementation)
    box_r   = teacher-decoded box if the teacher is more confident at that class, else the student's;
all anchors of all levels pooled, top ``pre_nms_topk`` (3000) by score, boxes clipped to the image, boxes
with a side below ``min_box_side`` dropped, class-agnostic NMS at ``nms_iou`` (0.3), top ``k`` (10) per image.
Selection is detached. On the general instances (GIs):
    feature:  RoIAlign 10x10 of both FPNs, sum over channels of (t - s)^2 / (K_tot * 10 * 10)   (w 5e-4)
    relation: RKD distance over all GIs of the batch (as the code), d_ij / mean_{i!=j} d, smooth-L1 (beta 1)
              summed over i != j / (K_tot^2 - K_tot); 0 with fewer than 3 GIs                  (w 40)
    response: anchors the detector's own matcher assigns to a GI (ignored -> 0) form the mask M;
              BCE-with-logits(z_S, sigmoid(z_T)) summed over classes and masked anchors / N_M  (w 0.1)
              + L1 on their deltas / N_M                                                     (w 1.0)

Adapters (student side, trained with the student, never exported): ``adapter``, a 1x1 conv on the
student's pooled GI features, present only when the FPN widths differ (identity otherwise). The response
terms compare the dense heads' outputs, which have the same shape whatever the widths.

Choices (documented deviations): ``min_box_side`` is a hyper-parameter (10 px at COCO resolution is too
large for small inputs); RoIAlign is torchvision's multi-scale pooler (aligned=False, its level rule;
computed as a gather, ``detkd.distill.roi_pool``, equal to torchvision's and faster on CPU) rather than
ROIAlignV2; a student 1x1 adapter is applied when FPN widths differ (the reproduction's adapter is never
used, which only works for equal widths); for Faster R-CNN the response term applies to the RPN outputs
on GI-matched anchors (our reading: the paper does not spell out the two-stage response term).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import clip_boxes_to_image, remove_small_boxes

from detkd.distill.base import (POOL_LEVELS, DistillInputs, DistillMethod, first_k_nms, optional_roi_adapter, register,
                                zero_if_empty)
from detkd.distill.roi_pool import GatherMultiScaleRoIAlign
from detkd.models.view import DenseOutputs


@torch.no_grad()
def select_general_instances(student: DenseOutputs, teacher: DenseOutputs, image_sizes, k: int = 10,
                             pre_nms_topk: int = 3000, nms_iou: float = 0.3, min_box_side: float = 10.0) -> list[Tensor]:
    """GISM: per image, the boxes [<=k, 4] where teacher and student disagree most (see module docstring)."""
    p_s, p_t = torch.sigmoid(student.logits.float()), torch.sigmoid(teacher.logits.float())  # [N, HWA, C]
    score, cls = (p_t - p_s).abs().max(dim=2)  # [N, HWA]
    teacher_wins = p_t.gather(2, cls[..., None]).squeeze(2) > p_s.gather(2, cls[..., None]).squeeze(2)
    out = []
    for i, size in enumerate(image_sizes):
        top = score[i].topk(min(pre_nms_topk, score.shape[1])).indices
        boxes = torch.where(teacher_wins[i, top, None], teacher.decode(i, top), student.decode(i, top))
        boxes = clip_boxes_to_image(boxes, size)
        keep = remove_small_boxes(boxes, min_box_side)
        boxes, scores = boxes[keep], score[i, top][keep]
        keep = first_k_nms(boxes, scores, nms_iou, k)  # = nms(boxes, scores, nms_iou)[:k], tested
        out.append(boxes[keep])
    return out


def relation_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """RKD distance loss over instances [K, D]: normalised pairwise distances, smooth-L1 (beta 1), mean over i != j."""
    n = student.shape[0]
    if n < 3:
        return zero_if_empty(student)
    off = ~torch.eye(n, dtype=torch.bool, device=student.device)

    def distances(x: Tensor) -> Tensor:
        d = torch.cdist(x.flatten(1).float(), x.flatten(1).float())
        return d / d[off].mean().clamp_min(1e-12)

    d_s = distances(student)
    with torch.no_grad():
        d_t = distances(teacher)
    return F.smooth_l1_loss(d_s[off], d_t[off], beta=1.0, reduction="sum") / (n * n - n)


@register
class GID(DistillMethod):
    name = "gid"
    weight_keys = ("w_feature", "w_relation", "w_response_cls", "w_response_reg")
    needs_teacher_dense = True

    def __init__(self, family: str, student_channels: int, teacher_channels: int, k: int = 10,
                 pre_nms_topk: int = 3000, nms_iou: float = 0.3, min_box_side: float = 10.0, roi_size: int = 10,
                 w_feature: float = 5e-4, w_relation: float = 40.0, w_response_cls: float = 0.1,
                 w_response_reg: float = 1.0):
        super().__init__(family, student_channels, teacher_channels)
        self.k, self.pre_nms_topk, self.nms_iou, self.min_box_side = k, pre_nms_topk, nms_iou, min_box_side
        self.w_feature, self.w_relation = w_feature, w_relation
        self.w_response_cls, self.w_response_reg = w_response_cls, w_response_reg
        self.roi_size = roi_size
        self.pool = GatherMultiScaleRoIAlign(POOL_LEVELS, roi_size, 2)
        self.adapter = optional_roi_adapter(student_channels, teacher_channels)

    def forward(self, inputs: DistillInputs):
        st, te = inputs.student.dense, inputs.teacher_dense
        sizes = inputs.images.image_sizes
        gis = select_general_instances(st, te, sizes, self.k, self.pre_nms_topk, self.nms_iou, self.min_box_side)
        s_feat = self.adapter(self.pool(inputs.student.features, gis, sizes))  # [K_tot, C, r, r]
        with torch.no_grad():
            t_feat = self.pool(inputs.teacher_features, gis, sizes)
        k_tot = s_feat.shape[0]
        zero = zero_if_empty(st.logits) + zero_if_empty(s_feat)
        feature = ((t_feat - s_feat) ** 2).sum() / (k_tot * self.roi_size**2) if k_tot else zero
        relation = relation_loss(s_feat, t_feat) if k_tot else zero

        mask = torch.stack(st.match(gis)) >= 0  # [N, HWA]
        n_m = int(mask.sum())
        if n_m:
            s_l, t_l = st.logits[mask].float(), te.logits[mask].float()
            cls = F.binary_cross_entropy_with_logits(s_l, torch.sigmoid(t_l), reduction="sum") / n_m
            reg = (st.deltas[mask] - te.deltas[mask]).abs().sum() / n_m
        else:
            cls = reg = zero
        return {"distill/feature": self.w_feature * feature, "distill/relation": self.w_relation * relation,
                "distill/response_cls": self.w_response_cls * cls, "distill/response_reg": self.w_response_reg * reg}
