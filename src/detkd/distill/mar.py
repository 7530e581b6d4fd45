"""MAR: Mask-guided feature and relation-based knowledge distillation (Zeng et al., IJCSE 2024).

Only the abstract is public: "multi-value masks" that focus the student on
close-to-object features, and relations between feature pixels of the classification head. Everything
below is a reconstruction from that abstract, reported as "MAR (re-implementation from abstract)":

Mask-guided feature term, per FPN level with a 1x1 student adapter A_l and a multi-value mask W
(``obj_value`` 1.0 inside any GT box, ``ring_value`` 0.5 inside the box enlarged ``ring_scale`` x about its
centre, ``bg_value`` 0.1 elsewhere; every box on every level, max where they overlap):
    L_mask = sum_l  sum W (A_l(S) - T)^2 / (C * sum_hw W)          (a mask-weighted mean per level)
Relation term on the classification branch (RetinaNet's cls tower, Faster R-CNN's RPN conv), per level
after adaptive average pooling to at most ``relation_size`` x ``relation_size`` (bounds memory):
    G = cosine-similarity matrix of the pixels [HW, HW];   L_rel = sum_l MSE_mean(G_S, G_T)
Total: w_mask * L_mask + w_relation * L_rel. The weights are starting points to tune.

Adapters (student side, trained with the student, never exported): ``adapters``, one 1x1 conv per FPN level
(student width -> teacher width). The relation term compares HW x HW pixel affinities, which do not depend
on the channel count, so it needs none.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detkd.distill.base import DistillInputs, DistillMethod, conv_adapter, register
from detkd.distill.masks import rasterise


def multi_value_mask(boxes: Tensor, stride: float, height: int, width: int, obj_value: float = 1.0,
                     ring_value: float = 0.5, bg_value: float = 0.1, ring_scale: float = 2.0) -> Tensor:
    """[H, W] graded mask: obj_value in boxes, ring_value in the enlarged boxes, bg_value elsewhere."""
    mask = torch.full((height, width), bg_value, device=boxes.device)
    if boxes.numel() == 0:
        return mask
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]) / 2 * ring_scale
    enlarged = torch.cat([centre - half, centre + half], dim=1).clamp(min=0)
    mask = torch.maximum(mask, rasterise(enlarged, stride, height, width) * ring_value)
    return torch.maximum(mask, rasterise(boxes, stride, height, width) * obj_value)


def pixel_affinity(x: Tensor, size: int) -> Tensor:
    """[N, HW, HW] cosine similarities between the pixels of x [N, C, H, W] pooled to <= size x size."""
    x = F.adaptive_avg_pool2d(x.float(), (min(size, x.shape[-2]), min(size, x.shape[-1])))
    v = F.normalize(x.flatten(2), dim=1)  # [N, C, HW]
    return v.transpose(1, 2) @ v


@register
class MAR(DistillMethod):
    name = "mar"
    weight_keys = ("w_mask", "w_relation")
    reads_student_cls_features = True

    def __init__(self, family: str, student_channels: int, teacher_channels: int, w_mask: float = 1.0,
                 w_relation: float = 1.0, obj_value: float = 1.0, ring_value: float = 0.5, bg_value: float = 0.1,
                 ring_scale: float = 2.0, relation_size: int = 16, num_levels: int = 5):
        super().__init__(family, student_channels, teacher_channels)
        self.w_mask, self.w_relation = w_mask, w_relation
        self.mask_values = dict(obj_value=obj_value, ring_value=ring_value, bg_value=bg_value, ring_scale=ring_scale)
        self.relation_size = relation_size
        self.adapters = nn.ModuleList(conv_adapter(student_channels, teacher_channels) for _ in range(num_levels))

    def mask_loss(self, inputs: DistillInputs) -> Tensor:
        size = inputs.images.tensors.shape[-1]
        total = 0.0
        for adapter, s, t in zip(self.adapters, inputs.student.features.values(), inputs.teacher_features.values()):
            h, w = t.shape[-2:]
            weights = torch.stack([multi_value_mask(tg["boxes"], size / w, h, w, **self.mask_values)
                                   for tg in inputs.targets])[:, None]  # [N, 1, H, W]
            total = total + (weights * (adapter(s) - t) ** 2).sum() / (t.shape[1] * weights.sum())
        return total

    def relation_loss(self, inputs: DistillInputs) -> Tensor:
        student, teacher = inputs.student_cls_features(), inputs.teacher_cls_features()
        return sum(F.mse_loss(pixel_affinity(s, self.relation_size), pixel_affinity(t, self.relation_size))
                   for s, t in zip(student, teacher))

    def forward(self, inputs: DistillInputs):
        return {"distill/mask_feature": self.w_mask * self.mask_loss(inputs),
                "distill/relation": self.w_relation * self.relation_loss(inputs)}
