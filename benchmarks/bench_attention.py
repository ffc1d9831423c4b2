"""Paged decode attention benchmarks.

CUDA: released shapes in bf16, head_dim 128, block_size 16, shuffled pages — thinker (32 q / 4 kv heads) and
talker (16 / 2) at several batch sizes and context lengths. ``impl="paged"`` times ``paged_decode_attention``;
``impl="sdpa"`` is the baseline: ``torch.nn.functional.scaled_dot_product_attention`` (enable_gqa) on the same
K/V already gathered into dense (batch, kv_heads, ctx, head_dim) tensors, i.e. without paying for the gather.
extra_info reports GB/s of K/V read (2 * batch * ctx * kv_heads * head_dim * itemsize / time); the paged case
also times the SDPA baseline in the same run (``sdpa_us``, ``speedup_vs_sdpa``). H100 HBM peak: 3.35 TB/s.

CPU: Triton only runs under the interpreter (seconds per call, meaningless as a timing), so tiny shapes
compare the public op's CPU path (the gather-per-sequence reference) against SDPA on pre-gathered K/V.
"""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from _kernel_bench import median_us, timed
from omni_rt.kernels.paged_attention import paged_decode_attention

CUDA = torch.cuda.is_available()
# name: (heads, kv_heads, head_dim, batch, ctx)
GPU_CASES = {
    "thinker_b1_ctx4096": (32, 4, 128, 1, 4096),
    "thinker_b8_ctx2048": (32, 4, 128, 8, 2048),
    "thinker_b32_ctx1024": (32, 4, 128, 32, 1024),
    "thinker_b64_ctx4096": (32, 4, 128, 64, 4096),
    "talker_b8_ctx2048": (16, 2, 128, 8, 2048),
}
CPU_CASES = {"tiny_b4_ctx37": (4, 2, 16, 4, 37)}
CASES = GPU_CASES if CUDA else CPU_CASES
BLOCK_SIZE = 16
REPS = 20  # launches per timed call on the GPU, so the host sync is amortised


def _setup(heads, kv_heads, head_dim, batch, ctx, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(0)
    blocks = -(-ctx // BLOCK_SIZE)
    num_blocks = batch * blocks
    k_cache = torch.randn(num_blocks, BLOCK_SIZE, kv_heads, head_dim, generator=g).to(device, dtype)
    v_cache = torch.randn(num_blocks, BLOCK_SIZE, kv_heads, head_dim, generator=g).to(device, dtype)
    block_tables = torch.randperm(num_blocks, generator=g).view(batch, blocks).to(device, torch.int32)
    context_lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
    q = torch.randn(batch, heads, head_dim, generator=g).to(device, dtype)
    # Dense copies for the baseline: (batch, kv_heads, ctx, head_dim).
    k_dense = k_cache[block_tables.long()].reshape(batch, -1, kv_heads, head_dim)[:, :ctx].transpose(1, 2).contiguous()
    v_dense = v_cache[block_tables.long()].reshape(batch, -1, kv_heads, head_dim)[:, :ctx].transpose(1, 2).contiguous()
    return (q, k_cache, v_cache, block_tables, context_lens), (q, k_dense, v_dense)


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q.unsqueeze(2), k, v, enable_gqa=True).squeeze(2)


@pytest.mark.benchmark(group="paged_decode_attention")
@pytest.mark.parametrize("impl", ["paged", "sdpa"])
@pytest.mark.parametrize("case", list(CASES))
def test_decode_attention(benchmark, case, impl):
    heads, kv_heads, head_dim, batch, ctx = CASES[case]
    device, dtype = ("cuda", torch.bfloat16) if CUDA else ("cpu", torch.float32)
    paged_args, dense_args = _setup(heads, kv_heads, head_dim, batch, ctx, device, dtype)
    paged = lambda: paged_decode_attention(*paged_args)  # noqa: E731
    dense = lambda: _sdpa(*dense_args)  # noqa: E731
    # Same answer from both paths before timing anything.
    torch.testing.assert_close(paged().float(), dense().float(), atol=2e-2, rtol=2e-2)

    reps = REPS if CUDA else 1
    fn = paged if impl == "paged" else dense
    kv_bytes = 2 * batch * ctx * kv_heads * head_dim * dtype.itemsize
    us = median_us(fn, reps, rounds=30 if CUDA else 3)
    benchmark.extra_info.update({"case": case, "impl": impl, "kv_MB": kv_bytes / 1e6, "median_us": us,
                                 "GB_per_s": kv_bytes / (us * 1e-6) / 1e9})
    if impl == "paged":
        sdpa_us = median_us(dense, reps, rounds=30 if CUDA else 3)
        benchmark.extra_info.update({"sdpa_us": sdpa_us, "speedup_vs_sdpa": sdpa_us / us})
    benchmark.pedantic(timed(fn, reps), rounds=20 if CUDA else 1, warmup_rounds=1 if CUDA else 0)
