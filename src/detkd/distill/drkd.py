"""DRKD: Dual Relation Knowledge Distillation (Ni et al., IJCAI 2023), after the released two-stage code.

Pixel-wise relation: one GloRe graph-reasoning unit per FPN level on each side (trainable, owned by the
method), a 1x1 adapter after the student's:  L_PR = sum_l || A_l(phi_S,l(F_S^l)) - phi_T,l(F_T^l) ||_F
(Frobenius norm over the whole batch tensor, not squared, not averaged; weight 1e-3).
Instance-wise relation: GT boxes RoIAligned to 3x3 on the first two FPN levels (P2, P3 for Faster R-CNN;
P3, P4 for RetinaNet on P3-P7; all GT on both levels), per image an embedded-Gaussian relation block with a relation
filter on each side:  L_IR = sum_levels sum_images || A'(z_S) - z_T ||_F  (weight 4e-3), and the plain
instance imitation  L_INS = sum_levels sum_images || A''(R_S) - R_T ||_F  (weight 2.4e-3).

Adapters (student side, trained with the student, never exported): ``pixel_adapters`` (1x1 per level),
``relation_adapters`` and ``instance_adapters`` (1x1 on the 3x3 instance maps), all student width ->
teacher width, plus the student-side units ``student_glore`` and ``student_relation`` (student width).
The teacher-side units ``teacher_glore`` / ``teacher_relation`` (teacher width) are trained too but only
ever see the frozen teacher's features. None of them is part of the student network.

Choices (documented, tested):
- The relation filter is *learned* (paper intent), not the released code's fresh random ``nn.Linear``
  per call: M = row-softmax of scaled dot products of small learned projections of the instances,
  which works for any number of instances n; the relation logits are multiplied by M before the softmax.
- GloRe widths scale with the FPN width C: ``mid`` = C/4 on the first two levels and C on the others
  (the code's 64 and 256 for C = 256).
- RetinaNet uses the same three terms on its five levels (the released one-stage code cannot run).
- The teacher-side GloRe/relation units are trained with the student, as in the code; the teacher
  network itself stays frozen.
- A GloRe BatchNorm that sees one value per channel (one image at a 1x1 top level, e.g. RetinaNet P3-P7 at 128 px: the loader keeps
  the last partial batch) normalises with its running statistics for that step instead of failing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

from detkd.distill.base import DistillInputs, DistillMethod, conv_adapter, register, zero_if_empty


class GraphReasoning(nn.Module):
    """GloRe unit: pixels -> ``mid`` graph nodes (state 2*mid), one graph convolution, back to pixels; residual."""

    def __init__(self, channels: int, mid: int):
        super().__init__()
        self.to_state = nn.Conv2d(channels, 2 * mid, 1)
        self.to_node = nn.Conv2d(channels, mid, 1)
        self.node_mix = nn.Conv1d(mid, mid, 1)
        self.state_mix = nn.Conv1d(2 * mid, 2 * mid, 1, bias=False)
        self.back = nn.Conv2d(2 * mid, channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        n, _, h, w = x.shape
        state = self.to_state(x).flatten(2)  # [N, 2mid, HW]
        proj = self.to_node(x).flatten(2)  # [N, mid, HW]
        nodes = state @ proj.transpose(1, 2)  # [N, 2mid, mid]
        nodes = self.node_mix(nodes.transpose(1, 2)).transpose(1, 2) + nodes  # (I - A) V, A learned
        nodes = self.state_mix(F.relu(nodes))
        y = (nodes @ proj).view(n, -1, h, w)  # [N, 2mid, H, W]
        return x + self._norm(self.back(y))

    def _norm(self, y: Tensor) -> Tensor:
        """BatchNorm, except on a single value per channel (one image at RetinaNet's 1x1 P7, which the
        loader's last partial batch can hold): batch statistics do not exist there, so the running ones
        normalise it and are left unchanged."""
        if self.training and y.shape[0] * y.shape[2] * y.shape[3] == 1:
            bn = self.bn
            return F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        return self.bn(y)


class InstanceRelation(nn.Module):
    """Embedded-Gaussian relation over the n instances [n, C, r, r] of one image, with a learned filter."""

    def __init__(self, dim: int, filter_dim: int = 64):
        super().__init__()
        inner = dim // 2
        self.theta, self.phi, self.g = nn.Linear(dim, inner), nn.Linear(dim, inner), nn.Linear(dim, inner)
        self.out = nn.Linear(inner, dim)
        self.filter_q, self.filter_k = nn.Linear(dim, filter_dim), nn.Linear(dim, filter_dim)

    def relation_filter(self, x: Tensor) -> Tensor:
        """[n, n] row-stochastic re-weighting of instance pairs."""
        q, k = self.filter_q(x), self.filter_k(x)
        return torch.softmax(q @ k.T / math.sqrt(q.shape[1]), dim=-1)

    def forward(self, r: Tensor) -> Tensor:
        x = r.flatten(1)  # [n, D]
        logits = (self.theta(x) @ self.phi(x).T) * self.relation_filter(x)  # [n, n]
        y = torch.softmax(logits, dim=-1) @ self.g(x)
        return r + self.out(y).view_as(r)


def frobenius(a: Tensor, b: Tensor) -> Tensor:
    return torch.linalg.vector_norm((a - b).float())


@register
class DRKD(DistillMethod):
    name = "drkd"
    weight_keys = ("w_pixel", "w_relation", "w_instance")

    def __init__(self, family: str, student_channels: int, teacher_channels: int, w_pixel: float = 1e-3,
                 w_relation: float = 4e-3, w_instance: float = 2.4e-3, roi_size: int = 3, num_levels: int = 5):
        super().__init__(family, student_channels, teacher_channels)
        self.w_pixel, self.w_relation, self.w_instance, self.roi_size = w_pixel, w_relation, w_instance, roi_size
        c_s, c_t = student_channels, teacher_channels
        mids = [max(c_t // 4, 1)] * 2 + [c_t] * (num_levels - 2)
        self.student_glore = nn.ModuleList(GraphReasoning(c_s, m) for m in mids)
        self.teacher_glore = nn.ModuleList(GraphReasoning(c_t, m) for m in mids)
        self.pixel_adapters = nn.ModuleList(conv_adapter(c_s, c_t) for _ in mids)
        dim_s, dim_t = c_s * roi_size**2, c_t * roi_size**2
        self.student_relation = nn.ModuleList(InstanceRelation(dim_s) for _ in range(2))
        self.teacher_relation = nn.ModuleList(InstanceRelation(dim_t) for _ in range(2))
        self.relation_adapters = nn.ModuleList(conv_adapter(c_s, c_t) for _ in range(2))
        self.instance_adapters = nn.ModuleList(conv_adapter(c_s, c_t) for _ in range(2))

    def forward(self, inputs: DistillInputs):
        student = list(inputs.student.features.values())
        teacher = list(inputs.teacher_features.values())
        pixel = sum(frobenius(a(gs(s)), gt(t)) for a, gs, gt, s, t in
                    zip(self.pixel_adapters, self.student_glore, self.teacher_glore, student, teacher))
        size = inputs.images.tensors.shape[-1]
        relation = instance = zero_if_empty(student[0])
        for k in range(2):
            scale = student[k].shape[-1] / size
            for i, target in enumerate(inputs.targets):
                boxes = target["boxes"]
                if boxes.numel() == 0:
                    continue
                r_s = roi_align(student[k][i : i + 1], [boxes], self.roi_size, spatial_scale=scale)  # [n, C, 3, 3]
                r_t = roi_align(teacher[k][i : i + 1], [boxes], self.roi_size, spatial_scale=scale)
                z_s, z_t = self.student_relation[k](r_s), self.teacher_relation[k](r_t)
                relation = relation + frobenius(self.relation_adapters[k](z_s), z_t)
                instance = instance + frobenius(self.instance_adapters[k](r_s), r_t)
        return {"distill/pixel_relation": self.w_pixel * pixel, "distill/instance_relation": self.w_relation * relation,
                "distill/instance": self.w_instance * instance}
