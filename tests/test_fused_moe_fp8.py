"""kernels/fused_moe_fp8.py under the interpreter: FP8 expert stacks (gate/up parts on their own 128-row grids,
intermediate sizes that are not multiples of 128) against the dequantize-then-fused_moe reference; odd sizes,
a single token, experts that receive no token, strided activations, empty batch; launcher validation."""
from __future__ import annotations

import pytest
import torch

from omni_rt.kernels import force_triton, graph_safe
from omni_rt.kernels import fused_moe as fm
from omni_rt.kernels import fused_moe_fp8 as f8
from omni_rt.quant import dequantize_blockwise, quantize_blockwise, quantize_parts

from _tolerances import assert_close

SMALL = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 1, "num_warps": 4, "num_stages": 2}


def _experts(e, hidden, inter, device, scale=1.0):
    gu = torch.randn(e, 2 * inter, hidden, device=device) * scale / hidden ** 0.5
    dn = torch.randn(e, hidden, inter, device=device) * scale / inter ** 0.5
    q1, s1 = quantize_parts(gu, (inter, inter))
    q2, s2 = quantize_blockwise(dn)
    return q1, q2, s1, s2


def _routing(m, e, top_k, dtype, device, skip=()):
    logits = torch.randn(m, e, device=device)
    for s in skip:
        logits[:, s] = -1e4
    return fm.route(logits.to(dtype), top_k, True)


