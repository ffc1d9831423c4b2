"""Profiling hooks: NVTX ranges per stage (no-ops where CUDA/NVTX is absent) and a torch.profiler switch.

nsys (on a machine where it works):
    nsys profile -t cuda,nvtx,osrt --cuda-graph-trace=node -o omni_rt_profile \\
        python -u -m omni_rt bench --synthetic full --concurrency 1
    nsys stats --report cuda_gpu_kern_sum,nvtx_sum omni_rt_profile.nsys-rep
NVTX ranges are host events: inside a CUDA-graph replay nothing is re-emitted, so ranges wrap the replay call.

Where nsys is unavailable, ``Runtime(..., profile_dir=DIR)`` (or ``omni-rt bench --profile DIR``) records a
torch.profiler trace (Chrome/Perfetto JSON) of the engine steps into DIR.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Iterator


@functools.lru_cache(maxsize=1)
def _nvtx():
    """torch's NVTX bindings when this torch build has CUDA and a device is present; else None."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        torch.cuda.nvtx.range_push("omni_rt:probe")
        torch.cuda.nvtx.range_pop()
        return torch.cuda.nvtx
    except Exception:
        return None


@contextlib.contextmanager
def nvtx_range(name: str) -> Iterator[None]:
    """An NVTX range named ``omni_rt:<name>`` around the block; nothing at all without CUDA/NVTX."""
    nv = _nvtx()
    if nv is None:
        yield
        return
    nv.range_push(f"omni_rt:{name}")
    try:
        yield
    finally:
        nv.range_pop()


class TorchProfiler:
    """Records a torch.profiler trace of everything between start() and stop() into ``out_dir``."""

    def __init__(self, out_dir: str | os.PathLike):
        import torch

        self.out_dir = os.fspath(out_dir)
        os.makedirs(self.out_dir, exist_ok=True)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._prof = torch.profiler.profile(activities=activities, record_shapes=False, with_stack=False)
        self.path: str | None = None

    def start(self) -> None:
        self._prof.__enter__()

    def stop(self) -> str:
        self._prof.__exit__(None, None, None)
        self.path = os.path.join(self.out_dir, f"omni_rt_trace_{os.getpid()}.json")
        self._prof.export_chrome_trace(self.path)
        return self.path


class StageTimer:
    """Wall time per named stage (accumulated), each stage also an NVTX range. ``snapshot()`` → {name: ms}."""

    def __init__(self):
        import time

        self._clock = time.perf_counter
        self.totals: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = self._clock()
        with nvtx_range(name):
            yield
        self.totals[name] = self.totals.get(name, 0.0) + self._clock() - start
        self.counts[name] = self.counts.get(name, 0) + 1

    def snapshot(self) -> dict[str, float]:
        return {k: v * 1000.0 for k, v in self.totals.items()}

    def reset(self) -> None:
        self.totals.clear()
        self.counts.clear()
