"""The pipeline's last word: ``reports/summary.md`` from the evaluate, export and benchmark reports.

Contract: ``build_summary(eval_report, export_report, benchmark_report)`` -> Markdown with one row per
model (teacher, baseline student, distilled student): backbone, PyTorch AP, FP32 ONNX AP, p50 latency at
batch 1 per benchmark row (backend, and precision where not FP32), ONNX size; then the deployed artefact,
the compression and speed-ups over the teacher, the targets and the machine.
``headline(...)`` -> the flat numbers of ``reports/summary.json`` (DVC metrics).
``deployed(benchmark_report)`` -> the distilled student's fastest gated artefact on a CPU backend.
"""

from __future__ import annotations

from pathlib import Path

from detkd.bench.report import machine_line
from detkd.bench.run import MIN_SPEEDUP, fastest

ROWS = (("teacher", "teacher", "teacher"), ("baseline student", "student", "student"),
        ("distilled student", "distilled", "distilled"))
MIN_AP_RATIO = 0.85  # distilled AP / teacher AP (also: deployed artefact's AP / teacher AP)
MIN_COMPRESSION = 4.0  # teacher FP32 p50 / deployed student artefact p50, batch 1, CPU
HEADLINE_MODELS = (("teacher", "teacher"), ("baseline", "student"), ("distilled", "distilled"))  # key prefix, model


def deployed(benchmark_report: dict, batch: str = "batch1", model: str = "distilled") -> dict | None:
    """The fastest row of ``model`` at ``batch`` on a CPU backend, any precision. Every benchmark row is a
    gated artefact (rejected ones are never timed), so this is what a CPU deployment would ship:
    ``{"row", "p50_ms", "AP", "precision", "artefact"}``, or None without rows."""
    best = fastest(benchmark_report["results"], model, batch, precision=None)
    if best is None:
        return None
    row = benchmark_report["results"][model][best[0]][batch]
    return {"row": best[0], "p50_ms": best[1], "AP": float(row["AP"]), "precision": row.get("precision", "fp32"),
            "artefact": row.get("artefact", "")}


def headline(eval_report: dict, export_report: dict, benchmark_report: dict, batch: str = "batch1") -> dict:
    """``reports/summary.json``: flat numbers for ``dvc exp show`` and scripts. ``*_p50_ms`` are p50 at
    ``batch`` on each model's fastest FP32 CPU backend; ``speedup_b1`` = teacher p50 / distilled p50 (FP32
    both). ``deployed_*``: the distilled student's fastest gated artefact on a CPU backend, any precision
    (``deployed``); ``compression_b1`` = teacher FP32 p50 / deployed p50."""
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
    best = deployed(benchmark_report, batch)
    if best is not None:
        out["deployed_ap"] = round(best["AP"], 4)
        out["deployed_p50_ms"] = round(best["p50_ms"], 2)
        if "teacher_p50_ms" in out:
            out["compression_b1"] = round(out["teacher_p50_ms"] / best["p50_ms"], 3)
    for name in ("teacher", "distilled"):
        graph = export_report["models"].get(name, {}).get("graph", {})
        if "size_mb" in graph:
            out[f"{name}_onnx_mb"] = round(graph["size_mb"], 2)
    artefacts = [a for m in export_report["models"].values() for a in m["artefacts"].values() if a["status"] != "skipped"]
    out["gates_passed"] = int(all(a["status"] == "deployable" for a in artefacts if a["precision"] == "fp32"))
    out["artefacts_deployable"] = sum(a["status"] == "deployable" for a in artefacts)
    out["artefacts_rejected"] = sum(a["status"] == "rejected" for a in artefacts)
    return out


