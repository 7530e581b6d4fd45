"""The pipeline's last word: ``reports/summary.md`` from the evaluate, export and benchmark reports.

Contract: ``build_summary(eval_report, export_report, benchmark_report)`` -> Markdown with one row per
model (teacher, baseline student, distilled student): backbone, PyTorch AP, ONNX AP (and engines'),
p50 latency at batch 1 per backend, ONNX size; then the distilled student's speed-up over the teacher on
the fastest backend (and the fastest CPU backend), the targets and the machine. The baseline student has
the distilled student's architecture, so it was not exported or timed separately (its row says so).
"""

from __future__ import annotations

from detkd.bench.report import machine_line
from detkd.bench.run import CPU_BACKENDS, fastest

ROWS = (("teacher", "teacher", "teacher"), ("baseline student", "student", None), ("distilled student", "distilled", "distilled"))


def _fmt(value, digits=3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def build_summary(eval_report: dict, export_report: dict, benchmark_report: dict, batch: str = "batch1") -> str:
    results = benchmark_report["results"]
    backends = sorted({b for m in results.values() for b, rows in m.items() if batch in rows},
                      key=lambda b: (not b.startswith("torch"), b))
    header = ["model", "backbone", "AP PyTorch", "AP ONNX", *[f"{b} p50 ms" for b in backends], "ONNX MB"]
    lines = ["# detkd summary", "", f"Machine: {machine_line(benchmark_report['environment'])}", "",
             f"Latency: p50 at batch {batch.removeprefix('batch')} on letterboxed {_input_size(export_report)} px inputs, "
             "detections included (NMS in the graph).", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, eval_name, timed in ROWS:
        if eval_name not in eval_report:
            continue
        entry = export_report["models"].get(timed or "", {})
        backbone = export_report["models"].get(timed or "distilled", {}).get("backbone", "")
        onnx_ap = entry.get("onnx", {}).get("metrics", {}).get("AP") if timed else None
        source = timed or "distilled"
        cells = [_fmt(results.get(source, {}).get(b, {}).get(batch, {}).get("p50_ms"), 1) for b in backends]
        if not timed:
            cells = [f"= distilled ({c})" if c != "–" else c for c in cells]
        size = _fmt(entry.get("graph", {}).get("size_mb"), 1) if timed else "= distilled"
        lines.append(f"| {label} | {backbone} | {_fmt(eval_report[eval_name]['AP'])} | {_fmt(onnx_ap)} | "
                     + " | ".join(cells) + f" | {size} |")
    engines = [(name, p, e["metrics"]["AP"]) for name, m in export_report["models"].items() for p, e in m["engines"].items()]
    lines.append("")
    if engines:
        lines.append("TensorRT engines: " + ", ".join(f"{n} {p} AP {ap:.3f}" for n, p, ap in engines))
    else:
        lines.append(f"TensorRT engines: not built here: {export_report['tensorrt'].get('reason', '')}.")
    lines.append("")
    for title, names in (("any backend", None), ("CPU backends", CPU_BACKENDS)):
        t = fastest(results, "teacher", batch, names or list(results.get("teacher", {})))
        s = fastest(results, "distilled", batch, names or list(results.get("distilled", {})))
        if t and s:
            lines.append(f"- Speed-up of the deployed student over the teacher ({title}): {t[1] / s[1]:.2f}x "
                         f"({s[0]} {s[1]:.1f} ms vs {t[0]} {t[1]:.1f} ms).")
    for b, t in benchmark_report["targets"]["speedup"].items():
        lines.append(f"- Target student >= 2x faster than the teacher on the fastest CPU backend, batch "
                     f"{b.removeprefix('batch')}: {t['speedup']:.2f}x, {'met' if t['met'] else 'not met'}.")
    gates = [(n, m["onnx"]["ap_gate"]) for n, m in export_report["models"].items()]
    lines.append("- ONNX AP within 0.005 of PyTorch: " + ", ".join(
        f"{n} {g['difference']:+.4f} ({'met' if g['passed'] else 'not met'})" for n, g in gates) + ".")
    return "\n".join(lines) + "\n"


def _input_size(export_report: dict) -> str:
    sizes = {m.get("input_size") for m in export_report["models"].values()}
    return "/".join(str(s) for s in sorted(sizes) if s)
