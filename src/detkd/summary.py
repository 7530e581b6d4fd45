"""The pipeline's last word: ``reports/summary.md`` from the evaluate, export and benchmark reports.

Contract: ``build_summary(eval_report, export_report, benchmark_report)`` -> Markdown with one row per
model (teacher, baseline student, distilled student): backbone, PyTorch AP, ONNX AP (and engines'),
p50 latency at batch 1 per backend, ONNX size; then the distilled student's speed-up over the teacher on
the fastest backend (and the fastest FP32 CPU backend), the targets and the machine.
``headline(...)`` -> the flat numbers of ``reports/summary.json`` (DVC metrics).
"""

from __future__ import annotations

from detkd.bench.report import machine_line
from detkd.bench.run import MIN_SPEEDUP, fastest

ROWS = (("teacher", "teacher", "teacher"), ("baseline student", "student", "student"),
        ("distilled student", "distilled", "distilled"))
MIN_AP_RATIO = 0.85  # distilled AP / teacher AP
HEADLINE_MODELS = (("teacher", "teacher"), ("baseline", "student"), ("distilled", "distilled"))  # key prefix, model


def headline(eval_report: dict, export_report: dict, benchmark_report: dict, batch: str = "batch1") -> dict:
    """``reports/summary.json``: flat numbers for ``dvc exp show`` and scripts. Latencies are p50 at
    ``batch`` on each model's fastest FP32 CPU backend; ``speedup_b1`` = teacher p50 / distilled p50."""
    results = benchmark_report["results"]
    out = {f"{name}_ap": round(float(eval_report[key]["AP"]), 4) for name, key in HEADLINE_MODELS}
    out["ap_ratio"] = round(out["distilled_ap"] / out["teacher_ap"], 4) if out["teacher_ap"] else 0.0
    out["distill_gain"] = round(out["distilled_ap"] - out["baseline_ap"], 4)
    for name, key in HEADLINE_MODELS:
        best = fastest(results, key, batch)
        if best is not None:
            out[f"{name}_p50_ms"] = round(best[1], 2)
    if "teacher_p50_ms" in out and "distilled_p50_ms" in out:
        out["speedup_b1"] = round(out["teacher_p50_ms"] / out["distilled_p50_ms"], 3)
    for name in ("teacher", "distilled"):
        graph = export_report["models"].get(name, {}).get("graph", {})
        if "size_mb" in graph:
            out[f"{name}_onnx_mb"] = round(graph["size_mb"], 2)
    out["gates_passed"] = int(all(m["onnx"]["passed"] and all(e["passed"] for e in m["engines"].values())
                                  for m in export_report["models"].values()))
    return out


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
        entry = export_report["models"].get(timed, {})
        backbone = entry.get("backbone", "")
        onnx_ap = entry.get("onnx", {}).get("metrics", {}).get("AP")
        cells = [_fmt(results.get(timed, {}).get(b, {}).get(batch, {}).get("p50_ms"), 1) for b in backends]
        size = _fmt(entry.get("graph", {}).get("size_mb"), 1)
        lines.append(f"| {label} | {backbone} | {_fmt(eval_report[eval_name]['AP'])} | {_fmt(onnx_ap)} | "
                     + " | ".join(cells) + f" | {size} |")
    engines = [(name, p, e["metrics"]["AP"]) for name, m in export_report["models"].items() for p, e in m["engines"].items()]
    lines.append("")
    if engines:
        lines.append("TensorRT engines: " + ", ".join(f"{n} {p} AP {ap:.3f}" for n, p, ap in engines))
    else:
        lines.append(f"TensorRT engines: not built here: {export_report['tensorrt'].get('reason', '')}.")
    lines.append("")
    for title, any_backend in (("any backend", True), ("FP32 CPU backends", False)):
        t = fastest(results, "teacher", batch, list(results.get("teacher", {})) if any_backend else None,
                    None if any_backend else "fp32")
        s = fastest(results, "distilled", batch, list(results.get("distilled", {})) if any_backend else None,
                    None if any_backend else "fp32")
        if t and s:
            lines.append(f"- Speed-up of the deployed student over the teacher ({title}): {t[1] / s[1]:.2f}x "
                         f"({s[0]} {s[1]:.1f} ms vs {t[0]} {t[1]:.1f} ms).")
    for b, t in benchmark_report["targets"]["speedup"].items():
        lines.append(f"- Target student >= {MIN_SPEEDUP:g}x faster than the teacher on the fastest FP32 CPU backend, batch "
                     f"{b.removeprefix('batch')}: {t['speedup']:.2f}x, {'met' if t['met'] else 'not met'}.")
    if "teacher" in eval_report and "distilled" in eval_report:
        ratio = eval_report["distilled"]["AP"] / eval_report["teacher"]["AP"] if eval_report["teacher"]["AP"] else 0.0
        lines.append(f"- Target distilled AP >= {MIN_AP_RATIO:g} of the teacher's: {ratio:.2f}, "
                     f"{'met' if ratio >= MIN_AP_RATIO else 'not met'}.")
    gates = [(n, m["onnx"]["ap_gate"]) for n, m in export_report["models"].items()]
    lines.append("- ONNX AP within 0.005 of PyTorch: " + ", ".join(
        f"{n} {g['difference']:+.4f} ({'met' if g['passed'] else 'not met'})" for n, g in gates) + ".")
    return "\n".join(lines) + "\n"


def _input_size(export_report: dict) -> str:
    sizes = {m.get("input_size") for m in export_report["models"].values()}
    return "/".join(str(s) for s in sorted(sizes) if s)
