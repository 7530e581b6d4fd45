"""Accuracy gate of an exported artefact: COCO AP on the val split and raw outputs against PyTorch.

Contract:
- ``evaluate_runner(runner, index, batch_size)`` runs a ``detkd.runtime.Runner`` over the split's images
  (read and letterboxed the way ``deploy/infer.py`` does) and returns ``evaluate_detections``' result.
- ``compare_outputs(detector, runner, images, tolerance)`` feeds the eager PyTorch detector and the
  runner the *same* letterboxed inputs and checks that every PyTorch detection (label >= 1) has a
  counterpart in the artefact's output: same label, every box coordinate within ``box_atol`` pixels and
  the score within ``score_atol``. A PyTorch detection without one is ``tied``, not unmatched, where
  rounding may legitimately have swapped it for another (``match_detections``: at the top-D or threshold
  cut-off, or among detections of equal score, as untrained models with flat scores give). Returns counts
  and the largest differences seen; ``passed`` when the share of unmatched detections is at most
  ``max_unmatched``.
- ``ap_gate(reference_ap, artefact_ap, max_drop)``: passed when ``|difference| <= max_drop``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm import tqdm

from detkd.data.coco import CocoIndex
from detkd.evaluation.coco_eval import detections_to_coco, evaluate_detections
from detkd.export.graph import letterboxed_input
from detkd.runtime.base import Runner
from detkd.runtime.preprocess import letterbox, read_image


@dataclass(frozen=True)
class Tolerance:
    box_atol: float = 0.05  # pixels of the model input
    score_atol: float = 1e-3
    max_unmatched: float = 0.01  # share of PyTorch detections without a counterpart


def evaluate_runner(runner: Runner, index: CocoIndex, batch_size: int = 8, description: str = "evaluate") -> dict:
    detections: list[dict] = []
    records = index.images
    step = min(batch_size, runner.max_batch or batch_size)
    for start in tqdm(range(0, len(records), step), desc=description, dynamic_ncols=True, mininterval=1.0):
        chunk = records[start:start + step]
        for rec, det in zip(chunk, runner.detect([read_image(r.path) for r in chunk], batch_size=step)):
            detections += detections_to_coco(rec.image_id, det["boxes"], det["scores"], det["labels"],
                                             index.category_ids)
    return evaluate_detections(index.annotation_file, detections, index.category_ids, index.category_names)


def ap_gate(reference_ap: float, artefact_ap: float, max_drop: float) -> dict:
    difference = artefact_ap - reference_ap
    return {"reference_ap": reference_ap, "ap": artefact_ap, "difference": difference, "max_difference": max_drop,
            "passed": bool(abs(difference) <= max_drop + 1e-12)}


def match_detections(reference: dict, candidate: dict, tolerance: Tolerance, cutoff: float | None = None) -> dict:
    """Counterparts of ``reference`` detections (numpy ``boxes``/``scores``/``labels``) in ``candidate``.

    A reference detection without a counterpart is ``tied`` instead of ``unmatched`` when rounding may
    legitimately have dropped it: its score is within ``score_atol`` of ``cutoff`` (the top-D or threshold
    selection), or another reference detection of its label has a score within ``score_atol`` of it (a tie,
    so which of them NMS keeps is arbitrary) and the candidate holds a spare detection of that label and
    score (the one kept instead). Distinct scores, as a trained detector gives, leave no room for excuses."""
    matched = 0
    box_diffs, score_diffs = [0.0], [0.0]
    used = np.zeros(len(candidate["labels"]), dtype=bool)
    missing = []
    for box, score, label in zip(reference["boxes"], reference["scores"], reference["labels"]):
        if label < 1:
            continue
        same = np.where((candidate["labels"] == label) & ~used)[0]
        if same.size:
            box_diff = np.abs(candidate["boxes"][same] - box).max(axis=1)
            best = same[int(np.argmin(box_diff + np.abs(candidate["scores"][same] - score)))]
            b, s = float(np.abs(candidate["boxes"][best] - box).max()), float(abs(candidate["scores"][best] - score))
            if b <= tolerance.box_atol and s <= tolerance.score_atol:
                used[best] = True
                matched += 1
                box_diffs.append(b)
                score_diffs.append(s)
                continue
        missing.append((score, label))
    tied = 0
    for score, label in missing:
        if cutoff is not None and score <= cutoff + tolerance.score_atol:
            tied += 1
            continue
        near = lambda scores: np.abs(scores - score) <= tolerance.score_atol  # noqa: E731
        tie = int(np.sum((reference["labels"] == label) & near(reference["scores"]))) > 1
        spare = np.where((candidate["labels"] == label) & ~used & near(candidate["scores"]))[0]
        if tie and spare.size:
            used[spare[0]] = True
            tied += 1
    return {"matched": matched, "unmatched": len(missing) - tied, "tied": tied, "max_box_diff": max(box_diffs),
            "max_score_diff": max(score_diffs)}


def score_threshold(detector: torch.nn.Module) -> float:
    """The score below which a torchvision detector drops detections (Faster R-CNN's RoI heads, RetinaNet)."""
    return float(getattr(getattr(detector, "roi_heads", detector), "score_thresh"))


@torch.no_grad()
def compare_outputs(detector: torch.nn.Module, runner: Runner, images: list[np.ndarray],
                    tolerance: Tolerance = Tolerance()) -> dict:
    batch = np.stack([letterbox(img, runner.info)[0] for img in images])
    step = runner.max_batch or len(batch)  # engines take at most their profile's batch
    parts = [runner.infer(batch[i:i + step]) for i in range(0, len(batch), step)]
    boxes, scores, labels, counts = (np.concatenate([p[k] for p in parts]) for k in range(4))
    with letterboxed_input(detector.eval().cpu(), batch.shape[-1]):
        reference = detector([torch.from_numpy(x) for x in batch])
    total = {"matched": 0, "unmatched": 0, "tied": 0, "max_box_diff": 0.0, "max_score_diff": 0.0}
    threshold, slots = score_threshold(detector), boxes.shape[1]
    for i, ref in enumerate(reference):
        n = int(counts[i])
        cutoff = float(scores[i, n - 1]) if n == slots else threshold  # a full list is cut at its lowest score
        result = match_detections({k: v.numpy() for k, v in ref.items()},
                                  {"boxes": boxes[i, :n], "scores": scores[i, :n], "labels": labels[i, :n]}, tolerance,
                                  cutoff)
        for key in ("matched", "unmatched", "tied"):
            total[key] += result[key]
        total["max_box_diff"] = max(total["max_box_diff"], result["max_box_diff"])
        total["max_score_diff"] = max(total["max_score_diff"], result["max_score_diff"])
    reference_count = total["matched"] + total["unmatched"] + total["tied"]
    share = total["unmatched"] / reference_count if reference_count else 0.0
    return {**total, "images": len(images), "unmatched_share": share, "tolerance": asdict(tolerance),
            "passed": bool(share <= tolerance.max_unmatched)}
