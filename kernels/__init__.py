"""omni_rt.kernels: hand-written Triton kernels, one file per op.

Every op file holds the ``@triton.jit`` kernel(s), a launcher that validates shapes/strides/dtypes and
launches, and a ``*_ref`` plain-PyTorch reference that is both the CPU path and the tests' truth.

Dispatch rule (``use_triton``): Triton runs on CUDA tensors; on CPU the PyTorch reference runs, unless
Triton is forced on (``force_triton()`` or ``OMNI_RT_FORCE_TRITON=1``), which under ``TRITON_INTERPRET=1``
runs the real launchers and kernels on CPU tensors so launcher/layout mismatches surface without a GPU.

Each op module also lists the launch configurations it ships in ``COMPILE_SPECS`` (see ``KernelSpec``) so
``tests/test_kernel_compile.py`` can compile every one of them for sm_90 and sm_80 with the real compiler.

Nothing here queries a device at import time.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from typing import Any, Callable, Iterator

__all__ = ["use_triton", "force_triton", "triton_forced", "graph_safe", "graph_safe_enabled", "KernelSpec"]

_state = threading.local()


def triton_forced() -> bool:
    """True when Triton kernels must run even on CPU tensors (tests under TRITON_INTERPRET=1)."""
    forced = getattr(_state, "forced", None)
    if forced is not None:
        return forced
    return os.environ.get("OMNI_RT_FORCE_TRITON", "0") == "1"


@contextlib.contextmanager
def force_triton(enabled: bool = True) -> Iterator[None]:
    """Force (or forbid) the Triton path for code run inside the block, on this thread."""
    previous = getattr(_state, "forced", None)
    _state.forced = enabled
    try:
        yield
    finally:
        _state.forced = previous


@contextlib.contextmanager
def graph_safe(enabled: bool = True) -> Iterator[None]:
    """Inside the block (this thread), ops that do not take the Triton path use their static-shape torch
    implementations (``*_static``: no boolean indexing, no host reads, no data-dependent loops) instead of
    the references, so a whole decode step traces with ``torch.compile(fullgraph=True)``. Same numbers as
    the references up to summation order."""
    previous = getattr(_state, "graph_safe", None)
    _state.graph_safe = enabled
    try:
        yield
    finally:
        _state.graph_safe = previous


def graph_safe_enabled() -> bool:
    return bool(getattr(_state, "graph_safe", None))


def use_triton(*tensors: Any) -> bool:
    """Whether an op on ``tensors`` takes the Triton path: forced, or every tensor lives on CUDA."""
    if triton_forced():
        return True
    return bool(tensors) and all(getattr(t, "is_cuda", False) for t in tensors)


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """One launch configuration a kernel ships with, for the ahead-of-time compile check.

    ``signature`` maps every non-constexpr argument to its Triton type string (``"*fp16"``, ``"i32"``,
    ``"fp32"``); ``constexprs`` maps constexpr argument names to values. ``archs`` limits the check to some
    architectures (e.g. ``("sm_90",)`` for FP8 kernels, which sm_80 never runs); None means all.
    """

    name: str
    fn: Callable
    signature: dict
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 2
    archs: tuple[str, ...] | None = None
