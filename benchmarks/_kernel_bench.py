"""What the kernel benchmarks share: a CUDA-synchronised call, a median of repeated calls, and the report of the
bytes an op must move as GB/s against the HBM floor, in ``benchmark.extra_info``."""
from __future__ import annotations

import time
from typing import Callable

import torch

CUDA = torch.cuda.is_available()
HBM_H100 = 3.35e12   # bytes/s: the H100 SXM's HBM3, the floor every kernel benchmark is read against


def device_name() -> str:
    return torch.cuda.get_device_name() if CUDA else "cpu"


def synced(fn: Callable) -> Callable:
    """``fn`` followed by a device synchronisation (timings then cover the kernels, not just their launch)."""
    def run():
        out = fn()
        if CUDA:
            torch.cuda.synchronize()
        return out
    return run


def timed(fn: Callable, reps: int) -> Callable:
    """``reps`` calls of ``fn`` then one synchronisation (for ops too short to time one by one)."""
    def run():
        for _ in range(reps):
            fn()
        if CUDA:
            torch.cuda.synchronize()
    return run


def median_us(fn: Callable, reps: int, rounds: int) -> float:
    """Median over ``rounds`` (after one warm-up) of the per-call time of ``reps`` back-to-back calls, in µs."""
    run = timed(fn, reps)
    run()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        run()
        times.append((time.perf_counter() - t0) / reps)
    return sorted(times)[len(times) // 2] * 1e6


def report_bandwidth(benchmark, nbytes: int, flops: float | None = None, floor: bool = True, **extra) -> None:
    """After ``benchmark(...)`` ran: device, ``bytes`` and the H100 floor (``floor_us_h100``), ``extra``, and —
    when it timed (not under --benchmark-disable) — ``median_us``, ``GB_per_s`` (and ``TFLOP_per_s`` given
    ``flops``) from its median."""
    info = {"device": device_name()}
    if floor:
        info.update(bytes=nbytes, floor_us_h100=nbytes / HBM_H100 * 1e6)
    info.update(extra)
    benchmark.extra_info.update(info)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        med = stats.stats.median
        benchmark.extra_info.update({"median_us": med * 1e6, "GB_per_s": nbytes / med / 1e9})
        if flops is not None:
            benchmark.extra_info["TFLOP_per_s"] = flops / med / 1e12
