"""Run the benchmark and judge its targets.

Contract: ``run_benchmark(params, checkpoints, export_report, eval_report, data_dir)`` times every model
(all rows interleaved over ``benchmark.rounds`` passes, see ``_interleaved``) on every backend available here (``detkd.bench.backends``), every gated artefact of it (FP32, FP16, INT8),
for each of ``benchmark.batch_sizes`` and returns ``{"environment", "results", "skipped", "targets"}``
where ``results[model][row]["batch<B>"]`` (``row`` = ``backend`` or ``backend/precision``) holds the
latency statistics, throughput, precision, the artefact's size in MB and the AP *of that artefact on that
runtime* (the PyTorch model's from ``evaluate``, every ONNX file's and engine's from the export gate).
``check_targets(results)`` compares the distilled student with the teacher on the fastest CPU backend
and onnxruntime with PyTorch eager on the CPU, per batch size.
"""

from __future__ import annotations

import os
import platform
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from detkd.bench.backends import Target, split_row_key, targets
from detkd.bench.latency import latency_stats, time_callable
from detkd.config import Params
from detkd.data.dataset import open_split
from detkd.machine import cpu_name
from detkd.runtime.metadata import ModelInfo, read_model_info
from detkd.runtime.preprocess import letterbox, read_image

REVISIT_WARMUP = 3  # untimed calls when a row is visited again in a later pass
MIN_SPEEDUP = 3.0  # distilled student vs teacher, batch 1... each on its fastest FP32 CPU backend


def is_cpu_backend(row: str) -> bool:
    """CPU backends are named ``<runtime>-cpu`` (torch-cpu, onnxruntime-cpu, openvino-cpu/int8, ...)."""
    return split_row_key(row)[0].endswith("-cpu")


