"""``none``: no distillation. The distill stage with this method reproduces the baseline student's
training (same schedule, same seed) while still paying for the teacher forward, which makes it the
reference for the cost of the distillation terms themselves."""

from __future__ import annotations

from detkd.distill.base import DistillInputs, DistillMethod, register


@register
class NoDistillation(DistillMethod):
    name = "none"

    def forward(self, inputs: DistillInputs):
        return {}
