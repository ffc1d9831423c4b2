"""Fused MoE benchmarks.

CUDA: released shapes (thinker E=128 H=2048 I=768 top-8; talker E=128 H=1024 I=384 top-6 + shared 768, run as
the model runs it: 2 more experts gated by route(num_shared=2)),
bf16, M in {1, 4, 16, 64, 256, 4096}; the Triton path vs the loop-over-experts reference and vs
``torch._grouped_mm`` when present. extra_info reports GB/s of expert weights touched and TFLOP/s.
Weights are random, so routing is near uniform: the worst case for expert reuse. H100 bf16 floor at M=1:
75.5 MB / 3.35 TB/s = 22.5 us per thinker layer.

``test_bench_moe_align`` times the prefill alignment (one ``_moe_align_kernel`` launch vs the sort-based torch
reference it replaced) at the thinker's routing (E=128, top-8) for prefill-sized M; extra_info reports GB/s of
the index tensors written.

CPU: the Triton path only runs under the interpreter (seconds per call, meaningless as a timing), so small
shapes compare the torch loop reference against a vectorised torch baseline (gathered per-token expert
weights + einsum), as extra_info says.
"""
from __future__ import annotations

import pytest
import torch

from omni_rt.kernels import fused_moe as fm

CUDA = torch.cuda.is_available()
SHAPES = {"thinker": (128, 2048, 768, 8, 0), "talker": (128, 1024, 384, 6, 768)}
CPU_SHAPE = (8, 64, 32, 2, 0)


def _setup(layer, m, device, dtype):
    e, hidden, inter, top_k, shared = SHAPES[layer] if device == "cuda" else CPU_SHAPE
    # the talker's shared expert runs as shared/inter more experts, gated through route(num_shared=...)
    parts = shared // inter
    g = torch.Generator(device=device).manual_seed(0)
    gate_up = torch.randn(e + parts, 2 * inter, hidden, device=device, dtype=dtype, generator=g) * 0.02
    down = torch.randn(e + parts, hidden, inter, device=device, dtype=dtype, generator=g) * 0.02
    x = torch.randn(m, hidden, device=device, dtype=dtype, generator=g)
    logits = torch.randn(m, e + (1 if parts else 0), device=device, dtype=dtype, generator=g)
    weights, ids = fm.route(logits, top_k, True, num_shared=parts)
    return (x, gate_up, down, weights, ids), (e + parts, hidden, inter, top_k + parts, shared)


def _metrics(ids, dims, itemsize, seconds):
    e, hidden, inter, top_k, _ = dims
    touched = int(torch.unique(ids).numel())
    weight_bytes = touched * 3 * inter * hidden * itemsize
    flops = 2 * ids.numel() * 3 * inter * hidden
    return {"experts_touched": touched, "weight_MB": weight_bytes / 1e6,
            "GB_per_s": weight_bytes / seconds / 1e9, "TFLOP_per_s": flops / seconds / 1e12}


