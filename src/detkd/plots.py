"""PNG plots for people (DVC plots read the CSV/JSON beside them)."""

from __future__ import annotations

import csv
from pathlib import Path

from detkd.io import atomic_path, atomic_write_text


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_history_csv(path: str | Path, history: list[dict]) -> None:
    """One row per logged step; columns: step, epoch, lr, loss (, task_loss, distill_loss when distilling)
    and every loss term."""
    keys = ["step", "epoch", "lr", "loss", *(k for k in ("task_loss", "distill_loss") if history and k in history[0])]
    for row in history:
        keys += [k for k in row if k not in keys]
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    for row in history:
        writer.writerow({k: row.get(k, "") for k in keys})
    atomic_write_text(path, buf.getvalue())


def plot_history(path: str | Path, history: list[dict], title: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in history]
    terms = [k for k in (history[0] if history else {}) if k not in ("step", "epoch", "lr", "task_loss", "distill_loss")]
    for k in terms:
        ax.plot(steps, [r.get(k, float("nan")) for r in history], label=k, linewidth=2 if k == "loss" else 1)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def plot_pr_curves(path: str | Path, curves: dict[str, list[dict]], title: str = "PR @ IoU 0.5") -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    for name, points in curves.items():
        ax.plot([p["recall"] for p in points], [p["precision"] for p in points], label=name)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
