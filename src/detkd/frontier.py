"""The speed/accuracy frontier: every measured artefact as a point (p50 latency at batch 1, AP), the arrow
that distillation draws from each baseline student to its distilled student, and student sizes.

Contract:
- ``artefact_points(benchmark_report, batch)`` -> one point per (model, backend) row that the benchmark
  measured at ``batch``: ``{"model", "backend", "precision", "p50_ms", "AP", "artefact"}``. Whatever
  backends or precisions the benchmark grows (INT8, FP16, OpenVINO...) appear with no change here.
- ``size_points(sizes_report)`` -> the student sizes that ``make frontier`` trained as DVC experiments
  (``reports/frontier_sizes.json``): one record per size with its baseline and distilled AP and p50.
- ``build_frontier(benchmark_report, sizes_report)`` -> the JSON report; ``markdown`` and ``plot`` render it.

The size curves use each experiment's fastest FP32 CPU backend (the same rule as the headline speed-up),
so sizes measured on another machine or backend are not mixed: records carry their machine, and a size
measured on a different CPU than this run's is drawn but flagged in the table.
"""

from __future__ import annotations

import math
from pathlib import Path

from detkd.bench.backends import split_row_key
from detkd.bench.report import MODEL_COLOURS as COLOURS, machine_line
from detkd.bench.run import MIN_SPEEDUP as TARGET_SPEEDUP
from detkd.summary import MIN_AP_RATIO as TARGET_AP_RATIO
from detkd.io import atomic_path, atomic_write_json, atomic_write_text

ROLES = ("teacher", "student", "distilled")
LABELS = {"teacher": "teacher", "student": "baseline student", "distilled": "distilled student"}
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
RUNTIME_MARKERS = {"torch": "X", "onnxruntime": "o", "openvino": "D", "tensorrt": "*"}
PRECISION_FILL = {"fp32": "full", "fp16": "left", "int8": "none"}


def _runtime(backend: str) -> str:
    """``onnxruntime`` of ``onnxruntime-cpu/int8``; the device and precision are drawn otherwise."""
    return backend.split("/")[0].split("-")[0]


def artefact_points(benchmark_report: dict, batch: str = "batch1") -> list[dict]:
    points = []
    for model, backends in benchmark_report["results"].items():
        for backend, rows in backends.items():
            row = rows.get(batch)
            if row is None:
                continue
            points.append({"model": model, "backend": split_row_key(backend)[0], "precision": row.get("precision", "fp32"),
                           "p50_ms": float(row["p50_ms"]), "AP": float(row["AP"]), "artefact": row.get("artefact", "")})
    return points


def distillation_arrows(points: list[dict]) -> list[dict]:
    """Baseline -> distilled student on the same backend and precision (same architecture, same artefact kind)."""
    by_key = {(p["model"], p["backend"], p["precision"]): p for p in points}
    arrows = []
    for (model, backend, precision), base in by_key.items():
        if model != "student":
            continue
        dist = by_key.get(("distilled", backend, precision))
        if dist is not None:
            arrows.append({"backend": backend, "precision": precision, "from": [base["p50_ms"], base["AP"]],
                           "to": [dist["p50_ms"], dist["AP"]], "ap_gain": dist["AP"] - base["AP"]})
    return arrows


# What a size needs to be drawn: its numbers from that experiment's ``reports/summary.json``.
SIZE_KEYS = ("baseline_ap", "distilled_ap", "baseline_p50_ms", "distilled_p50_ms")


def size_points(sizes_report: dict) -> list[dict]:
    """Validated size records of ``reports/frontier_sizes.json`` (``{"sizes": [...]}``)."""
    sizes = sizes_report.get("sizes", [])
    for record in sizes:
        missing = [k for k in ("name", *SIZE_KEYS) if k not in record]
        if missing:
            raise ValueError(f"frontier sizes: record {record.get('name', '?')!r} lacks {missing}")
    return list(sizes)


def build_frontier(benchmark_report: dict, summary: dict, sizes_report: dict | None = None,
                   student_label: str = "default", batch: str = "batch1") -> dict:
    """``summary`` is ``reports/summary.json`` of this run (it places the default size on the size curves)."""
    points = artefact_points(benchmark_report, batch)
    sizes = size_points(sizes_report or {})
    this_cpu = benchmark_report["environment"]["cpu"]
    default = {"name": student_label, "baseline_ap": summary["baseline_ap"], "distilled_ap": summary["distilled_ap"],
               "baseline_p50_ms": summary["baseline_p50_ms"], "distilled_p50_ms": summary["distilled_p50_ms"],
               "cpu": this_cpu, "this_run": True}
    curve = sorted([default, *[s for s in sizes if s["name"] != student_label]], key=lambda s: s["distilled_p50_ms"])
    return {"machine": machine_line(benchmark_report["environment"]), "cpu": this_cpu, "batch": batch,
            "points": points, "arrows": distillation_arrows(points), "sizes": curve,
            "teacher": {"AP": summary["teacher_ap"], "p50_ms": summary["teacher_p50_ms"]}}


