"""window_attention: the Triton kernel (interpreter on CPU) vs its PyTorch reference, and the reference vs a
from-scratch dense computation of the windowed attention over the whole stream."""
import math

import pytest
import torch

from omni_rt.kernels import force_triton
from omni_rt.kernels.window_attention import window_attention, window_attention_ref
from tests._tolerances import KERNEL, assert_close


def _rope(B, n, D, pos, dtype, theta=100.0):
    inv = 1.0 / (theta ** (torch.arange(0, D, 2, dtype=torch.float) / D))
    f = (pos[:, None] + torch.arange(n))[..., None].float() * inv
    emb = torch.cat((f, f), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _inputs(B, n, H, KV, D, W, pos, dtype, strided=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    P = W - 1
    if strided:  # q/k/v as views of one fused projection, history as views of a packed state row
        qkv = torch.randn(B, n, (H + 2 * KV) * D, generator=g).to(dtype)
        q = qkv[..., :H * D].view(B, n, H, D)
        k = qkv[..., H * D:(H + KV) * D].view(B, n, KV, D)
        v = qkv[..., (H + KV) * D:].view(B, n, KV, D)
        packed = torch.randn(B, 3 + 2 * KV * P * D, generator=g).to(dtype)
        pk = packed[:, 3:3 + KV * P * D].view(B, KV, P, D)
        pv = packed[:, 3 + KV * P * D:].view(B, KV, P, D)
    else:
        q = torch.randn(B, n, H, D, generator=g).to(dtype)
        k = torch.randn(B, n, KV, D, generator=g).to(dtype)
        v = torch.randn(B, n, KV, D, generator=g).to(dtype)
        pk = torch.randn(B, KV, P, D, generator=g).to(dtype)
        pv = torch.randn(B, KV, P, D, generator=g).to(dtype)
    cos, sin = _rope(B, n, D, pos, dtype)
    return q, k, v, cos, sin, pk, pv


CASES = [
    # B, n, H, KV, D, W, positions, dtype, strided
    (1, 1, 2, 2, 16, 8, [5], torch.float32, False),          # one-frame decode step
    (2, 1, 4, 2, 8, 4, [0, 9], torch.float32, True),         # GQA, head_dim < 16 (padded tile), fresh stream
    (3, 19, 4, 1, 16, 6, [0, 3, 40], torch.float32, False),  # odd chunk across a block boundary, MQA
    (2, 5, 2, 2, 32, 72, [0, 100], torch.float16, True),     # released window, half precision
    (1, 40, 2, 2, 16, 5, [2], torch.float16, False),
]


@pytest.mark.parametrize("B,n,H,KV,D,W,positions,dtype,strided", CASES)
def test_triton_matches_ref(B, n, H, KV, D, W, positions, dtype, strided):
    pos = torch.tensor(positions, dtype=torch.int64)
    q, k, v, cos, sin, pk, pv = _inputs(B, n, H, KV, D, W, pos, dtype, strided)
    scale = D ** -0.5
    o_ref, nk_ref, nv_ref = window_attention_ref(q, k, v, cos, sin, pk, pv, pos, W, scale)
    out_k = torch.full((B, KV, W - 1, D), float("nan")).to(dtype)
    out_v = out_k.clone()
    with force_triton():
        o, nk, nv = window_attention(q, k, v, cos, sin, pk, pv, pos, W, scale, new_k=out_k, new_v=out_v)
    assert nk.data_ptr() == out_k.data_ptr() and nv.data_ptr() == out_v.data_ptr()
    atol, rtol = KERNEL[dtype]
    assert_close(o, o_ref, atol=atol, rtol=rtol, name="o")
    assert torch.equal(nv, nv_ref), "the value window is copied bits"
    assert_close(nk, nk_ref, atol=atol, rtol=rtol, name="new_k")
    if dtype == torch.float32:
        assert_close(nk, nk_ref, atol=1e-6, rtol=0, name="new_k (fp32 rope)")


def test_reference_equals_dense_stream():
    """Chunks through the reference with the carried window equal a dense masked softmax over the stream."""
    B, H, KV, D, W = 2, 4, 2, 8, 5
    total = 13
    g = torch.Generator().manual_seed(3)
    q = torch.randn(B, total, H, D, generator=g)
    k = torch.randn(B, total, KV, D, generator=g)
    v = torch.randn(B, total, KV, D, generator=g)
    pk = torch.zeros(B, KV, W - 1, D)
    pv = torch.zeros(B, KV, W - 1, D)
    outs, p = [], 0
    for n in (1, 4, 3, 5):
        pos = torch.full((B,), p, dtype=torch.int64)
        cos, sin = _rope(B, n, D, pos, torch.float32)
        o, pk, pv = window_attention_ref(q[:, p:p + n], k[:, p:p + n], v[:, p:p + n], cos, sin, pk, pv, pos, W,
                                         D ** -0.5)
        outs.append(o)
        p += n
    got = torch.cat(outs, 1)
    cos, sin = _rope(B, total, D, torch.zeros(B, dtype=torch.int64), torch.float32)
    rot = lambda x: x * cos[:, :, None] + torch.cat((-x[..., D // 2:], x[..., :D // 2]), -1) * sin[:, :, None]  # noqa: E731
    qr, kr = rot(q), rot(k).repeat_interleave(H // KV, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", qr, kr) / math.sqrt(D)
    i, j = torch.arange(total)[:, None], torch.arange(total)[None, :]
    s = s.masked_fill(~((j <= i) & (i - j < W)), float("-inf"))
    want = torch.einsum("bhij,bjhd->bihd", s.softmax(-1), v.repeat_interleave(H // KV, dim=2))
    assert_close(got, want, atol=1e-5, rtol=1e-5, name="streamed reference vs dense")


def test_validation():
    pos = torch.zeros(1, dtype=torch.int64)
    q, k, v, cos, sin, pk, pv = _inputs(1, 2, 2, 2, 8, 4, pos, torch.float32)
    with pytest.raises(ValueError, match="window - 1"):
        window_attention(q, k, v, cos, sin, pk, pv, pos, 5, 1.0)
    with pytest.raises(ValueError, match="int64"):
        window_attention(q, k, v, cos, sin, pk, pv, pos.int(), 4, 1.0)
    with pytest.raises(ValueError, match="does not fit"):
        window_attention(q, k[:, :, :, :4], v[:, :, :, :4], cos, sin, pk, pv, pos, 4, 1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n", [1, 4, 300])
def test_released_shapes_gpu(dtype, n):
    """16 heads x 64, window 72; graph capture + replay equals the eager call."""
    B, H, KV, D, W = 2, 16, 16, 64, 72
    pos = torch.tensor([0, 1000], dtype=torch.int64)
    q, k, v, cos, sin, pk, pv = (t.cuda() for t in _inputs(B, n, H, KV, D, W, pos, dtype, strided=True))
    pos = pos.cuda()
    o, nk, nv = window_attention(q, k, v, cos, sin, pk, pv, pos, W, D ** -0.5)
    o_ref, nk_ref, nv_ref = window_attention_ref(q, k, v, cos, sin, pk, pv, pos, W, D ** -0.5)
    atol, rtol = KERNEL[dtype]
    assert_close(o, o_ref, atol=2 * atol, rtol=rtol, name="o")
    assert_close(nk, nk_ref, atol=atol, rtol=rtol, name="new_k")
    assert torch.equal(nv, nv_ref)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        o2, _, _ = window_attention(q, k, v, cos, sin, pk, pv, pos, W, D ** -0.5, new_k=nk, new_v=nv)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(o2, o)
