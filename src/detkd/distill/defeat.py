"""DeFeat: Distilling Object Detectors via Decoupled Features (Guo et al., CVPR 2021), after the official
code (ggjy/DeFeat.pytorch).

Neck term, per FPN level l with the GT object mask M (each box on one level, see ``masks``):
    L_obj^l = sum M (A_l(S) - T)^2 / max(1, 2 N_obj^l),   L_bg^l = sum (1-M)(A_l(S) - T)^2 / max(1, 2 N_bg^l)
with N counted over N x C x H x W elements, then
    L_neck = alpha_obj * mean_l L_obj^l + alpha_bg * mean_l L_bg^l.
A_l is a 3x3 conv initialised ~ N(0,1) truncated to |w| < 2, times 1e-4 (the code's near-zero start).

Head term (two-stage only): the teacher's RPN proposals (GT appended) are sampled by the teacher's RoI
sampler; both RoI heads classify those RoIs; KL(p_T || p_S) summed over classes is averaged separately
over positive (teacher-assigned) and negative RoIs:
    L_head = beta_obj / K_obj * sum_pos KL + beta_bg / K_bg * sum_neg KL   (temperature tau, times tau^2).

Adapters (student side, trained with the student, never exported): ``adapters``, one 3x3 conv per FPN level
(student width -> teacher width, near-zero initialised), always present. The head term compares logits over
the same K+1 classes, so differing RoI-head sizes need no adapter.

Choices and deviations (tested):
- ``level_base`` (56 in the code, tuned for 800-1333 px COCO inputs) is a hyper-parameter: boxes are
  assigned by size relative to it, so small inputs need a proportionally smaller base.
- Positive/negative labels come from the teacher's sampling (the code's student-label bug, issue #20,
  is not reproduced); one temperature serves both groups (as the code does); teacher proposals use the
  teacher's inference top-n rather than its training top-n.
- For RetinaNet only the neck term exists (the released one-stage path does not run); levels P3..P7 are
  levels 0..4 of the same rule.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detkd.distill.base import DistillInputs, DistillMethod, register, zero_if_empty
from detkd.distill.masks import level_object_masks


def decoupled_sq_error(student: Tensor, teacher: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(object, background) squared error sums each divided by max(1, 2 * element count)."""
    err = (student - teacher) ** 2  # [N, C, H, W]
    channels = student.shape[1]
    n_obj = mask.sum() * channels
    n_bg = (1 - mask).sum() * channels
    l_obj = (err * mask).sum() / torch.clamp(2 * n_obj, min=1.0)
    l_bg = (err * (1 - mask)).sum() / torch.clamp(2 * n_bg, min=1.0)
    return l_obj, l_bg


def group_kl(student_logits: Tensor, teacher_logits: Tensor, positive: Tensor, tau: float) -> tuple[Tensor, Tensor]:
    """Summed-over-classes KL(p_T || p_S) at temperature tau (times tau^2), averaged within each group."""
    log_s = F.log_softmax(student_logits / tau, dim=1)
    p_t = F.softmax(teacher_logits / tau, dim=1)
    kl = (p_t * (torch.log(p_t.clamp_min(1e-12)) - log_s)).sum(1) * tau**2  # [R]
    pos, neg = kl[positive], kl[~positive]
    zero = zero_if_empty(student_logits)
    return (pos.mean() if pos.numel() else zero), (neg.mean() if neg.numel() else zero)


def _near_zero_conv(student_channels: int, teacher_channels: int) -> nn.Conv2d:
    conv = nn.Conv2d(student_channels, teacher_channels, 3, padding=1)
    with torch.no_grad():
        nn.init.trunc_normal_(conv.weight, mean=0.0, std=1.0, a=-2.0, b=2.0)
        conv.weight.mul_(1e-4)
    return conv


@register
class DeFeat(DistillMethod):
    name = "defeat"
    weight_keys = ("alpha_obj", "alpha_bg", "beta_obj", "beta_bg")

    def __init__(self, family: str, student_channels: int, teacher_channels: int, alpha_obj: float = 4.0,
                 alpha_bg: float = 16.0, beta_obj: float = 2.0, beta_bg: float = 2.0, tau: float = 1.0,
                 level_base: float = 56.0, num_levels: int = 5):
        super().__init__(family, student_channels, teacher_channels)
        self.alpha_obj, self.alpha_bg, self.beta_obj, self.beta_bg, self.tau = alpha_obj, alpha_bg, beta_obj, beta_bg, tau
        self.level_base = level_base
        self.adapters = nn.ModuleList(_near_zero_conv(student_channels, teacher_channels) for _ in range(num_levels))

    def neck_loss(self, inputs: DistillInputs) -> tuple[Tensor, Tensor]:
        student = list(inputs.student.features.values())
        teacher = list(inputs.teacher_features.values())
        size = inputs.images.tensors.shape[-1]
        strides = [size / f.shape[-1] for f in teacher]
        masks = level_object_masks(inputs.targets, [tuple(f.shape[-2:]) for f in teacher], strides, self.level_base)
        obj, bg = zip(*(decoupled_sq_error(a(s), t, m) for a, s, t, m in zip(self.adapters, student, teacher, masks)))
        return torch.stack(obj).mean(), torch.stack(bg).mean()

    def head_loss(self, inputs: DistillInputs) -> tuple[Tensor, Tensor]:
        proposals = inputs.teacher_proposals()
        with torch.no_grad():
            rois, _, labels, _ = inputs.teacher_sampler(proposals, inputs.targets)
        _, teacher_logits, _ = inputs.teacher_rois(rois)
        _, student_logits, _ = inputs.student_rois(rois)
        positive = torch.cat(labels) > 0
        return group_kl(student_logits, teacher_logits, positive, self.tau)

    def forward(self, inputs: DistillInputs):
        obj, bg = self.neck_loss(inputs)
        losses = {"distill/neck_obj": self.alpha_obj * obj, "distill/neck_bg": self.alpha_bg * bg}
        if self.family == "fasterrcnn" and (self.beta_obj or self.beta_bg):
            pos, neg = self.head_loss(inputs)
            losses.update({"distill/head_obj": self.beta_obj * pos, "distill/head_bg": self.beta_bg * neg})
        return losses