def markdown(report: dict) -> str:
    lines = ["# Speed/accuracy frontier", "", f"Machine: {report['machine']}", "",
             f"p50 latency at batch {report['batch'].removeprefix('batch')}; AP of that exact artefact on the val split.",
             "", "| model | backend | precision | p50 ms | AP |", "|---|---|---|---|---|"]
    for p in sorted(report["points"], key=lambda p: (ROLES.index(p["model"]) if p["model"] in ROLES else 9, p["p50_ms"])):
        lines.append(f"| {LABELS.get(p['model'], p['model'])} | {p['backend']} | {p['precision']} | {p['p50_ms']:.1f} | "
                     f"{p['AP']:.3f} |")
    if report["arrows"]:
        lines += ["", "Distillation at equal cost (baseline -> distilled student, same architecture and artefact):"]
        lines += [f"- {a['backend']} {a['precision']}: AP {a['from'][1]:.3f} -> {a['to'][1]:.3f} ({a['ap_gain']:+.3f})"
                  for a in report["arrows"]]
    lines += ["", "Student sizes (fastest FP32 CPU backend each; `make frontier` adds sizes):", "",
              "| student | p50 ms baseline / distilled | AP baseline | AP distilled | gain | AP / teacher AP |",
              "|---|---|---|---|---|---|"]
    teacher_ap = report["teacher"]["AP"]
    for s in report["sizes"]:
        flag = "" if s.get("cpu", report["cpu"]) == report["cpu"] else f" (measured on {s['cpu']})"
        lines.append(f"| {s['name']}{' (this run)' if s.get('this_run') else ''}{flag} | {s['baseline_p50_ms']:.1f} / "
                     f"{s['distilled_p50_ms']:.1f} | {s['baseline_ap']:.3f} | {s['distilled_ap']:.3f} | "
                     f"{s['distilled_ap'] - s['baseline_ap']:+.3f} | {_ratio(s['distilled_ap'], teacher_ap)} |")
    lines.append(f"\nTeacher: AP {teacher_ap:.3f} at {report['teacher']['p50_ms']:.1f} ms.")
    return "\n".join(lines) + "\n"


def _ratio(ap: float, teacher_ap: float) -> str:
    """``ap / teacher_ap`` to 2 decimals; n/a for a teacher at AP 0 (e.g. a few smoke-test iterations)."""
    return f"{ap / teacher_ap:.2f}" if teacher_ap > 0 else "n/a"