@pytest.mark.parametrize("m,e,top_k,hidden,inter", [
    (1, 6, 2, 200, 136),     # decode; both GEMMs cross a partial 128-block; gate/up parts 2 scale rows each
    (7, 5, 3, 130, 40),      # odd everything
    (33, 4, 4, 64, 24),      # top-k = E, several row blocks per expert
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_moe_fp8_matches_reference(m, e, top_k, hidden, inter, dtype, device):
    q1, q2, s1, s2 = _experts(e, hidden, inter, device)
    x = torch.randn(m, hidden, device=device).to(dtype)
    w, ids = _routing(m, e, top_k, dtype, device)
    with force_triton():
        out = f8.fused_moe_fp8(x, q1, q2, s1, s2, w, ids, config=SMALL)
    ref = f8.fused_moe_fp8_ref(x, q1, q2, s1, s2, w, ids)
    assert out.dtype == dtype
    assert_close(out, ref, name=f"fused_moe_fp8 m={m} {dtype}")


def test_reference_is_fused_moe_on_dequantized_parts(device):
    e, hidden, inter = 3, 150, 136
    q1, q2, s1, s2 = _experts(e, hidden, inter, device)
    gu, dn = f8.dequantize_experts(q1, q2, s1, s2, torch.float32)
    half = s1.shape[1] // 2
    for i in range(e):
        assert torch.equal(gu[i, :inter], dequantize_blockwise(q1[i, :inter], s1[i, :half], torch.float32))
        assert torch.equal(gu[i, inter:], dequantize_blockwise(q1[i, inter:], s1[i, half:], torch.float32))
        assert torch.equal(dn[i], dequantize_blockwise(q2[i], s2[i], torch.float32))
    x = torch.randn(4, hidden, device=device)
    w, ids = _routing(4, e, 2, torch.float32, device)
    ref = f8.fused_moe_fp8_ref(x, q1, q2, s1, s2, w, ids)
    assert torch.equal(ref, fm.fused_moe_ref(x, gu, dn, w, ids))
    with graph_safe():
        assert_close(f8.fused_moe_fp8_ref(x, q1, q2, s1, s2, w, ids), ref, name="static path")


def test_sliced_input_empty_experts_and_empty_batch(device):
    e, hidden, inter = 8, 72, 40
    q1, q2, s1, s2 = _experts(e, hidden, inter, device)
    x = torch.randn(12, hidden + 30, device=device)[2:11, 5:5 + hidden]
    w, ids = _routing(9, e, 2, torch.float32, device, skip=(0, 3, 7))
    with force_triton():
        out = f8.fused_moe_fp8(x, q1, q2, s1, s2, w, ids, config=SMALL)
        empty = f8.fused_moe_fp8(x[:0], q1, q2, s1, s2, w[:0], ids[:0], config=SMALL)
        default = f8.fused_moe_fp8(x, q1, q2, s1, s2, w, ids)       # table config, BLOCK_K fitted to 128
    ref = f8.fused_moe_fp8_ref(x, q1, q2, s1, s2, w, ids)
    assert_close(out, ref, name="sliced")
    assert_close(default, ref, name="table config")
    assert empty.shape == (0, hidden)


@pytest.mark.parametrize("m,e,top_k,hidden,inter", [
    (7, 5, 3, 130, 40),      # odd everything; partial 128-column groups on both GEMMs
    (33, 4, 4, 200, 136),    # several row blocks per expert; gate/up parts 2 scale rows each
    (9, 8, 2, 72, 40),       # experts 0, 3, 7 receive no token (below)
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])   # (the interpreter truncates bf16 casts)
def test_w8a8_matches_reference(m, e, top_k, hidden, inter, dtype, device):
    """act_fp8 (prefill w8a8): x and h quantized per (row, 128 columns), FP8 x FP8 dots scaled per K tile, against
    the fp32 reference on the dequantized operands; decode-sized calls stay weight-only."""
    q1, q2, s1, s2 = _experts(e, hidden, inter, device)
    x = (torch.randn(m + 3, hidden + 5, device=device) * 2)[1:m + 1, 2:2 + hidden].to(dtype)   # strided rows
    w, ids = _routing(m, e, top_k, dtype, device, skip=(0, 3, 7) if e == 8 else ())
    with force_triton():
        out = f8.fused_moe_fp8(x, q1, q2, s1, s2, w, ids, config=SMALL, act_fp8=True)
    ref = f8.fused_moe_fp8_ref(x, q1, q2, s1, s2, w, ids, act_fp8=True)
    assert out.dtype == dtype
    # fp32: the products of e4m3 codes are exact, only the summation order differs; fp16: one rounding of the
    # gate/up outputs may land an ulp apart, and re-quantizing h then moves that code by one e4m3 step
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    assert_close(out.float(), ref.float(), name=f"w8a8 m={m} {dtype}", **tol)
    weight_only = f8.fused_moe_fp8_ref(x, q1, q2, s1, s2, w, ids)
    assert not torch.equal(ref, weight_only), "the w8a8 reference must quantize the activations"
    # e4m3 keeps 3 mantissa bits (<= 6.25 % per activation): the outputs stay close in norm
    rel = (ref.float() - weight_only.float()).norm() / weight_only.float().norm()
    assert rel < 0.1, f"w8a8 vs weight-only: relative error {rel:.3f}"
    # decode-sized (M·top_k < E): weight-only whatever act_fp8 says
    x1, w1, ids1 = x[:1], w[:1], ids[:1]
    if top_k < e:
        assert torch.equal(f8.fused_moe_fp8_ref(x1, q1, q2, s1, s2, w1, ids1, act_fp8=True),
                           f8.fused_moe_fp8_ref(x1, q1, q2, s1, s2, w1, ids1))


def test_w8a8_needs_fp8_weights():
    x = torch.randn(8, 32)
    gu, dn = torch.randn(2, 16, 32), torch.randn(2, 32, 8)
    w, ids = _routing(8, 2, 1, torch.float32, "cpu")
    with pytest.raises(ValueError, match="act_fp8 needs block-FP8"), force_triton():
        fm.run_experts(x, gu, dn, w, ids, SMALL, act_fp8=True)


def test_launcher_validation():
    q1, q2, s1, s2 = _experts(4, 64, 32, "cpu")
    x = torch.randn(3, 64)
    w, ids = _routing(3, 4, 2, torch.float32, "cpu")
    with pytest.raises(ValueError, match="gate_up_proj must be float8"):
        f8.fused_moe_fp8(x, q1.float(), q2, s1, s2, w, ids)
    with pytest.raises(ValueError, match="gate_up_scale"):
        f8.fused_moe_fp8(x, q1, q2, s1[:, :1], s2, w, ids)
    with pytest.raises(ValueError, match="down_proj"):
        f8.fused_moe_fp8(x, q1, q2[:, :, :16], s1, s2, w, ids)
    with pytest.raises(ValueError, match="BLOCK_K"), force_triton():
        f8.fused_moe_fp8(x, q1, q2, s1, s2, w, ids, config=dict(SMALL, BLOCK_K=48))


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 300])
def test_fused_moe_fp8_bf16_gpu(m):
    """bf16 activations, FP8 experts at the thinker's shapes (E=128, H=2048, I=768), eager and graph replay."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 weights stay FP8 only on sm_89+")
    q1, q2, s1, s2 = _experts(128, 2048, 768, "cuda")
    x = torch.randn(m, 2048, device="cuda", dtype=torch.bfloat16)
    w, ids = _routing(m, 128, 8, torch.bfloat16, "cuda")
    ref = f8.fused_moe_fp8_ref(x, q1, q2, s1, s2, w, ids)
    assert_close(f8.fused_moe_fp8(x, q1, q2, s1, s2, w, ids), ref, name="bf16 eager")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = f8.fused_moe_fp8(x, q1, q2, s1, s2, w, ids)
    x.copy_(torch.randn_like(x))
    graph.replay()
    assert_close(static, f8.fused_moe_fp8_ref(x, q1, q2, s1, s2, w, ids), name="bf16 graph replay")


@pytest.mark.gpu
@pytest.mark.parametrize("m", [64, 300])
def test_fused_moe_fp8_w8a8_gpu(m):
    """Prefill w8a8 on the FP8 tensor cores at the thinker's shapes against the fp32 w8a8 reference (the same
    codes and scales; bf16 roundings of the gate/up/down outputs may differ by an ulp and move a code of h)."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 weights stay FP8 only on sm_89+")
    q1, q2, s1, s2 = _experts(128, 2048, 768, "cuda")
    x = torch.randn(m, 2048, device="cuda", dtype=torch.bfloat16)
    w, ids = _routing(m, 128, 8, torch.bfloat16, "cuda")
    out = f8.fused_moe_fp8(x, q1, q2, s1, s2, w, ids, act_fp8=True)
    ref = f8.fused_moe_fp8_ref(x, q1, q2, s1, s2, w, ids, act_fp8=True)
    rel = (out.float() - ref.float()).norm() / ref.float().norm()
    assert rel <= 2e-2, f"w8a8 vs its reference: relative error {rel:.4f}"
