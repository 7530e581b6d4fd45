"""Evaluate several model checkpoints on the val split and write the reports of the ``evaluate`` stage.

``reports/eval.json`` (the detailed report; the headline APs reach DVC metrics through ``summary.json``): ``{model_name: {AP, AP50, ..., per_class: {class: AP}}}``;
``reports/pr/<model>.json`` (DVC plots): precision at IoU 0.5 per recall threshold;
``reports/pr_curves.png``: the curves as a picture;
``reports/eval.md``: the table for people.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from detkd.data.coco import CocoIndex
from detkd.engine.checkpoint import check_same_classes
from detkd.errors import ConfigError
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


def read_model_aps(eval_json: str | Path, names) -> dict[str, float]:
    """The PyTorch AP of each model in ``names`` from an ``eval.json`` written by ``write_reports``; a missing
    file, a model without an entry or an entry without a numeric ``AP`` is a one-line ``ConfigError``."""
    path = Path(eval_json)
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file; run the evaluate stage first (`dvc repro evaluate`)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not a readable JSON report ({exc})") from None
    missing = [n for n in names if n not in report] if isinstance(report, dict) else list(names)
    if missing:
        have = sorted(report) if isinstance(report, dict) else "no models"
        raise ConfigError(f"{path}: no PyTorch AP for {missing} (has {have}); run `dvc repro evaluate`")
    aps = {}
    for name in names:
        ap = report[name].get("AP") if isinstance(report[name], dict) else None
        if not isinstance(ap, (int, float)) or isinstance(ap, bool):
            raise ConfigError(f"{path}: {name}.AP must be a number (the evaluate stage writes it), got {ap!r}")
        aps[name] = float(ap)
    return aps
