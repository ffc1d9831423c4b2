"""Fused q/k RMSNorm + rotary + paged K/V write (kernels.qk_norm_rope) against the unfused ops it replaces.

CUDA: the thinker's attention front (32 q / 4 kv heads x 128, bf16) at decode (1 token) and a 75-token prefill.
Implementations: ``triton`` (one launch) and ``torch`` (two RMSNorms, ten rotary ops, the K/V scatter).
extra_info: GB/s of the bytes the op must move (q, k, v in; q', k' out; the K/V rows written; cos/sin) against
the HBM floor (3.35 TB/s on an H100). CPU: the interpreter is no timing, so small shapes time the reference.

    pytest benchmarks/bench_qk_norm_rope.py --benchmark-only
    pytest benchmarks/bench_qk_norm_rope.py --benchmark-disable      # smoke run
"""
from __future__ import annotations

import pytest
import torch

from _kernel_bench import report_bandwidth, synced
from omni_rt.kernels.qk_norm_rope import qk_norm_rope, qk_norm_rope_ref

CUDA = torch.cuda.is_available()
SHAPES = {"decode_32q4kv": (1, 32, 4, 128), "prefill75_32q4kv": (75, 32, 4, 128)} if CUDA else \
    {"tiny_4q2kv": (3, 4, 2, 16)}
IMPLS = ["triton", "torch"] if CUDA else ["ref"]


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("impl", IMPLS)
def test_bench_qk_norm_rope(benchmark, impl, name):
    device = "cuda" if CUDA else "cpu"
    dtype = torch.bfloat16 if CUDA else torch.float32
    t, h, kvh, d = SHAPES[name]
    g = torch.Generator(device=device).manual_seed(0)
    qkv = torch.randn(t, (h + 2 * kvh) * d, device=device, generator=g).to(dtype)
    q = qkv[:, :h * d].view(t, h, d)
    k = qkv[:, h * d:(h + kvh) * d].view(t, kvh, d)
    v = qkv[:, (h + kvh) * d:].view(t, kvh, d)
    ang = torch.rand(t, d // 2, device=device, generator=g) * 6
    cos = torch.cat([ang.cos(), ang.cos()], -1).to(dtype)
    sin = torch.cat([ang.sin(), ang.sin()], -1).to(dtype)
    w = torch.ones(d, device=device, dtype=dtype)
    blocks = t // 16 + 2
    cache = (torch.zeros(blocks, 16, kvh, d, device=device, dtype=dtype),
             torch.zeros(blocks, 16, kvh, d, device=device, dtype=dtype))
    slots = torch.arange(t, device=device)
    op = qk_norm_rope if impl == "triton" else qk_norm_rope_ref
    fn = lambda: op(q, k, v, w, w, 1e-6, cos, sin, cache, slots)  # noqa: E731
    qo, _ = fn()
    q_ref, _ = qk_norm_rope_ref(q, k, v, w, w, 1e-6, cos, sin, cache, slots)
    assert (qo.float() - q_ref.float()).abs().max().item() <= 3e-2 * max(q_ref.float().abs().max().item(), 1.0)
    benchmark.group = f"qk_norm_rope-{name}"
    benchmark(synced(fn))
    e = q.element_size()
    nbytes = (2 * t * (h + kvh) * d + 2 * t * kvh * d + 2 * t * kvh * d + 2 * t * d) * e
    report_bandwidth(benchmark, nbytes)
