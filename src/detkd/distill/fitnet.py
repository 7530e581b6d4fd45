"""FitNet-style FPN imitation (Romero et al., ICLR 2015, applied to FPN maps as in DeFeat's "all-neck"
ablation): L = weight * sum_l MSE_mean(A_l(F_S^l), F_T^l) with a 1x1 student adapter per level.

Baseline for the detection-specific methods: no mask, no RoIs, every level and pixel weighted alike.

Adapters (student side, trained with the student, never exported): ``adapters``, one 1x1 conv per FPN level
(student FPN width -> teacher FPN width), always present.
"""

from __future__ import annotations

from torch import nn

from detkd.distill.base import DistillInputs, DistillMethod, conv_adapter, fpn_mse, register


@register
class FitNet(DistillMethod):
    name = "fitnet"
    weight_keys = ("weight",)

    def __init__(self, family: str, student_channels: int, teacher_channels: int, weight: float = 1.0,
                 num_levels: int = 5):
        super().__init__(family, student_channels, teacher_channels)
        self.weight = weight
        self.adapters = nn.ModuleList(conv_adapter(student_channels, teacher_channels) for _ in range(num_levels))

    def forward(self, inputs: DistillInputs):
        return {"distill/fpn": self.weight * fpn_mse(inputs.student.features, inputs.teacher_features, self.adapters)}