def _fmt(value, digits=3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def build_summary(eval_report: dict, export_report: dict, benchmark_report: dict, batch: str = "batch1") -> str:
    results = benchmark_report["results"]
    backends = sorted({b for m in results.values() for b, rows in m.items() if batch in rows},
                      key=lambda b: (not b.startswith("torch"), b))
    header = ["model", "backbone", "AP PyTorch", "AP ONNX FP32", *[f"{b} p50 ms" for b in backends], "ONNX MB"]
    lines = ["# detkd summary", "", f"Machine: {machine_line(benchmark_report['environment'])}", "",
             f"Latency: p50 at batch {batch.removeprefix('batch')} on letterboxed {_input_size(export_report)} px inputs, "
             "detections included (NMS in the graph).", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, eval_name, timed in ROWS:
        if eval_name not in eval_report:
            continue
        entry = export_report["models"].get(timed, {})
        backbone = entry.get("backbone", "")
        onnx_ap = entry.get("artefacts", {}).get("fp32", {}).get("gates", {}).get("onnxruntime-cpu", {}).get("metrics", {}).get("AP")
        cells = [_fmt(results.get(timed, {}).get(b, {}).get(batch, {}).get("p50_ms"), 1) for b in backends]
        size = _fmt(entry.get("graph", {}).get("size_mb"), 1)
        lines.append(f"| {label} | {backbone} | {_fmt(eval_report[eval_name]['AP'])} | {_fmt(onnx_ap)} | "
                     + " | ".join(cells) + f" | {size} |")
    engines = [(name, p, e["metrics"]["AP"]) for name, m in export_report["models"].items() for p, e in m["engines"].items()
               if "metrics" in e]
    lines += ["", "Artefacts (AP on the val split per CPU runtime; a rejected file failed its gate and is not deployed):", ""]
    for name, m in export_report["models"].items():
        for precision, a in m["artefacts"].items():
            aps = ", ".join(f"{b} {g['metrics']['AP']:.3f}" for b, g in a.get("gates", {}).items()) or a.get("reason", "")
            lines.append(f"- {Path(a['path']).name}: {a['status']} ({aps})")
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
    best = deployed(benchmark_report, batch)
    t_fp32 = fastest(results, "teacher", batch)
    if best and t_fp32:
        ratio = t_fp32[1] / best["p50_ms"]
        ap_ratio = best["AP"] / eval_report["teacher"]["AP"] if eval_report.get("teacher", {}).get("AP") else 0.0
        lines.append(f"- Deployed student: {Path(best['artefact']).name} on {best['row'].split('/')[0]} "
                     f"({best['precision'].upper()}), p50 {best['p50_ms']:.1f} ms, AP {best['AP']:.3f}. Compression over the "
                     f"FP32 teacher ({t_fp32[0]} {t_fp32[1]:.1f} ms): {ratio:.2f}x; target >= {MIN_COMPRESSION:g}x with AP >= "
                     f"{MIN_AP_RATIO:g} of the teacher's ({ap_ratio:.2f}): "
                     f"{'met' if ratio >= MIN_COMPRESSION and ap_ratio >= MIN_AP_RATIO else 'not met'}.")
    for b, t in benchmark_report["targets"]["speedup"].items():
        lines.append(f"- Target student >= {MIN_SPEEDUP:g}x faster than the teacher on the fastest FP32 CPU backend, batch "
                     f"{b.removeprefix('batch')}: {t['speedup']:.2f}x, {'met' if t['met'] else 'not met'}.")
    if "teacher" in eval_report and "distilled" in eval_report:
        ratio = eval_report["distilled"]["AP"] / eval_report["teacher"]["AP"] if eval_report["teacher"]["AP"] else 0.0
        lines.append(f"- Target distilled AP >= {MIN_AP_RATIO:g} of the teacher's: {ratio:.2f}, "
                     f"{'met' if ratio >= MIN_AP_RATIO else 'not met'}.")
    gates = [(n, m["artefacts"]["fp32"]["gates"]["onnxruntime-cpu"]["ap_gate"]) for n, m in export_report["models"].items()
             if "onnxruntime-cpu" in m["artefacts"]["fp32"]["gates"]]
    if gates:
        lines.append(f"- FP32 ONNX AP (onnxruntime) within {gates[0][1]['max_difference']:g} of PyTorch: " + ", ".join(
            f"{n} {g['difference']:+.4f} ({'met' if g['passed'] else 'not met'})" for n, g in gates) + ".")
    return "\n".join(lines) + "\n"


def _input_size(export_report: dict) -> str:
    sizes = {m.get("input_size") for m in export_report["models"].values()}
    return "/".join(str(s) for s in sorted(sizes) if s)
