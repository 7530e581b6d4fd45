"""Timing one callable: warm-up excluded, device synchronised, order statistics.

Contract: ``time_callable(fn, warmup, iterations, synchronize, warmup_seconds)`` calls ``fn`` untimed
``warmup`` times and for at least ``warmup_seconds`` (a runtime reaches its steady state after a time rather
than a count of calls: measured, OpenVINO's 5 ms INT8 student ran 5.6 -> 4.2 ms over its first second), then
``iterations`` times, each timed from before the call to after ``synchronize()`` (a no-op on the CPU,
``torch.cuda.synchronize`` on CUDA), and returns seconds per call. ``latency_stats(seconds, batch)`` gives
p50/p90/p99/mean in milliseconds (linear-interpolated percentiles, numpy's default) and throughput in
images per second (``batch / mean``).
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import numpy as np


def time_callable(fn: Callable[[], object], warmup: int, iterations: int,
                  synchronize: Optional[Callable[[], None]] = None, warmup_seconds: float = 0.0) -> list[float]:
    sync = synchronize or (lambda: None)
    start = time.perf_counter()
    calls = 0
    while calls < warmup or time.perf_counter() - start < warmup_seconds:
        fn()
        calls += 1
    sync()
    seconds = []
    for _ in range(iterations):
        start = time.perf_counter()
        fn()
        sync()
        seconds.append(time.perf_counter() - start)
    return seconds


def latency_stats(seconds: list[float], batch: int) -> dict:
    if not seconds:
        raise ValueError("no timings")
    ms = np.asarray(seconds, dtype=np.float64) * 1000.0
    mean = float(ms.mean())
    return {"p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": mean, "throughput_ips": batch * 1000.0 / mean,
            "iterations": len(seconds)}
