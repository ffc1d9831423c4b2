"""The sampler's score processing (kernels.logits_process): repetition penalty + suppressed ids + fp32 in one
launch vs the reference's ATen ops, at the thinker's vocabulary (151,936), batch 1 and 8, on CUDA. extra_info:
GB/s of logits + seen mask read and fp32 scores written, against the HBM floor (3.35 TB/s on an H100). CPU: the
interpreter is no timing; the reference runs.

    pytest benchmarks/bench_logits_process.py --benchmark-only
    pytest benchmarks/bench_logits_process.py --benchmark-disable      # smoke run
"""
from __future__ import annotations

import pytest
import torch

from omni_rt.kernels.logits_process import logits_process, logits_process_ref

CUDA = torch.cuda.is_available()
CASES = {"b1_v151936": (1, 151936), "b8_v151936": (8, 151936)} if CUDA else {"b2_v2048": (2, 2048)}
IMPLS = ["triton", "torch"] if CUDA else ["ref"]


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("impl", IMPLS)
def test_bench_logits_process(benchmark, impl, name):
    device = "cuda" if CUDA else "cpu"
    b, n = CASES[name]
    dtype = torch.bfloat16 if CUDA else torch.float32
    logits = torch.randn(b, n, device=device).to(dtype)
    seen = torch.rand(b, n, device=device) < 0.01
    penalty = torch.full((b,), 1.05, device=device)
    suppress = torch.rand(n, device=device) < 0.001
    op = logits_process if impl == "triton" else logits_process_ref

    def run():
        out = op(logits, seen, penalty, suppress)
        if CUDA:
            torch.cuda.synchronize()
        return out

    assert torch.equal(run(), logits_process_ref(logits, seen, penalty, suppress))
    benchmark.group = f"logits_process-{name}"
    benchmark(run)
    nbytes = b * n * (logits.element_size() + 1 + 4) + n
    benchmark.extra_info.update({"device": torch.cuda.get_device_name() if CUDA else "cpu", "bytes": nbytes,
                                 "floor_us_h100": nbytes / 3.35e12 * 1e6})
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        benchmark.extra_info.update({"GB_per_s": nbytes / stats.stats.median / 1e9})
