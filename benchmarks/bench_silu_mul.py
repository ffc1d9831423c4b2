"""silu·mul of a fused gate/up output (kernels.silu_mul) against the two ATen ops it replaces.

CUDA: the released dense MLP widths in bf16 — the code predictor / Code2Wav (I = 3072) at 1 and 16 rows, the
talker's shared expert (I = 768) at 1 row and an 80-token prefill. Implementations: ``triton`` (one launch) and
``torch`` (F.silu, then the multiply). extra_info: GB/s of the bytes the op must move (2I in, I out per row)
against the HBM floor (3.35 TB/s on an H100) — at these sizes both are launch-bound; the win is the launch.

CPU: Triton only runs in the interpreter (not a timing), so small shapes time the reference path.

    pytest benchmarks/bench_silu_mul.py --benchmark-only
    pytest benchmarks/bench_silu_mul.py --benchmark-disable      # smoke run
"""
from __future__ import annotations

import pytest
import torch

from _kernel_bench import CUDA, report_bandwidth, synced
from omni_rt.kernels.silu_mul import silu_mul, silu_mul_ref

SHAPES = {"cp_decode": (1, 3072), "cp_b16": (16, 3072), "shared_decode": (1, 768), "shared_prefill80": (80, 768)} \
    if CUDA else {"tiny_96": (3, 96)}
IMPLS = ["triton", "torch"] if CUDA else ["ref"]


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("impl", IMPLS)
def test_bench_silu_mul(benchmark, impl, name):
    device = "cuda" if CUDA else "cpu"
    dtype = torch.bfloat16 if CUDA else torch.float32
    rows, inter = SHAPES[name]
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(rows, 2 * inter, device=device, generator=g).to(dtype)
    fn = (lambda: silu_mul(x)) if impl == "triton" else (lambda: silu_mul_ref(x))
    out, want = fn(), silu_mul_ref(x)
    assert (out.float() - want.float()).abs().max().item() <= 2e-2 * max(want.float().abs().max().item(), 1.0)
    benchmark.group = f"silu_mul-{name}"
    benchmark(synced(fn))
    report_bandwidth(benchmark, 3 * rows * inter * x.element_size())
