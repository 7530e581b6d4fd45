"""``DistillationModel``: student + frozen teacher + method, with the detector-loss contract.

``forward(images, targets)`` returns the student's ``task/*`` detector losses plus the method's
``distill/*`` terms, so the ordinary training loop trains it unchanged (and DDP can wrap it).

Teacher policy (checked by tests): eval mode (BatchNorm statistics frozen), ``requires_grad=False``,
every forward under ``torch.no_grad()``. The teacher is deliberately *not* a registered sub-module:
``.train()`` cannot flip it to train mode, its weights are not in the optimiser and not in the
distilled student's checkpoint. Both networks see the one batch the student's transform produced.
"""

from __future__ import annotations

import functools
import time
from collections import OrderedDict
from typing import Callable, Optional

import torch
from torch import Tensor, nn
from torchvision.ops import MultiScaleRoIAlign

from detkd.distill.base import DistillInputs, DistillMethod
from detkd.errors import ConfigError
from detkd.models.view import DenseOutputs, classification_branch, classification_features, dense_outputs, roi_head_outputs, train_forward, transform_batch


def check_compatible(student: nn.Module, teacher: nn.Module, student_meta: dict, teacher_meta: dict) -> None:
    """Refuse pairs that cannot be distilled: other class sets, image normalisation or input size."""
    if list(student_meta["category_ids"]) != list(teacher_meta["category_ids"]):
        raise ConfigError(
            f"teacher classes {teacher_meta['category_ids']} differ from the student's {student_meta['category_ids']}"
        )
    for attr in ("image_mean", "image_std", "min_size", "max_size"):
        t, s = _as_list(getattr(teacher.transform, attr)), _as_list(getattr(student.transform, attr))
        if t != s:
            raise ConfigError(f"teacher and student differ in {attr} ({t} vs {s}); they must see the same preprocessed batch")
    if hasattr(student, "roi_heads") != hasattr(teacher, "roi_heads"):
        raise ConfigError("teacher and student must be of the same detector family")


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def freeze(teacher: nn.Module) -> nn.Module:
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


class _OutputRecorder:
    """Forward hook that keeps a module's outputs while ``active`` (one entry per call, in call order)."""

    def __init__(self, module: nn.Module):
        self.active, self.outputs = False, []
        module.register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        if self.active:
            self.outputs.append(output)


class DistillationModel(nn.Module):
    def __init__(self, student: nn.Module, teacher: nn.Module, method: DistillMethod):
        super().__init__()
        self.student = student
        self.method = method
        self._teacher = [freeze(teacher)]  # a list hides it from the module tree (see module docstring)
        for module in method.modules():  # the method's RoI pooling reads the levels and maps boxes to them as the student's does
            if isinstance(module, MultiScaleRoIAlign):
                module.canonical_scale = getattr(student, "roi_canonical_size", module.canonical_scale)
                module.featmap_names = list(getattr(student, "roi_levels", module.featmap_names))
        # the student's classification-branch maps, recorded during its own forward (no second pass)
        self._cls_recorder = _OutputRecorder(classification_branch(student)) if method.reads_student_cls_features else None
        # seconds spent in teacher network passes a method asked for (RoI head on its boxes, proposals,
        # classification towers) since construction: the teacher's cost beyond its own forward, which
        # ``detkd.step_time`` counts as teacher time, not as the method's
        self.teacher_seconds = 0.0

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    def _apply(self, fn, recurse=True):  # .to(device) / .cuda() move the hidden teacher too
        self._teacher[0] = self._teacher[0]._apply(fn)
        return super()._apply(fn, recurse)

    def _teacher_timed(self, fn: Callable) -> Callable:
        """``fn`` (a teacher pass) with its wall time added to ``teacher_seconds`` (CUDA: synchronised)."""
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            cuda = next(self.teacher.parameters()).is_cuda
            sync = torch.cuda.synchronize if cuda else (lambda: None)
            sync()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync()
                self.teacher_seconds += time.perf_counter() - start
        return timed

    @torch.no_grad()
    def teacher_forward(self, batch) -> tuple["OrderedDict[str, Tensor]", Optional[DenseOutputs]]:
        """The teacher's own forward on the shared batch: FPN features, plus its dense head outputs for
        methods that read them. Everything else a method asks of the teacher (RoI pooling, proposals,
        classification towers) is part of the distillation cost (``detkd.step_time`` times this split)."""
        features = self.teacher.backbone(batch.tensors)
        dense = dense_outputs(self.teacher, batch, features) if self.method.needs_teacher_dense else None
        return features, dense

    def forward(self, images: list[Tensor], targets: Optional[list[dict]] = None) -> dict[str, Tensor]:
        if not self.training:
            return self.student(images)
        batch, resized = transform_batch(self.student, images, targets)
        recorder = self._cls_recorder
        if recorder is not None:
            recorder.outputs, recorder.active = [], True
        try:
            student_out = train_forward(self.student, batch, resized)
        finally:
            if recorder is not None:
                recorder.active = False
        levels = len(student_out.features)
        if recorder is not None and len(recorder.outputs) != levels:
            raise RuntimeError(f"recorded {len(recorder.outputs)} classification-branch maps for {levels} levels")
        teacher = self.teacher
        family = self.method.family
        teacher_features, dense = self.teacher_forward(batch)

        @self._teacher_timed
        def teacher_rois(boxes: list[Tensor]):
            with torch.no_grad():
                return roi_head_outputs(teacher, teacher_features, boxes, batch.image_sizes)

        def student_rois(boxes: list[Tensor]):
            return roi_head_outputs(self.student, student_out.features, boxes, batch.image_sizes)

        @self._teacher_timed
        def teacher_proposals() -> list[Tensor]:
            with torch.no_grad():
                teacher.rpn.training = False  # inference top-n, no RPN losses
                proposals, _ = teacher.rpn(batch, teacher_features)
                return proposals

        @self._teacher_timed
        def teacher_cls_features() -> list[Tensor]:
            with torch.no_grad():
                return classification_features(teacher, teacher_features)

        inputs = DistillInputs(
            family=family, images=batch, targets=resized, student=student_out, teacher_features=teacher_features,
            teacher_rois=teacher_rois if family == "fasterrcnn" else None, teacher_dense=dense,
            teacher_proposals=teacher_proposals if family == "fasterrcnn" else None,
            student_rois=student_rois if family == "fasterrcnn" else None,
            student_cls_features=(lambda: list(recorder.outputs)) if recorder is not None
            else (lambda: classification_features(self.student, student_out.features)),
            teacher_cls_features=teacher_cls_features,
            teacher_sampler=teacher.roi_heads.select_training_samples if family == "fasterrcnn" else None,
        )
        distill = self.method(inputs)
        bad = [k for k in distill if not k.startswith("distill/")]
        if bad:
            raise ValueError(f"{type(self.method).__name__} returned terms without the 'distill/' prefix: {bad}")
        return {**{f"task/{k}": v for k, v in student_out.losses.items()}, **distill}