def environment(threads: int) -> dict:
    import onnxruntime

    from detkd.runtime.openvino_runner import openvino_version

    versions = {"python": platform.python_version(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                "openvino": openvino_version()}
    try:
        import tensorrt

        versions["tensorrt"] = tensorrt.__version__
    except ImportError:
        versions["tensorrt"] = None
    return {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "torch_threads": torch.get_num_threads(), "onnxruntime_threads": threads or os.cpu_count(),
            "platform": platform.platform(), "versions": versions}


def _batches(index, info: ModelInfo, sizes: list[int]) -> dict[int, np.ndarray]:
    count = max(sizes)
    images = [letterbox(read_image(index.images[i % len(index.images)].path), info)[0] for i in range(count)]
    return {b: np.stack(images[:b]) for b in sizes}


def run_benchmark(params: Params, checkpoints: dict[str, str], export_report: dict, eval_report: dict,
                  data_dir: str, log: Callable[[str], None] = print) -> dict:
    cfg = params.benchmark
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    index = open_split(data_dir, "val", params.data.min_box_size)
    results: dict = {}
    skipped: dict = {}
    runnable: list[tuple[str, Target, dict]] = []  # (model, target, its batches)
    thread_options = cpu_thread_options(cfg.threads, cfg.tune_threads)
    for name, checkpoint in checkpoints.items():
        entry = export_report["models"][name]
        info = read_model_info(entry["artefacts"]["fp32"]["path"])  # letterboxing rule, without opening a session
        batches = _batches(index, info, cfg.batch_sizes)
        results[name] = {}
        for target, backend, reason in targets(checkpoint, entry, cfg.backends, thread_options,
                                               float(eval_report[name]["AP"]) if name in eval_report else float("nan")):
            if target is None:
                skipped[backend if backend in cfg.backends else f"{name} {backend}"] = reason  # backend-wide or per artefact
            else:
                runnable.append((name, target, batches))
                results[name][target.backend] = {}
    for b in cfg.batch_sizes:
        jobs = []
        for name, t, batches in runnable:
            if t.max_batch and b > t.max_batch:
                skipped[f"{name} {t.backend} batch {b}"] = f"engine built for batch <= {t.max_batch}"
            else:
                jobs.append(((name, t.backend, t.threads), lambda t=t, x=batches[b]: t.run(x), t.synchronize))
        seconds = _interleaved(jobs, cfg.warmup, cfg.iterations, cfg.rounds, f"benchmark batch {b}", cfg.warmup_seconds)
        for name, key, row in _fastest_thread_setting(runnable, seconds, b):
            results[name][key][f"batch{b}"] = row
            log(f"benchmark: {name} {key} batch {b}: p50 {row['p50_ms']:.1f} ms"
                + (f" ({row['threads']} threads)" if "threads" in row else ""))
    for backend, reason in skipped.items():
        log(f"benchmark: skipped {backend}: {reason}")
    return {"environment": environment(cfg.threads), "settings": cfg.model_dump(), "results": results,
            "skipped": skipped, "targets": check_targets(results)}


def _fastest_thread_setting(runnable: list, seconds: dict, batch: int):
    """Yield ``(model, row key, row)`` per benchmark row at ``batch``: targets that differ only in their thread
    count are one row, the faster one kept, with ``threads`` and every count's p50 (``p50_ms_by_threads``)."""
    candidates: dict = {}
    for name, t, _ in runnable:
        timed = seconds.get((name, t.backend, t.threads))
        if timed is None:
            continue
        row = {**latency_stats(timed, batch), "size_mb": t.size_mb, "precision": t.precision, "AP": t.ap,
               "artefact": t.artefact}
        if t.threads is not None:
            row["threads"] = t.threads or os.cpu_count()
        candidates.setdefault((name, t.backend), []).append(row)
    for (name, key), rows in candidates.items():
        best = dict(min(rows, key=lambda r: r["p50_ms"]))
        if "threads" in best:
            best["p50_ms_by_threads"] = {str(r["threads"]): r["p50_ms"] for r in rows}
        yield name, key, best


def cpu_thread_options(threads: int, tune: bool) -> list[int]:
    """Thread counts tried for onnxruntime/OpenVINO rows: ``threads`` (0 = every core), and 1 as well when
    ``tune`` and the machine has more than one core. Measured on 2 cores: the 5 ms INT8 student runs
    faster on 1 OpenVINO thread (5.0 vs 6.0 ms), the 28 ms teacher on 2 (28 vs 45 ms): the right count
    depends on the model, so each row keeps its faster setting, teacher and students alike."""
    options = [threads]
    if tune and (threads or os.cpu_count() or 1) > 1 and 1 not in options:
        options.append(1)
    return options


def _interleaved(jobs: list[tuple], warmup: int, iterations: int, rounds: int, description: str,
                 warmup_seconds: float = 0.0) -> dict:
    """Seconds per call of every ``(key, call, synchronize)`` job, measured in ``rounds`` interleaved passes
    (A B C, A B C, ...) of ``iterations / rounds`` calls each, so that a slow phase of a shared machine hits
    every row (every model, backend and precision) alike instead of whichever ran then. The first pass warms
    each job up ``warmup`` calls and at least ``warmup_seconds``; later passes run ``REVISIT_WARMUP`` untimed
    calls first (measured: after
    another runtime ran, the first calls of a 5 ms model are 10-20 % slower; three calls absorb it)."""
    per_round = [iterations // rounds + (1 if r < iterations % rounds else 0) for r in range(rounds)]
    seconds: dict = {key: [] for key, _, _ in jobs}
    with tqdm(total=iterations * len(jobs), desc=description, dynamic_ncols=True, mininterval=1.0) as bar:
        for r, n in enumerate(per_round):
            for key, call, synchronize in jobs:
                first = r == 0
                seconds[key] += time_callable(call, warmup if first else min(warmup, REVISIT_WARMUP), n, synchronize,
                                              warmup_seconds if first else 0.0)
                bar.update(n)
    return seconds


def fastest(results: dict, model: str, batch: str, backends=None, precision: str | None = "fp32") -> tuple[str, float] | None:
    """(backend, p50 ms) of ``model``'s fastest row at ``batch`` among ``backends`` (default: the CPU
    backends) at ``precision`` (default FP32; None = any), or None when there is no such row."""
    rows = results.get(model, {})
    names = [b for b in rows if is_cpu_backend(b)] if backends is None else backends
    options = [(b, rows[b][batch]["p50_ms"]) for b in names if batch in rows.get(b, {})
               and (precision is None or rows[b][batch].get("precision", "fp32") == precision)]
    return min(options, key=lambda kv: kv[1]) if options else None


def check_targets(results: dict, teacher: str = "teacher", student: str = "distilled") -> dict:
    out: dict = {"speedup": {}, "onnxruntime_vs_torch_cpu": {}}
    batches = sorted({k for m in results.values() for rows in m.values() for k in rows})
    for batch in batches:
        t, s = fastest(results, teacher, batch), fastest(results, student, batch)
        if t and s:
            ratio = t[1] / s[1]
            out["speedup"][batch] = {"teacher_backend": t[0], "teacher_p50_ms": t[1], "student_backend": s[0],
                                     "student_p50_ms": s[1], "speedup": ratio, "target": MIN_SPEEDUP,
                                     "met": bool(ratio >= MIN_SPEEDUP)}
        for model, backends in results.items():
            if batch in backends.get("torch-cpu", {}) and batch in backends.get("onnxruntime-cpu", {}):
                ort, eager = backends["onnxruntime-cpu"][batch]["p50_ms"], backends["torch-cpu"][batch]["p50_ms"]
                out["onnxruntime_vs_torch_cpu"].setdefault(model, {})[batch] = {
                    "onnxruntime_p50_ms": ort, "torch_p50_ms": eager, "ratio": ort / eager, "met": bool(ort <= eager)}
    return out
