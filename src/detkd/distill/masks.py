"""Ground-truth masks on feature maps, shared by the mask-based methods (DeFeat, MAR).

Conventions (DeFeat's code): a box covers cells [floor(y1/s), floor(y2/s)) x [floor(x1/s), floor(x2/s))
of a level with stride s; a box too small to cover a cell marks the single cell holding its top-left
corner. Boxes are in the input frame (the transformed batch).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def assign_levels(boxes: Tensor, base: float, num_levels: int) -> Tensor:
    """DeFeat's rule: level = floor(log2(sqrt((w+1)(h+1)) / base)), clamped to [0, num_levels-1]."""
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    level = torch.floor(torch.log2(torch.sqrt((w + 1) * (h + 1)) / base))
    return level.clamp(0, num_levels - 1).long()


def rasterise(boxes: Tensor, stride: float, height: int, width: int, values: Tensor | None = None) -> Tensor:
    """[H, W] map with ``values`` (default 1) inside each box (max where boxes overlap)."""
    mask = torch.zeros(height, width, device=boxes.device)
    for k, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
        c1, r1 = min(int(math.floor(x1 / stride)), width - 1), min(int(math.floor(y1 / stride)), height - 1)
        c2, r2 = min(int(math.floor(x2 / stride)), width), min(int(math.floor(y2 / stride)), height)
        c2, r2 = max(c2, c1 + 1), max(r2, r1 + 1)  # a degenerate box keeps its single corner cell
        value = 1.0 if values is None else float(values[k])
        mask[r1:r2, c1:c2] = torch.clamp(mask[r1:r2, c1:c2], min=value)
    return mask


def level_object_masks(targets: list[dict], shapes: list[tuple[int, int]], strides: list[float], base: float) -> list[Tensor]:
    """Per level, an [N, 1, H_l, W_l] object mask where each GT box marks only its assigned level."""
    masks = []
    for level, ((height, width), stride) in enumerate(zip(shapes, strides)):
        per_image = []
        for t in targets:
            boxes = t["boxes"]
            chosen = boxes[assign_levels(boxes, base, len(shapes)) == level]
            per_image.append(rasterise(chosen, stride, height, width))
        masks.append(torch.stack(per_image)[:, None])
    return masks
