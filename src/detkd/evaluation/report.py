"""Evaluate several model checkpoints on the val split and write the reports of the ``evaluate`` stage.

``reports/eval.json`` (DVC metrics): ``{model_name: {AP, AP50, ..., per_class: {class: AP}}}``;
``reports/pr/<model>.json`` (DVC plots): precision at IoU 0.5 per recall threshold;
``reports/pr_curves.png``: the curves as a picture;
``reports/eval.md``: the table for people.
"""

from __future__ import annotations

from pathlib import Path

import torch

from detkd.data.coco import CocoIndex
from detkd.engine.checkpoint import check_same_classes
from detkd.evaluation.coco_eval import evaluate_detections, predict
from detkd.io import atomic_write_json, atomic_write_text
from detkd.plots import plot_pr_curves
from detkd.training import load_detector


def evaluate_checkpoint(path: str | Path, index: CocoIndex, batch_size: int, device: torch.device) -> dict:
    model, meta = load_detector(path, device)
    check_same_classes(path, meta, index.category_ids, "the val split")
    detections = predict(model, index, batch_size, device, description=f"evaluate {Path(path).stem}")
    result = evaluate_detections(index.annotation_file, detections, index.category_ids, index.category_names)
    result["meta"] = meta
    return result


def markdown_table(results: dict[str, dict]) -> str:
    cols = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    lines = ["| model | backbone | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for name, r in results.items():
        backbone = r["meta"]["spec"]["backbone"]
        cells = [f"{r['metrics'][c]:.3f}" if r["metrics"][c] >= 0 else "n/a" for c in cols]
        lines.append(f"| {name} | {backbone} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_reports(results: dict[str, dict], out_json: str | Path, pr_dir: str | Path) -> dict:
    metrics = {
        name: {**{k: round(v, 4) for k, v in r["metrics"].items()},
               "per_class": {k: round(v, 4) for k, v in r["per_class"].items()}}
        for name, r in results.items()
    }
    atomic_write_json(out_json, metrics)
    pr_dir = Path(pr_dir)
    for name, r in results.items():
        atomic_write_json(pr_dir / f"{name}.json", r["pr_curve"])
    plot_pr_curves(Path(out_json).parent / "pr_curves.png", {name: r["pr_curve"] for name, r in results.items()})
    atomic_write_text(Path(out_json).with_suffix(".md"), markdown_table(results))
    return metrics
