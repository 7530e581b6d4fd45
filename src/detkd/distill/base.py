"""Distillation method interface and registry.

A method is an ``nn.Module`` that owns its adapters (student side, trained with the student, dropped
at inference) and maps one ``DistillInputs`` to already-weighted loss terms named ``distill/<term>``.
It declares the detector families it serves and the inputs it needs; both are checked before training
starts (``check_method``). Hyper-parameters are plain constructor keyword arguments from
``params.yaml: distill.<method>``.
"""

from __future__ import annotations

import abc
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import box_iou

from detkd.errors import ConfigError
from detkd.models.builder import ROI_LEVELS
from detkd.models.view import DenseOutputs, DetectorTensors


@dataclass(frozen=True)
class DistillInputs:
    """Everything a method may read for one batch. Teacher tensors are computed without gradients.

    ``teacher_rois`` lets a method run the frozen teacher's RoI head on boxes of its choosing
    (``(boxes per image) -> (pooled, logits, deltas)``, two-stage only); ``teacher_dense`` gives the
    teacher's dense head outputs (RetinaNet ``cls_logits``/``bbox_regression``) and is ``None`` for
    Faster R-CNN.
    """

    family: str  # "fasterrcnn" | "retinanet"
    images: ImageList  # the student's transformed batch, shared with the teacher
    targets: list[dict]  # ground truth in the input frame: boxes [n, 4] xyxy, labels [n]
    student: DetectorTensors
    teacher_features: "OrderedDict[str, Tensor]"  # level -> [N, C_t, H, W]
    teacher_rois: Optional[Callable[[list[Tensor]], tuple[Tensor, Tensor, Tensor]]] = None
    teacher_dense: Optional[DenseOutputs] = None
    teacher_proposals: Optional[Callable[[], list[Tensor]]] = None  # teacher RPN proposals per image
    teacher_sampler: Optional[Callable] = None  # (proposals, targets) -> teacher RoI sampling (rois, matched, labels, reg)
    student_cls_features: Optional[Callable[[], list[Tensor]]] = None  # classification-branch maps, with gradients
    teacher_cls_features: Optional[Callable[[], list[Tensor]]] = None
    student_rois: Optional[Callable[[list[Tensor]], tuple[Tensor, Tensor, Tensor]]] = None  # with gradients


class DistillMethod(nn.Module, abc.ABC):
    """Base class. Subclasses set ``name`` and ``families`` and implement ``forward``; those that read
    ``teacher_dense`` set ``needs_teacher_dense`` so the teacher's dense head only runs for them, and
    those that read ``student_cls_features`` set ``reads_student_cls_features``."""

    name: ClassVar[str] = ""
    families: ClassVar[tuple[str, ...]] = ("fasterrcnn", "retinanet")
    # the loss weights (constructor arguments): what ``make compare`` sweeps together, never negative
    weight_keys: ClassVar[tuple[str, ...]] = ()
    # published values that differ by family, over the constructor's defaults (which are the two-stage ones)
    family_defaults: ClassVar[dict[str, dict]] = {}
    # weights a family's terms never read (e.g. DSIG's fg/bg node split exists only for RoIs)
    unused_weights: ClassVar[dict[str, tuple[str, ...]]] = {}

    @classmethod
    def family_weight_keys(cls, family: str) -> tuple[str, ...]:
        """The loss weights that act on ``family`` (what make compare sweeps and writes)."""
        return tuple(k for k in cls.weight_keys if k not in cls.unused_weights.get(family, ()))
    needs_teacher_dense: ClassVar[bool] = False
    # set by methods that read ``student_cls_features``: the wrapper then records them during the
    # student's own forward instead of recomputing the classification branch
    reads_student_cls_features: ClassVar[bool] = False

    def __init__(self, family: str, student_channels: int, teacher_channels: int):
        super().__init__()
        self.family = family
        self.student_channels, self.teacher_channels = student_channels, teacher_channels

    @abc.abstractmethod
    def forward(self, inputs: DistillInputs) -> dict[str, Tensor]:
        """Already-weighted loss terms named ``distill/<term>``."""


METHODS: dict[str, type[DistillMethod]] = {}


def register(cls: type[DistillMethod]) -> type[DistillMethod]:
    METHODS[cls.name] = cls
    return cls


def method_class(name: str, family: str) -> type[DistillMethod]:
    """``METHODS[name]`` if it serves ``family``; else a ``ConfigError`` naming what is allowed."""
    if name not in METHODS:
        raise ConfigError(f"distill.method: unknown method '{name}'; known methods: {', '.join(sorted(METHODS))}")
    cls = METHODS[name]
    if family not in cls.families:
        raise ConfigError(f"distill.method: '{name}' does not serve {family} detectors (it serves: {', '.join(cls.families)})")
    return cls


def published(name: str, family: str) -> dict:
    """Every hyper-parameter of method ``name`` at its published value for ``family``."""
    import inspect

    cls = METHODS[name]
    params = inspect.signature(cls.__init__).parameters
    values = {k: p.default for k, p in params.items() if k not in _NOT_HPARAMS}
    return {**values, **cls.family_defaults.get(family, {})}


def resolve_hparams(name: str, family: str, hparams: dict) -> dict:
    """The hyper-parameters a method runs with: ``hparams`` (checked) over the published values."""
    cls = method_class(name, family)
    _check_hparams(cls, f"distill.{family}.{name}", hparams)
    return {**published(name, family), **hparams}


