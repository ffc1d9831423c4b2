"""Argument checks for the public API: one place that decides what a wrong type and a wrong value are.

Every check names the argument and what is accepted. A value of the wrong type (a string where a number
belongs, a float where an integer belongs, a bool anywhere but a flag) is a ``TypeError``; a value of the
right type outside its range is a ``ValueError``. numpy scalars count as the Python type they hold; ``bool``
never counts as a number (``True`` is not a seed, a token id or a batch size).
"""
from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

__all__ = ["is_int", "check_int", "check_real", "check_bool", "check_int_list", "check_str"]


def is_int(value: Any) -> bool:
    """An integer that is not a bool (Python int or numpy integer)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _range_text(lo, hi, lo_open: bool = False) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo}, {hi}]"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f"<= {hi}"
    return "any value"


def check_int(name: str, value: Any, lo: int | None = None, hi: int | None = None, *,
              hi_exclusive: bool = False, hint: str = "") -> int:
    """``value`` as a Python int in [lo, hi] (or [lo, hi) with ``hi_exclusive``); else TypeError/ValueError."""
    what = f"an integer {_range_text(lo, hi)}" if not hi_exclusive else f"an integer in [{lo}, {hi})"
    if not is_int(value):
        raise TypeError(f"{name} must be {what}{hint}, got {type(value).__name__} {value!r}")
    v = int(value)
    if (lo is not None and v < lo) or (hi is not None and (v >= hi if hi_exclusive else v > hi)):
        raise ValueError(f"{name} must be {what}{hint}, got {v}")
    return v


def check_real(name: str, value: Any, lo: float | None = None, hi: float | None = None, *,
               lo_open: bool = False, hint: str = "") -> float:
    """``value`` as a finite Python float in [lo, hi] (``lo_open``: (lo, hi]); else TypeError/ValueError."""
    what = f"a finite number {_range_text(lo, hi, lo_open)}"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {what}{hint}, got {type(value).__name__} {value!r}")
    v = float(value)
    if (not math.isfinite(v) or (lo is not None and (v <= lo if lo_open else v < lo))
            or (hi is not None and v > hi)):
        raise ValueError(f"{name} must be {what}{hint}, got {v!r}")
    return v


def check_bool(name: str, value: Any) -> bool:
    """``value`` as a bool (True/False or numpy bool only: "no", 0 and 1 are not flags)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return bool(value)


def check_str(name: str, value: Any, *, nonempty: bool = True) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, got {type(value).__name__} {value!r}")
    if nonempty and not value:
        raise ValueError(f"{name} must be a non-empty string")
    return value


def check_int_list(name: str, value: Any, lo: int | None = 0, hi: int | None = None) -> list[int]:
    """A list/tuple/range/1-D array of integers (each in [lo, hi)) as a list of Python ints.

    A scalar, a string or a dict is a TypeError: ``stop_token_ids=5`` must be written ``[5]``.
    """
    if isinstance(value, np.ndarray):
        if value.ndim != 1:
            raise TypeError(f"{name} must be a 1-D sequence of integers, got an array of shape {value.shape}")
        value = value.tolist()
    if isinstance(value, (str, bytes, dict)) or not isinstance(value, (list, tuple, range)):
        raise TypeError(f"{name} must be a list of integers, got {type(value).__name__} {value!r:.80}")
    out = []
    for i, t in enumerate(value):
        if not is_int(t):
            raise TypeError(f"{name}[{i}] must be an integer, got {type(t).__name__} {t!r:.80}")
        t = int(t)
        if (lo is not None and t < lo) or (hi is not None and t >= hi):
            rng = f"in [{lo}, {hi})" if hi is not None else f">= {lo}"
            raise ValueError(f"{name}[{i}] must be {rng}, got {t}")
        out.append(t)
    return out
