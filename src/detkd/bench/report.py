"""Benchmark report for people: a Markdown table and a latency plot (``reports/benchmark.{md,png}``)."""

from __future__ import annotations

import textwrap
from pathlib import Path

from detkd.bench.backends import split_row_key
from detkd.io import atomic_path, atomic_write_text

MODEL_COLOURS = {"teacher": "#4c72b0", "student": "#8c8c8c", "distilled": "#dd8452"}  # shared with the frontier plot


def machine_line(env: dict) -> str:
    gpu = env.get("gpu") or "no GPU"
    v = env["versions"]
    return (f"{env['cpu']} ({env['cpu_count']} cores; torch threads {env['torch_threads']}, onnxruntime threads "
            f"{env['onnxruntime_threads']}), {gpu}; torch {v['torch']}, onnxruntime {v['onnxruntime']}, "
            f"OpenVINO {v.get('openvino') or 'absent'}, TensorRT {v.get('tensorrt') or 'absent'}")


def markdown(report: dict) -> str:
    lines = [f"Machine: {machine_line(report['environment'])}", "",
             "| model | backend | precision | threads | batch | p50 ms | p90 ms | p99 ms | mean ms | images/s | size MB | AP |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for model, backends in report["results"].items():
        for key, rows in backends.items():
            backend = split_row_key(key)[0]
            for batch, r in rows.items():
                lines.append(f"| {model} | {backend} | {r.get('precision', 'fp32').upper()} | {r.get('threads', '–')} | "
                             f"{batch.removeprefix('batch')} | "
                             f"{r['p50_ms']:.1f} | {r['p90_ms']:.1f} | "
                             f"{r['p99_ms']:.1f} | {r['mean_ms']:.1f} | {r['throughput_ips']:.1f} | {r['size_mb']:.1f} | "
                             f"{r['AP']:.3f} |")
    targets = report["targets"]
    if targets["speedup"] or targets["onnxruntime_vs_torch_cpu"]:
        lines += ["", "Targets:"]
    for batch, t in targets["speedup"].items():
        lines.append(f"- batch {batch.removeprefix('batch')}: distilled student {t['speedup']:.2f}x faster than the teacher "
                     f"on the fastest CPU backend ({t['student_backend']} {t['student_p50_ms']:.1f} ms vs "
                     f"{t['teacher_backend']} {t['teacher_p50_ms']:.1f} ms); target >= {t['target']:.0f}x: "
                     f"{'met' if t['met'] else 'NOT met'}")
    for model, batches in targets["onnxruntime_vs_torch_cpu"].items():
        for batch, t in batches.items():
            lines.append(f"- {model} batch {batch.removeprefix('batch')}: onnxruntime CPU {t['onnxruntime_p50_ms']:.1f} ms vs "
                         f"PyTorch eager CPU {t['torch_p50_ms']:.1f} ms ({t['ratio']:.2f}x the time); not slower: "
                         f"{'met' if t['met'] else 'NOT met'}")
    if report["skipped"]:
        lines += ["", "Not run here:"] + [f"- {b}: {reason}" for b, reason in report["skipped"].items()]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({b for m in report["results"].values() for rows in m.values() for b in rows},
                     key=lambda b: int(b.removeprefix("batch")))
    bars = max(sum(batch in rows for m in report["results"].values() for rows in m.values()) for batch in batches)
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), max(3.6, 0.3 * bars + 1.2)), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        labels, values, aps, colour = [], [], [], []
        for model, backends in report["results"].items():
            for key, rows in backends.items():
                if batch in rows:
                    r = rows[batch]
                    backend, precision = split_row_key(key)
                    labels.append(f"{model} · {backend} · {precision.upper()}")
                    values.append(r["p50_ms"])
                    aps.append(r.get("AP", float("nan")))
                    colour.append(MODEL_COLOURS.get(model, "#55a868"))
        ax.barh(range(len(values)), values, color=colour)
        ax.set_yticks(range(len(values)), labels, fontsize=7)
        ax.invert_yaxis()
        for i, (v, ap) in enumerate(zip(values, aps)):
            ax.text(v, i, f" {v:.1f} ms · AP {ap:.3f}", va="center", fontsize=6.5)
        ax.set_xlim(0, max(values) * 1.35)
        ax.set_xlabel("p50 latency (ms)")
        ax.set_title(f"batch {batch.removeprefix('batch')}")
    fig.suptitle("\n".join(textwrap.wrap(machine_line(report["environment"]), 140)), fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write(report: dict, markdown_path: str | Path, plot_path: str | Path) -> None:
    atomic_write_text(markdown_path, markdown(report))
    plot(report, plot_path)