def build_method(name: str, family: str, student_channels: int, teacher_channels: int, hparams: dict) -> DistillMethod:
    """Instantiate ``METHODS[name]`` with ``hparams`` over the family's published values; errors name the
    method, the family or the bad hyper-parameter."""
    resolved = resolve_hparams(name, family, hparams)
    return METHODS[name](family, student_channels, teacher_channels, **resolved)


_NOT_HPARAMS = ("self", "family", "student_channels", "teacher_channels")


def _check_hparams(cls: type, where: str, hparams: dict) -> None:
    """Unknown names, wrong types and negative loss weights are ``ConfigError``s naming ``where.<key>``."""
    import inspect

    params = inspect.signature(cls.__init__).parameters
    allowed = [p for p in params if p not in _NOT_HPARAMS]
    for key, value in hparams.items():
        if key not in allowed:
            raise ConfigError(f"{where}: unknown hyper-parameter '{key}'; allowed: {', '.join(allowed)}")
        default = params[key].default
        ok = isinstance(value, type(default)) or (isinstance(default, float) and isinstance(value, int))
        if isinstance(value, bool) != isinstance(default, bool) or not ok:
            raise ConfigError(f"{where}.{key}: expected {type(default).__name__}, got {value!r}")
        if key in cls.weight_keys and value < 0:
            raise ConfigError(f"{where}.{key}: a loss weight must be >= 0 (0 switches the term off), got {value!r}")


# ---- small shared helpers (used by several methods) -------------------------------------------------

def conv_adapter(student_channels: int, teacher_channels: int, kernel: int = 1) -> nn.Conv2d:
    """Student-side adapter mapping student feature channels to the teacher's."""
    return nn.Conv2d(student_channels, teacher_channels, kernel, padding=kernel // 2)


def zero_if_empty(reference: Tensor) -> Tensor:
    """A differentiable zero on ``reference``'s device (for batches where a term has nothing to match)."""
    return reference.sum() * 0.0


def optional_adapter(student_channels: int, teacher_channels: int) -> nn.Module:
    """Identity when the widths already match, else a 1x1 student adapter (methods without adapters of
    their own in the paper, where all FPNs were 256 wide)."""
    return nn.Identity() if student_channels == teacher_channels else conv_adapter(student_channels, teacher_channels)


class PointwiseAdapter(nn.Conv2d):
    """A 1x1 ``nn.Conv2d`` (same parameters and state dict) computed as one matrix product over all
    pixels in channels-last order. On many small maps (pooled RoIs, [R, C, 7, 7]) this is about twice as
    fast on CPU as the convolution kernels, and RoI features pooled channels-last need no copy."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x.permute(0, 2, 3, 1), self.weight.flatten(1), self.bias).permute(0, 3, 1, 2)


def optional_roi_adapter(student_channels: int, teacher_channels: int) -> nn.Module:
    """``optional_adapter`` for pooled RoI features: identity, or a ``PointwiseAdapter``."""
    if student_channels == teacher_channels:
        return nn.Identity()
    return PointwiseAdapter(student_channels, teacher_channels)


def fpn_mse(student: "OrderedDict[str, Tensor]", teacher: "OrderedDict[str, Tensor]", adapters: nn.ModuleList) -> Tensor:
    """sum over levels of MSE_mean(A_l(F_S^l), F_T^l): plain whole-map imitation."""
    return sum(F.mse_loss(a(s), t) for a, s, t in zip(adapters, student.values(), teacher.values()))


# RoI pooling levels of the default pyramid (torchvision's multi-scale pooler picks one per box);
# DistillationModel replaces them with the student's own ``roi_levels``.
POOL_LEVELS = ROI_LEVELS["p2-p6"]


@torch.no_grad()
def first_k_nms(boxes: Tensor, scores: Tensor, iou_threshold: float, k: int, block: int = 32) -> Tensor:
    """``torchvision.ops.nms(boxes, scores, iou_threshold)[:k]`` without suppressing the whole list: greedy
    NMS keeps boxes in descending score order, so the first ``k`` kept depend only on the boxes before
    them and the scan can stop there. Candidates are taken a block at a time (one small IoU matrix
    each), the block doubling from ``block`` while too few boxes survive."""
    order = torch.sort(scores, descending=True, stable=True).indices
    kept: list[int] = []
    start = 0
    while start < order.numel() and len(kept) < k:
        idx = order[start:start + block]
        start, block = start + block, min(block * 2, 1024)
        cand = boxes[idx]
        alive = torch.ones(idx.numel(), dtype=torch.bool, device=boxes.device)
        if kept:
            alive &= ~(box_iou(cand, boxes[torch.tensor(kept, device=boxes.device)]) > iou_threshold).any(1)
        overlaps = (box_iou(cand, cand) > iou_threshold).tolist()
        local: list[int] = []
        for i, ok in enumerate(alive.tolist()):
            if ok and not any(overlaps[i][j] for j in local):
                local.append(i)
                if len(kept) + len(local) == k:
                    break
        kept += idx[local].tolist()
    return torch.tensor(kept, dtype=torch.int64, device=boxes.device)


@torch.no_grad()
def first_k_batched_nms(boxes: Tensor, scores: Tensor, classes: Tensor, iou_threshold: float, k: int) -> Tensor:
    """``torchvision.ops.batched_nms(boxes, scores, classes, iou_threshold)[:k]`` through ``first_k_nms``:
    boxes of different classes are moved apart (torchvision's own coordinate trick) so they never overlap."""
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    offsets = classes.to(boxes) * (boxes.max() + 1)
    return first_k_nms(boxes + offsets[:, None], scores, iou_threshold, k)
