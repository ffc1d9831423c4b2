"""What the encoder benchmarks share: one of our towers and transformers' same tower with the same random weights,
timed the same way in the same run, and the same-run ratio in ``extra_info``.

CPU: the named small configs in fp32 (ratios, not GPU-relevant times); CUDA: the released tower in bf16 with every
other stack at one layer (``random_state_dict`` draws the whole model).
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
from torch import nn

from omni_rt.loader import assign_parameters
from omni_rt.testing import full_config, random_state_dict, resolve_config

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
CONFIGS = ["full"] if CUDA else ["tiny", "small"]


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def tower_config(name: str, tower: str) -> dict:
    """The named config; for "full", the released ``thinker_config[tower]`` with every other stack at 1 layer."""
    if name != "full":
        return resolve_config(name)
    cfg = full_config(layers=1)
    cfg["thinker_config"][tower] = full_config()["thinker_config"][tower]
    return cfg


def paired_towers(cfg_dict: dict, prefix: str, ours: nn.Module, build_ref: Callable[[], nn.Module]):
    """(ours, transformers' tower or None) on DEVICE in DTYPE, both holding the checkpoint tensors under
    ``prefix`` of ``random_state_dict(cfg_dict, seed=0)``. ``ours`` comes built on meta; ``build_ref()`` builds
    the reference (on DEVICE: a released tower's random init is slow on the host) and may raise ImportError
    when transformers lacks it (then None)."""
    weights = {n: t for n, t in random_state_dict(cfg_dict, seed=0, dtype=DTYPE, device=DEVICE)
               if n.startswith(prefix)}
    assign_parameters(ours, weights.items(), prefix=prefix)
    try:
        with torch.device(DEVICE):
            ref = build_ref()
    except ImportError:
        return ours.eval(), None
    ref = ref.to(dtype=DTYPE).eval()
    ref.load_state_dict({n[len(prefix):]: t for n, t in weights.items()}, strict=True)
    return ours.eval(), ref


def median_s(fn: Callable, reps: int, warmup: bool = False) -> float:
    """Median wall time of ``reps`` calls (after one untimed call when ``warmup``)."""
    if warmup:
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


#: fp32 (CPU) parity of a tower with transformers' (tests/_tolerances.py PARITY); bf16 runs only record it.
MAX_REL_FP32 = 1e-4


def record_same_run(info: dict, out: torch.Tensor, run_ours: Callable, run_ref: Callable | None,
                    reps: int) -> None:
    """``max_rel_diff_vs_ref`` (in fp32 asserted ≤ MAX_REL_FP32: a ratio of two different answers means
    nothing), ``ref_s`` / ``ours_s`` medians of ``reps`` calls, ``speedup`` = ref_s / ours_s."""
    if run_ref is not None:
        expected = run_ref()
        rel = ((out.float() - expected.float()).abs().max() / expected.float().abs().max()).item()
        info["max_rel_diff_vs_ref"] = rel
        if out.dtype == torch.float32:
            assert rel <= MAX_REL_FP32, f"ours differs from transformers by {rel:.3g} (relative)"
        info["ref_s"] = median_s(run_ref, reps)
    info["ours_s"] = median_s(run_ours, reps)
    if run_ref is not None:
        info["speedup"] = info["ref_s"] / info["ours_s"]