def _grouped_mm_moe(x, gate_up, down, weights, ids):
    """Baseline: sort assignments by expert, torch._grouped_mm for both GEMMs, scatter back."""
    m, top_k = ids.shape
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(gate_up.shape[0], dtype=torch.int32, device=x.device)
    counts.scatter_add_(0, flat.to(torch.int64), torch.ones_like(flat, dtype=torch.int32))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    xs = x[order // top_k]
    gu = torch._grouped_mm(xs, gate_up.transpose(-2, -1), offs=offs)
    g, u = gu.chunk(2, dim=-1)
    y = torch._grouped_mm(torch.nn.functional.silu(g) * u, down.transpose(-2, -1), offs=offs)
    y = y * weights.reshape(-1)[order, None]
    out = torch.zeros(m * top_k, x.shape[1], device=x.device, dtype=x.dtype)
    out[order] = y
    return out.view(m, top_k, -1).sum(1)


def _einsum_moe(x, gate_up, down, weights, ids):
    """Vectorised torch baseline (gpt-fast style): gather each token's expert weights, batched einsum."""
    inter = down.shape[2]
    w1 = gate_up[ids]                                            # (M, k, 2I, H)
    gu = torch.einsum("mh,mkih->mki", x, w1)
    h = torch.nn.functional.silu(gu[..., :inter]) * gu[..., inter:]
    y = torch.einsum("mki,mkhi->mkh", h, down[ids])
    return torch.einsum("mkh,mk->mh", y, weights.to(y.dtype))


def _sync_call(fn, *args):
    def run():
        out = fn(*args)
        if CUDA:
            torch.cuda.synchronize()
        return out
    return run


M_CUDA = [1, 4, 16, 64, 256, 4096]
M_CPU = [1, 16]


@pytest.mark.parametrize("layer", ["thinker", "talker"] if CUDA else ["thinker"])
@pytest.mark.parametrize("m", M_CUDA if CUDA else M_CPU)
@pytest.mark.parametrize("impl", ["fused", "loop_ref", "grouped_mm"] if CUDA else ["loop_ref", "einsum"])
def test_bench_fused_moe(benchmark, layer, m, impl):
    device = "cuda" if CUDA else "cpu"
    dtype = torch.bfloat16 if CUDA else torch.float32
    args, dims = _setup(layer, m, device, dtype)
    if impl == "grouped_mm" and not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm not available")
    fn = {"fused": fm.fused_moe, "loop_ref": fm.fused_moe_ref, "grouped_mm": _grouped_mm_moe,
          "einsum": _einsum_moe}[impl]
    ref = fm.fused_moe_ref(*args)
    out = fn(*args)
    atol = 5e-2 if CUDA else 1e-4
    assert torch.allclose(out.float(), ref.float(), atol=atol, rtol=5e-2), f"{impl} disagrees with reference"
    benchmark.group = f"fused_moe-{layer}-M{m}"
    result = benchmark(_sync_call(fn, *args))
    assert result.shape == args[0].shape
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        benchmark.extra_info.update(_metrics(args[4], dims, args[0].element_size(), stats.stats.median))
    benchmark.extra_info["device"] = torch.cuda.get_device_name() if CUDA else "cpu"
    if not CUDA:
        benchmark.extra_info["note"] = ("CPU: Triton path not timed (interpreter); torch loop reference vs "
                                        "vectorised einsum baseline at small shapes")
    if CUDA and m == 1:
        # expert weights one decode token reads (thinker 8 x 3 x 768 x 2048, talker (6 + 2) x 3 x 384 x 1024, bf16)
        benchmark.extra_info["floor_us_h100_bf16"] = {"thinker": 22.5, "talker": 5.6}[layer]


M_ALIGN_CUDA = [75, 512, 4096]
M_ALIGN_CPU = [75]


@pytest.mark.parametrize("m", M_ALIGN_CUDA if CUDA else M_ALIGN_CPU)
@pytest.mark.parametrize("impl", ["triton", "torch_ref"] if CUDA else ["torch_ref"])
def test_bench_moe_align(benchmark, m, impl):
    device = "cuda" if CUDA else "cpu"
    e, top_k, block_m = 128, 8, 16
    g = torch.Generator(device=device).manual_seed(0)
    _, ids = torch.topk(torch.rand(m, e, device=device, generator=g), top_k, dim=-1)
    fn = {"triton": fm.moe_align, "torch_ref": fm.moe_align_ref}[impl]
    want = fm.moe_align_ref(ids, e, block_m)
    got = fn(ids, e, block_m)
    assert all(torch.equal(a, b) for a, b in zip(got, want)), f"{impl} disagrees with the reference"
    benchmark.group = f"moe_align-M{m}"
    benchmark(_sync_call(fn, ids, e, block_m))
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        written = sum(t.numel() * t.element_size() for t in got) + ids.numel() * ids.element_size()
        benchmark.extra_info["GB_per_s"] = written / stats.stats.median / 1e9
    benchmark.extra_info["device"] = torch.cuda.get_device_name() if CUDA else "cpu"
