"""Batched NMS that exports to ONNX ``NonMaxSuppression`` and a fixed-size, padded selection.

Contract:
- ``onnx_nms(boxes [B, N, 4], scores [B, N], max_output, iou_threshold, score_threshold)`` returns
  ONNX's ``selected_indices`` ``[M, 3]`` int64 rows ``(batch, 0, box)``: per image, greedy NMS over the
  boxes whose score is above ``score_threshold``, at most ``max_output`` of them, best first. In PyTorch
  it runs torchvision's ``nms``; exported with the TorchScript exporter it becomes one ONNX
  ``NonMaxSuppression`` node (in TensorRT's parser matrix, no plugin needed).
- ``pad_selection(selected, batch_size, slots)`` turns those rows into ``[B, slots]`` box indices,
  ``-1`` where an image has fewer than ``slots``; the slot of a row is its rank among its image's rows,
  so the padding does not depend on the order the runtime emits the rows in. Only operators and types
  that TensorRT's parser accepts are used (float ``CumSum``, ``ScatterND`` without reduction).

Class-aware NMS uses torchvision's coordinate trick (``offset_by_class``): boxes of different classes
are moved apart so that they never overlap, then one NMS runs over all of them.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import nms


class _NonMaxSuppression(torch.autograd.Function):
    @staticmethod
    def forward(ctx, boxes: Tensor, scores: Tensor, max_output: int, iou_threshold: float,
                score_threshold: float) -> Tensor:
        rows = []
        for b in range(boxes.shape[0]):
            candidates = torch.where(scores[b] > score_threshold)[0]
            keep = candidates[nms(boxes[b, candidates], scores[b, candidates], iou_threshold)][:max_output]
            rows.append(torch.stack([torch.full_like(keep, b), torch.zeros_like(keep), keep], dim=1))
        return torch.cat(rows) if rows else boxes.new_zeros((0, 3), dtype=torch.int64)

    @staticmethod
    def symbolic(g, boxes, scores, max_output, iou_threshold, score_threshold):
        from torch.onnx import symbolic_helper

        scores = symbolic_helper._unsqueeze_helper(g, scores, [1])  # [B, 1 class, N]
        return g.op(
            "NonMaxSuppression", boxes, scores,
            g.op("Constant", value_t=torch.tensor([max_output], dtype=torch.int64)),
            g.op("Constant", value_t=torch.tensor([iou_threshold], dtype=torch.float32)),
            g.op("Constant", value_t=torch.tensor([score_threshold], dtype=torch.float32)),
            center_point_box_i=0,
        )


def onnx_nms(boxes: Tensor, scores: Tensor, max_output: int, iou_threshold: float, score_threshold: float) -> Tensor:
    """ONNX ``NonMaxSuppression`` semantics with one class; see the module docstring."""
    return _NonMaxSuppression.apply(boxes, scores, int(max_output), float(iou_threshold), float(score_threshold))


def offset_by_class(boxes: Tensor, labels: Tensor, extent: float) -> Tensor:
    """Shift each box by ``label * (extent + 1)`` so boxes of different labels never overlap.

    ``extent`` bounds every coordinate (boxes are clipped to the input), as in torchvision's
    ``batched_nms`` coordinate trick, but a constant so that the graph needs no ``ReduceMax``.
    """
    return boxes + (labels.to(boxes.dtype) * (extent + 1.0)).unsqueeze(-1)


def nms_slots(boxes: Tensor, scores: Tensor, labels: Tensor, extent: float, slots: int, iou_threshold: float,
              score_threshold: float) -> Tensor:
    """Class-aware NMS per image (``labels`` kept apart by ``offset_by_class``), best ``slots`` kept:
    ``[B, slots]`` box indices, ``-1`` padded."""
    selected = onnx_nms(offset_by_class(boxes, labels, extent), scores, slots, iou_threshold, score_threshold)
    return pad_selection(selected, scores, slots)


def pad_selection(selected: Tensor, like: Tensor, slots: int) -> Tensor:
    """``[M, 3]`` NMS rows -> ``[B, slots]`` box indices, ``-1`` padded (``like``: any ``[B, ...]`` tensor)."""
    image = selected[:, 0]
    batch_ids = torch.arange(like.shape[0], device=like.device)
    member = (image.unsqueeze(1) == batch_ids.unsqueeze(0)).to(torch.float32)  # [M, B]
    rank = ((torch.cumsum(member, dim=0) * member).sum(dim=1) - 1.0).to(torch.int64)
    padded = torch.zeros_like(like[:, :1], dtype=torch.int64).expand(-1, slots) - 1
    padded = padded.clone()
    padded[image, rank] = selected[:, 2]
    return padded


def gather_rows(values: Tensor, index: Tensor) -> Tensor:
    """``values [B, N, ...]`` at ``index [B, K]`` (entries ``-1`` read row 0; mask them afterwards)."""
    safe = torch.where(index >= 0, index, torch.zeros_like(index))  # not clamp: TensorRT's Clip is float-only
    if values.dim() == 2:
        return torch.gather(values, 1, safe)
    expanded = safe.reshape(*safe.shape, *([1] * (values.dim() - 2))).expand(-1, -1, *values.shape[2:])
    return torch.gather(values, 1, expanded)
