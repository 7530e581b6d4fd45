"""Timing one callable: warm-up excluded, device synchronised, order statistics.

Contract: ``time_callable(fn, warmup, iterations, synchronize)`` calls ``fn`` ``warmup`` times untimed, then
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
                  synchronize: Optional[Callable[[], None]] = None) -> list[float]:
    sync = synchronize or (lambda: None)
    for _ in range(warmup):
        fn()
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
