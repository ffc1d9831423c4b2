"""Fused residual-add + RMSNorm (kernels.rms_norm) against the unfused torch ops it replaces.

CUDA: the released widths in bf16 — decode (1 token) and a 75-token prefill at the thinker's hidden 2048, and
the per-head q norm (32 heads x 128), and Code2Wav's layer-scaled residual (4 positions x 1024). Implementations: ``triton`` (one launch) and ``torch`` (x + residual,
then the reference's seven ATen ops). extra_info: GB/s of the bytes the op must move (x, residual in, sum out,
y out, weight) against the HBM floor (3.35 TB/s on an H100).

CPU: Triton only runs in the interpreter (not a timing), so small shapes time the reference path.

    pytest benchmarks/bench_rms_norm.py --benchmark-only
    pytest benchmarks/bench_rms_norm.py --benchmark-disable      # smoke run
"""
from __future__ import annotations

import pytest
import torch

from _kernel_bench import report_bandwidth, synced
from omni_rt.kernels.rms_norm import rms_norm, rms_norm_ref

CUDA = torch.cuda.is_available()
SHAPES = {"decode_2048": (1, 2048), "prefill75_2048": (75, 2048), "qnorm_32x128": (8, 32, 128),
          "code2wav_scaled_1024": (4, 1024)} if CUDA else \
    {"tiny_48": (3, 48), "heads_4x16": (3, 4, 16), "scaled_48": (3, 48)}
IMPLS = ["triton", "torch"] if CUDA else ["ref"]


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("impl", IMPLS)
def test_bench_rms_norm(benchmark, impl, name):
    device = "cuda" if CUDA else "cpu"
    dtype = torch.bfloat16 if CUDA else torch.float32
    shape = SHAPES[name]
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(shape, device=device, generator=g).to(dtype)
    res = torch.randn(shape, device=device, generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], device=device, generator=g)).to(dtype)
    with_res = len(shape) == 2   # hidden-width norms carry the residual; per-head q/k norms do not
    r = res if with_res else None
    # Code2Wav's layer-scaled residual (residual + scale·x), one frame of 4 positions
    sc = (0.01 + torch.rand(shape[-1], device=device, generator=g)).to(dtype) if "scaled" in name else None
    fn = (lambda: rms_norm(x, w, 1e-6, r, sc)) if impl == "triton" else (lambda: rms_norm_ref(x, w, 1e-6, r, sc))
    out, want = fn(), rms_norm_ref(x, w, 1e-6, r, sc)
    y, y_ref = (out[0], want[0]) if with_res else (out, want)
    assert (y.float() - y_ref.float()).abs().max().item() <= 3e-2 * max(y_ref.float().abs().max().item(), 1.0)
    benchmark.group = f"rms_norm-{name}"
    benchmark(synced(fn))
    e = x.element_size()
    nbytes = (x.numel() * (4 if with_res else 2) + w.numel() * (2 if sc is not None else 1)) * e
    report_bandwidth(benchmark, nbytes)
