"""Lazy access to the compiled extension omni_rt._C (paged-KV block manager)."""
from __future__ import annotations

import functools


@functools.lru_cache(maxsize=1)
def load_ext():
    """Import omni_rt._C, or raise ImportError that says how to build it."""
    try:
        from omni_rt import _C  # noqa: PLC0415
    except ImportError as e:
        raise ImportError(
            "omni_rt._C (the C++ paged-KV block manager) is not built. Build it with "
            "`pip install -e . --no-build-isolation` (needs a C++17 compiler and pybind11), or "
            "`python setup.py build_ext --inplace`; it is skipped when OMNI_RT_SKIP_BUILD=1 was set "
            f"at install time. ({e})") from e
    return _C
