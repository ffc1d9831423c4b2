"""The sampler's draw (kernels.sorted_sample): one Triton launch over the top-256 candidates (and over the whole
sorted thinker vocabulary, the exact path for top_k 0) against the PyTorch reference, batch 1 and 8 on CUDA.
extra_info: GB/s of the candidates read (fp32 score + int64 id, two passes), against the HBM floor (3.35 TB/s on
an H100) — at batch 1 the launch, not the bytes, is the cost. CPU: the interpreter is no timing; the reference
runs.

    pytest benchmarks/bench_sorted_sample.py --benchmark-only
    pytest benchmarks/bench_sorted_sample.py --benchmark-disable      # smoke run
"""
from __future__ import annotations

import pytest
import torch

from omni_rt.kernels.sorted_sample import sorted_sample, sorted_sample_ref

CUDA = torch.cuda.is_available()
CASES = ({"b1_c256": (1, 256), "b8_c256": (8, 256), "b1_full151936": (1, 151936)} if CUDA
         else {"b2_c256": (2, 256)})
IMPLS = ["triton", "torch"] if CUDA else ["ref"]


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("impl", IMPLS)
def test_bench_sorted_sample(benchmark, impl, name):
    device = "cuda" if CUDA else "cpu"
    b, n = CASES[name]
    g = torch.Generator(device=device).manual_seed(0)
    scores = torch.randn(b, max(n, 151936 if CUDA else 2048), device=device, generator=g) * 4
    vals, idx = scores.topk(n, dim=-1)
    temp = torch.full((b,), 0.8, device=device)
    top_k = torch.full((b,), 50 if n <= 256 else 0, dtype=torch.int64, device=device)
    top_p = torch.full((b,), 0.9, device=device)
    seeds = torch.arange(b, device=device, dtype=torch.int64) + 2 ** 40
    steps = torch.arange(b, device=device, dtype=torch.int64)
    op = sorted_sample if impl == "triton" else sorted_sample_ref

    def run():
        out = op(vals, idx, scores, temp, top_k, top_p, seeds, steps)
        if CUDA:
            torch.cuda.synchronize()
        return out

    assert torch.equal(run(), sorted_sample_ref(vals, idx, scores, temp, top_k, top_p, seeds, steps))
    benchmark.group = f"sorted_sample-{name}"
    benchmark(run)
    nbytes = 2 * b * n * (4 + 8)
    benchmark.extra_info.update({"device": torch.cuda.get_device_name() if CUDA else "cpu", "bytes": nbytes,
                                 "floor_us_h100": nbytes / 3.35e12 * 1e6})
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        benchmark.extra_info.update({"GB_per_s": nbytes / stats.stats.median / 1e9})
