"""Timing helpers shared by the benchmarks: medians/percentiles of repeated calls, and memory bandwidth."""

from __future__ import annotations

import os
import platform
import time

import numpy as np


def time_calls(fn, warmup: int = 10, min_runs: int = 30, min_seconds: float = 0.5, max_runs: int = 2000) -> np.ndarray:
    """Wall-clock seconds of repeated ``fn()`` calls after ``warmup`` calls (fewer of both for calls over 0.1 s)."""
    t0 = time.perf_counter()
    fn()
    if time.perf_counter() - t0 > 0.1:  # a slow variant: a handful of runs says enough
        warmup, min_runs = 1, 5
    for _ in range(warmup - 1):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < max_runs and (len(times) < min_runs or time.perf_counter() - start < min_seconds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return np.asarray(times)


def copy_bandwidth(nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Bytes per second of a large numpy copy, counting read + write."""
    src = np.ones(nbytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
    best = min(time_calls(lambda: np.copyto(dst, src), warmup=1, min_runs=repeats, min_seconds=0.0))
    return 2 * src.nbytes / best


def machine() -> dict:
    import onnxruntime

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "system": platform.system()}


def peak_rss_mb() -> float:
    """This process's peak resident set since it started its program (Linux VmHWM). Unlike ru_maxrss it does not
    carry the parent's resident set over from before the exec of a worker."""
    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration, ValueError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
