"""Benchmark report for people: a Markdown table and a latency plot (``reports/benchmark.{md,png}``)."""

from __future__ import annotations

from pathlib import Path

from detkd.io import atomic_path, atomic_write_text


def machine_line(env: dict) -> str:
    gpu = env.get("gpu") or "no GPU"
    v = env["versions"]
    return (f"{env['cpu']} ({env['cpu_count']} cores; torch threads {env['torch_threads']}, onnxruntime threads "
            f"{env['onnxruntime_threads']}), {gpu}; torch {v['torch']}, onnxruntime {v['onnxruntime']}, "
            f"TensorRT {v.get('tensorrt') or 'absent'}")


def markdown(report: dict) -> str:
    lines = [f"Machine: {machine_line(report['environment'])}", "",
             "| model | backend | batch | p50 ms | p90 ms | p99 ms | mean ms | images/s | size MB | AP |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for model, backends in report["results"].items():
        for backend, rows in backends.items():
            for batch, r in rows.items():
                lines.append(f"| {model} | {backend} | {batch.removeprefix('batch')} | {r['p50_ms']:.1f} | {r['p90_ms']:.1f} | "
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
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 3.6), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        labels, values, errors = [], [], []
        for model, backends in report["results"].items():
            for backend, rows in backends.items():
                if batch in rows:
                    r = rows[batch]
                    labels.append(f"{model}\n{backend}")
                    values.append(r["p50_ms"])
                    errors.append([[r["p50_ms"] - min(r["p50_ms"], r["mean_ms"])], [r["p90_ms"] - r["p50_ms"]]])
        ax.barh(range(len(values)), values, color=["#4c72b0" if "teacher" in l else "#dd8452" for l in labels])
        ax.set_yticks(range(len(values)), labels, fontsize=7)
        ax.invert_yaxis()
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:.0f}", va="center", fontsize=7)
        ax.set_xlabel("p50 latency (ms)")
        ax.set_title(f"batch {batch.removeprefix('batch')}")
    fig.suptitle(machine_line(report["environment"])[:110], fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write(report: dict, markdown_path: str | Path, plot_path: str | Path) -> None:
    atomic_write_text(markdown_path, markdown(report))
    plot(report, plot_path)
