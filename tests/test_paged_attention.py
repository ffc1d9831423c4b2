"""paged_decode_attention: the Triton kernels (interpreter on CPU) against the paged reference, and the paged
reference against dense SDPA on the unpaged K/V.

Pages are shuffled, tables are padded with -1, and every cache row that no sequence owns is NaN, so a kernel
that reads a padding entry or a row past a sequence's length produces NaN instead of passing by luck.
"""
import pytest
import torch
import torch.nn.functional as F
import triton

from _tolerances import assert_close
from omni_rt.kernels import force_triton
from omni_rt.kernels.paged_attention import (default_num_partitions, paged_decode_attention,
                                             paged_decode_attention_ref, paged_decode_attention_triton)


def make_paged(lens, block_size, kv_heads, head_dim, dtype, device="cpu", spare_blocks=3, spare_cols=2):
    """Shuffled paged K/V for sequences of ``lens`` tokens.

    Returns k_cache, v_cache (num_blocks, block_size, kv_heads, head_dim) NaN outside the sequences,
    block_tables (batch, max_blocks + spare_cols) int32 padded with -1, context_lens (batch,) int32, and the
    dense per-sequence (len, kv_heads, head_dim) K and V lists.
    """
    blocks = [triton.cdiv(n, block_size) for n in lens]
    num_blocks = sum(blocks) + spare_blocks
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
    v_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
    block_tables = torch.full((len(lens), max(blocks, default=0) + spare_cols), -1, dtype=torch.int32)
    perm = torch.randperm(num_blocks)
    ks, vs, used = [], [], 0
    for b, n in enumerate(lens):
        pages = perm[used:used + blocks[b]]
        used += blocks[b]
        block_tables[b, :blocks[b]] = pages.int()
        k = torch.randn(n, kv_heads, head_dim).to(device=device, dtype=dtype)
        v = torch.randn(n, kv_heads, head_dim).to(device=device, dtype=dtype)
        pos = torch.arange(n)
        k_cache[pages[pos // block_size].to(device), (pos % block_size).to(device)] = k
        v_cache[pages[pos // block_size].to(device), (pos % block_size).to(device)] = v
        ks.append(k)
        vs.append(v)
    context_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    return k_cache, v_cache, block_tables.to(device), context_lens, ks, vs


def fused_q(batch, heads, kv_heads, head_dim, dtype, device="cpu"):
    """q as a strided view into a fused (batch, (heads + 2 kv_heads) * head_dim + pad) qkv buffer."""
    qkv = torch.randn(batch, (heads + 2 * kv_heads) * head_dim + 8).to(device=device, dtype=dtype)
    return qkv[:, :heads * head_dim].view(batch, heads, head_dim)


def sdpa_decode(q, ks, vs, scale):
    """Dense fp32 attention of each sequence's single query over all its keys."""
    out = []
    for b, (k, v) in enumerate(zip(ks, vs)):
        o = F.scaled_dot_product_attention(q[b:b + 1].float().transpose(0, 1), k.float().transpose(0, 1),
                                           v.float().transpose(0, 1), scale=scale, enable_gqa=True)
        out.append(o.transpose(0, 1)[0])
    return torch.stack(out)


@pytest.mark.parametrize("lens,block_size", [([1, 17, 33, 5], 16), ([1], 16), ([70, 3], 5), ([40, 129], 128)])
def test_ref_matches_dense_sdpa(lens, block_size):
    k_cache, v_cache, bt, cl, ks, vs = make_paged(lens, block_size, 2, 16, torch.float32)
    q = fused_q(len(lens), 4, 2, 16, torch.float32)
    assert_close(paged_decode_attention_ref(q, k_cache, v_cache, bt, cl), sdpa_decode(q, ks, vs, 16 ** -0.5))


# (heads, kv_heads, head_dim): GQA ratios 1 / 2 / 4, head dims 16 / 64 / 128 and the tiny code predictor's 8.
SHAPES = [(2, 2, 16), (4, 2, 16), (8, 2, 64), (4, 1, 128), (4, 2, 8)]


@pytest.mark.parametrize("heads,kv_heads,head_dim", SHAPES)
@pytest.mark.parametrize("num_partitions", [1, 3])
def test_triton_matches_ref_fp32(heads, kv_heads, head_dim, num_partitions):
    lens = [1, 17, 33, 5] if head_dim <= 16 else [17, 70]
    k_cache, v_cache, bt, cl, _, _ = make_paged(lens, 16, kv_heads, head_dim, torch.float32)
    q = fused_q(len(lens), heads, kv_heads, head_dim, torch.float32)
    ref = paged_decode_attention_ref(q, k_cache, v_cache, bt, cl, scale=0.3)
    with force_triton():
        out = paged_decode_attention_triton(q, k_cache, v_cache, bt, cl, scale=0.3, num_partitions=num_partitions)
    assert_close(out, ref)


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 16), (8, 2, 128)])
@pytest.mark.parametrize("num_partitions", [1, 4])
def test_triton_fp16_error_budget(heads, kv_heads, head_dim, num_partitions):
    # Kernel error vs the fp32 reference must stay within twice what plain fp16 torch makes (plus atol).
    lens = [1, 17, 33, 5]
    k_cache, v_cache, bt, cl, _, _ = make_paged(lens, 16, kv_heads, head_dim, torch.float16)
    q = fused_q(len(lens), heads, kv_heads, head_dim, torch.float16)
    exact = paged_decode_attention_ref(q, k_cache, v_cache, bt, cl, upcast=True).float()
    torch_half = paged_decode_attention_ref(q, k_cache, v_cache, bt, cl, upcast=False).float()
    with force_triton():
        out = paged_decode_attention_triton(q, k_cache, v_cache, bt, cl, num_partitions=num_partitions)
    assert out.dtype == torch.float16
    err_kernel = (out.float() - exact).abs().max().item()
    err_torch = (torch_half - exact).abs().max().item()
    print(f"fp16 max err: kernel {err_kernel:.3g}, torch fp16 {err_torch:.3g}")
    assert err_kernel <= 2 * err_torch + 1e-3


def test_more_partitions_than_tiles_and_context_one():
    # 32 partitions over sequences of 1..70 tokens: most partitions are empty and must not contribute.
    lens = [1, 1, 70]
    k_cache, v_cache, bt, cl, _, _ = make_paged(lens, 4, 1, 16, torch.float32)
    q = fused_q(len(lens), 2, 1, 16, torch.float32)
    ref = paged_decode_attention_ref(q, k_cache, v_cache, bt, cl)
    with force_triton():
        out = paged_decode_attention_triton(q, k_cache, v_cache, bt, cl, num_partitions=32)
    assert_close(out, ref)


def test_public_dispatch_default_partitions_and_out():
    lens = [9, 40]
    k_cache, v_cache, bt, cl, _, _ = make_paged(lens, 16, 2, 16, torch.float32)
    q = fused_q(len(lens), 4, 2, 16, torch.float32)
    ref = paged_decode_attention(q, k_cache, v_cache, bt, cl)  # CPU tensors, not forced: the reference
    assert default_num_partitions(len(lens), 2) > 1  # the default path exercises split-K + reduce
    out = torch.full_like(q, float("nan"))
    with force_triton():
        got = paged_decode_attention(q, k_cache, v_cache, bt, cl, out=out)
    assert got is out
    assert_close(out, ref)


def test_zero_context_gives_zeros():
    k_cache, v_cache, bt, _, _, _ = make_paged([5, 3], 4, 1, 16, torch.float32)
    cl = torch.tensor([0, 3], dtype=torch.int32)
    q = fused_q(2, 2, 1, 16, torch.float32)
    ref = paged_decode_attention_ref(q, k_cache, v_cache, bt, cl)
    assert torch.equal(ref[0], torch.zeros_like(ref[0]))
    for parts in (1, 2):
        with force_triton():
            out = paged_decode_attention_triton(q, k_cache, v_cache, bt, cl, num_partitions=parts)
        assert_close(out, ref)


def test_strided_page_views():
    # K and V pages sliced from one (num_blocks, 2, block_size, kv_heads, head_dim) pool.
    k_cache, v_cache, bt, cl, _, _ = make_paged([17, 6], 8, 2, 16, torch.float32)
    pool = torch.stack([k_cache, v_cache], dim=1)
    q = fused_q(2, 4, 2, 16, torch.float32)
    ref = paged_decode_attention_ref(q, k_cache, v_cache, bt, cl)
    with force_triton():
        out = paged_decode_attention_triton(q, pool[:, 0], pool[:, 1], bt, cl, num_partitions=2)
    assert_close(out, ref)


@pytest.mark.parametrize("bad", ["gqa", "dtype", "table_dtype", "lens_shape", "q_stride"])
def test_validation(bad):
    k_cache, v_cache, bt, cl, _, _ = make_paged([3, 4], 4, 2, 16, torch.float32)
    q = torch.randn(2, 4, 16)
    if bad == "gqa":
        q = torch.randn(2, 3, 16)
    elif bad == "dtype":
        q = q.half()
    elif bad == "table_dtype":
        bt = bt.long()
    elif bad == "lens_shape":
        cl = cl[:1]
    else:
        q = torch.randn(2, 16, 4).transpose(1, 2)
    with pytest.raises(ValueError), force_triton():
        paged_decode_attention(q, k_cache, v_cache, bt, cl)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads,kv_heads,batch", [(32, 4, 1), (32, 4, 8), (16, 2, 3), (16, 8, 64)])
def test_gpu_released_shapes_and_cuda_graph(dtype, heads, kv_heads, batch):
    lens = [int(x) for x in torch.randint(1, 2000, (batch,))]
    lens[0] = 1
    k_cache, v_cache, bt, cl, _, _ = make_paged(lens, 16, kv_heads, 128, dtype, device="cuda")
    q = fused_q(batch, heads, kv_heads, 128, dtype, device="cuda")
    exact = paged_decode_attention_ref(q, k_cache, v_cache, bt, cl).float()
    torch_lp = paged_decode_attention_ref(q, k_cache, v_cache, bt, cl, upcast=False).float()
    out = paged_decode_attention(q, k_cache, v_cache, bt, cl)
    assert (out.float() - exact).abs().max().item() <= 2 * (torch_lp - exact).abs().max().item() + 2e-3

    # Capture once, then change the lengths on the device: the replay must follow without recapture.
    static_out = torch.empty_like(q)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_decode_attention(q, k_cache, v_cache, bt, cl, out=static_out)
    cl.copy_(torch.clamp(cl - 1, min=1))
    static_out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    exact = paged_decode_attention_ref(q, k_cache, v_cache, bt, cl).float()
    torch_lp = paged_decode_attention_ref(q, k_cache, v_cache, bt, cl, upcast=False).float()
    assert (static_out.float() - exact).abs().max().item() <= 2 * (torch_lp - exact).abs().max().item() + 2e-3


def test_alignment_hint_only_when_true():
    # VEC > 1 turns into tl.multiple_of hints on GPU: it must drop to 1 whenever a pointer or stride is off.
    from omni_rt.kernels.paged_attention import _vec
    cache = torch.zeros(4, 16, 2, 128, dtype=torch.float16)
    assert _vec(torch.float16, (cache,), cache.stride()[:3]) == 8
    assert _vec(torch.float32, (cache.float(),), cache.stride()[:3]) == 4
    shifted = torch.zeros(20000, dtype=torch.float16)[1:1 + 4 * 16 * 2 * 128].view(4, 16, 2, 128)
    assert _vec(torch.float16, (shifted,), shifted.stride()[:3]) == 1  # base pointer 2 bytes off
    assert _vec(torch.float16, (cache,), (20,)) == 1  # a row stride of 40 bytes
