"""The sampler's counter-based noise (kernels.counter_uniform): one Triton launch vs the reference's ~17 ATen
ops, at the thinker's vocabulary (151,936) for batch 1 and 8 on CUDA. extra_info: GB/s of the float64 noise
written, against the HBM floor (3.35 TB/s on an H100). CPU: the interpreter is no timing; the reference runs.

    pytest benchmarks/bench_counter_uniform.py --benchmark-only
    pytest benchmarks/bench_counter_uniform.py --benchmark-disable      # smoke run
"""
from __future__ import annotations

import pytest
import torch

from _kernel_bench import report_bandwidth, synced
from omni_rt.kernels.counter_uniform import counter_uniform, counter_uniform_ref

CUDA = torch.cuda.is_available()
CASES = {"b1_v151936": (1, 151936), "b8_v151936": (8, 151936)} if CUDA else {"b2_v2048": (2, 2048)}
IMPLS = ["triton", "torch"] if CUDA else ["ref"]


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("impl", IMPLS)
def test_bench_counter_uniform(benchmark, impl, name):
    device = "cuda" if CUDA else "cpu"
    b, n = CASES[name]
    seeds = torch.arange(b, device=device, dtype=torch.int64) * 7919 + 2 ** 40
    steps = torch.arange(b, device=device, dtype=torch.int64)
    op = counter_uniform if impl == "triton" else counter_uniform_ref

    run = synced(lambda: op(seeds, steps, n))

    assert torch.equal(run(), counter_uniform_ref(seeds, steps, n))
    benchmark.group = f"counter_uniform-{name}"
    benchmark(run)
    nbytes = b * n * 8
    report_bandwidth(benchmark, nbytes)