def plot(report: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.lines import Line2D

    fig, ax = plt.subplots(figsize=(10.0, 5.4))
    runtimes = sorted({_runtime(p["backend"]) for p in report["points"]})
    marker = {r: RUNTIME_MARKERS.get(r, MARKERS[i % len(MARKERS)]) for i, r in enumerate(runtimes)}
    sizes = report["sizes"]
    if len(sizes) > 1:  # the curves that distillation moves: one line per kind of student, across sizes
        ax.plot([s["baseline_p50_ms"] for s in sizes], [s["baseline_ap"] for s in sizes], "--", color=COLOURS["student"],
                lw=1.2, zorder=1, label="baseline students (sizes)")
        ax.plot([s["distilled_p50_ms"] for s in sizes], [s["distilled_ap"] for s in sizes], "-", color=COLOURS["distilled"],
                lw=1.5, zorder=1, label="distilled students (sizes)")
    for s in sizes:
        _arrow(ax, (s["baseline_p50_ms"], s["baseline_ap"]), (s["distilled_p50_ms"], s["distilled_ap"]), alpha=0.5)
        if not s.get("this_run"):
            ax.plot(s["baseline_p50_ms"], s["baseline_ap"], "o", mfc="white", mec=COLOURS["student"], zorder=2)
            ax.plot(s["distilled_p50_ms"], s["distilled_ap"], "o", mfc="white", mec=COLOURS["distilled"], zorder=2)
        ax.annotate(s["name"], (s["distilled_p50_ms"], s["distilled_ap"]), textcoords="offset points", xytext=(-6, 6),
                    ha="right", fontsize=7, color="#555555")
    for a in report["arrows"]:
        _arrow(ax, a["from"], a["to"])
    for p in report["points"]:  # colour = model, marker = runtime, fill = precision (INT8: hollow, coloured edge)
        colour = COLOURS.get(p["model"], "k")
        hollow = PRECISION_FILL.get(p["precision"], "full") == "none"
        ax.plot(p["p50_ms"], p["AP"], linestyle="none", marker=marker[_runtime(p["backend"])], markersize=8,
                color=colour, fillstyle=PRECISION_FILL.get(p["precision"], "full"), markerfacecoloralt="white",
                markeredgecolor=colour if hollow else "black", markeredgewidth=1.8 if hollow else 0.5, zorder=3)
    handles = [Line2D([], [], ls="none", marker="s", markersize=8, color=COLOURS[m], label=LABELS[m])
               for m in ROLES if any(p["model"] == m for p in report["points"])]
    handles += [Line2D([], [], ls="none", marker=marker[r], markersize=7, color="#bbbbbb", markeredgecolor="black",
                       label=r) for r in runtimes]
    handles += [Line2D([], [], ls="none", marker="o", markersize=7, color="#888888", fillstyle=PRECISION_FILL[q],
                       markerfacecoloralt="white", markeredgecolor="#888888" if q == "int8" else "black",
                       markeredgewidth=1.8 if q == "int8" else 0.5, label=q.upper())
                for q in PRECISION_FILL if any(p["precision"] == q for p in report["points"])]
    teacher = report["teacher"]
    ax.axhline(TARGET_AP_RATIO * teacher["AP"], color="#999999", ls=":", lw=1, zorder=0)
    ax.axvline(teacher["p50_ms"] / TARGET_SPEEDUP, color="#999999", ls=":", lw=1, zorder=0)
    ax.annotate(f"{TARGET_AP_RATIO:g} x teacher AP", (1, TARGET_AP_RATIO * teacher["AP"]), xycoords=("axes fraction", "data"),
                xytext=(-4, 3), textcoords="offset points", ha="right", fontsize=7, color="#777777")
    ax.annotate(f"{TARGET_SPEEDUP:g}x faster than the teacher", (teacher["p50_ms"] / TARGET_SPEEDUP, 0),
                xycoords=("data", "axes fraction"), xytext=(3, 4), textcoords="offset points", fontsize=7,
                color="#777777", rotation=90)
    ax.set_xscale("log")
    xs = [p["p50_ms"] for p in report["points"]] + [v for s in sizes for v in (s["baseline_p50_ms"], s["distilled_p50_ms"])]
    xs.append(teacher["p50_ms"] / TARGET_SPEEDUP)
    ax.set_xlim(min(xs) / 1.3, max(xs) * 1.3)
    _log_ticks(ax, min(xs) / 1.3, max(xs) * 1.3)
    ax.set_xlabel(f"p50 latency at batch {report['batch'].removeprefix('batch')} (ms, log scale)  <- faster")
    ax.set_ylabel("COCO box AP (val split)  higher ->")
    ax.grid(True, which="both", alpha=0.25)
    curves = [h for h in ax.get_legend_handles_labels()[0]]
    ax.legend(handles=curves + handles, fontsize=7.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False,
              title="colour: model · marker: runtime · fill: precision", title_fontsize=7)
    ax.set_title("What distillation buys on the speed/accuracy plane", fontsize=11)
    fig.text(0.01, 0.005, f"Machine: {report['machine']}", fontsize=6.5, color="#444444")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def _arrow(ax, start, end, alpha: float = 0.9) -> None:
    ax.annotate("", xy=end, xytext=start, zorder=2,
                arrowprops={"arrowstyle": "->", "color": COLOURS["distilled"], "lw": 1.4, "alpha": alpha})


def _log_ticks(ax, low: float, high: float) -> None:
    """Readable ticks on a short log axis (1, 2, 5 x 10^k) instead of matplotlib's sparse decades."""
    ticks = [m * 10**k for k in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1) for m in (1, 2, 3, 5)]
    ticks = [t for t in ticks if low <= t <= high]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()


def write(report: dict, json_path: str | Path) -> None:
    """``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` beside each other."""
    json_path = Path(json_path)
    atomic_write_json(json_path, report)
    atomic_write_text(json_path.with_suffix(".md"), markdown(report))
    plot(report, json_path.with_suffix(".png"))
