"""kv_write: the Triton scatter (interpreter on CPU) against the reference, and the reference against a
per-token loop, on odd block sizes, skipped slots, strided k/v slices and strided page tensors."""
import pytest
import torch

from omni_rt.kernels import force_triton
from omni_rt.kernels.kv_write import kv_write, kv_write_ref, kv_write_triton


def _fused_kv(tokens, kv_heads, head_dim, dtype, heads=4):
    """k, v as strided views of one fused (tokens, (heads + 2 kv_heads) * head_dim + pad) qkv buffer."""
    width = (heads + 2 * kv_heads) * head_dim + 8
    qkv = torch.randn(tokens, width).to(dtype)
    k = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    v = qkv[:, (heads + kv_heads) * head_dim:(heads + 2 * kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    return k, v


def _slots(tokens, num_blocks, block_size, skip_every=0, dtype=torch.int64):
    slots = torch.randperm(num_blocks * block_size)[:tokens].to(dtype)
    if skip_every:
        slots[1::skip_every] = -1
    return slots


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tokens,kv_heads,head_dim,block_size", [
    (1, 2, 16, 16), (37, 2, 16, 16), (23, 1, 64, 5), (9, 4, 128, 32), (13, 3, 8, 7)])
def test_triton_matches_ref(dtype, tokens, kv_heads, head_dim, block_size):
    num_blocks = tokens // block_size + 3
    k, v = _fused_kv(tokens, kv_heads, head_dim, dtype)
    slots = _slots(tokens, num_blocks, block_size, skip_every=4)
    base = torch.randn(num_blocks, block_size, kv_heads, head_dim).to(dtype)
    k_ref, v_ref = base.clone(), -base.clone()
    kv_write_ref(k, v, k_ref, v_ref, slots)
    k_tri, v_tri = base.clone(), -base.clone()
    with force_triton():
        kv_write(k, v, k_tri, v_tri, slots)
    assert torch.equal(k_tri, k_ref) and torch.equal(v_tri, v_ref)
    assert not torch.equal(k_ref, base)  # the test wrote something


def test_ref_matches_token_loop():
    tokens, kv_heads, head_dim, block_size, num_blocks = 11, 2, 16, 4, 5
    k, v = _fused_kv(tokens, kv_heads, head_dim, torch.float32)
    slots = _slots(tokens, num_blocks, block_size, skip_every=3)
    k_cache = torch.zeros(num_blocks, block_size, kv_heads, head_dim)
    v_cache = torch.zeros_like(k_cache)
    kv_write_ref(k, v, k_cache, v_cache, slots)
    k_expect, v_expect = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            k_expect[s // block_size, s % block_size] = k[t]
            v_expect[s // block_size, s % block_size] = v[t]
    assert torch.equal(k_cache, k_expect) and torch.equal(v_cache, v_expect)


def test_strided_pool_views_and_int32_slots():
    # Page tensors sliced from one (num_blocks, 2, block_size, kv_heads, head_dim) pool: the block stride is
    # twice block_size * row stride, so writing at slot * row_stride would land in the wrong tensor.
    tokens, kv_heads, head_dim, block_size, num_blocks = 19, 2, 16, 8, 4
    pool_ref = torch.randn(num_blocks, 2, block_size, kv_heads, head_dim)
    pool_tri = pool_ref.clone()
    k, v = _fused_kv(tokens, kv_heads, head_dim, torch.float32)
    slots = _slots(tokens, num_blocks, block_size, dtype=torch.int32)
    kv_write_ref(k, v, pool_ref[:, 0], pool_ref[:, 1], slots)
    with force_triton():
        kv_write_triton(k, v, pool_tri[:, 0], pool_tri[:, 1], slots)
    assert torch.equal(pool_tri, pool_ref)


def test_empty_and_all_skipped():
    k_cache = torch.randn(2, 4, 2, 16)
    v_cache = torch.randn(2, 4, 2, 16)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    with force_triton():
        kv_write(torch.empty(0, 2, 16), torch.empty(0, 2, 16), k_cache, v_cache, torch.empty(0, dtype=torch.int64))
        kv_write(torch.randn(3, 2, 16), torch.randn(3, 2, 16), k_cache, v_cache, torch.full((3,), -1))
    assert torch.equal(k_cache, before_k) and torch.equal(v_cache, before_v)


@pytest.mark.parametrize("bad", ["dtype", "heads", "slots_len", "slots_dtype", "head_dim_stride"])
def test_validation(bad):
    k, v = torch.randn(3, 2, 16), torch.randn(3, 2, 16)
    k_cache, v_cache = torch.zeros(2, 4, 2, 16), torch.zeros(2, 4, 2, 16)
    slots = torch.arange(3)
    if bad == "dtype":
        k = k.half()
    elif bad == "heads":
        k_cache, v_cache = torch.zeros(2, 4, 1, 16), torch.zeros(2, 4, 1, 16)
    elif bad == "slots_len":
        slots = torch.arange(4)
    elif bad == "slots_dtype":
        slots = slots.float()
    else:
        k = torch.randn(3, 16, 2).transpose(1, 2)
    with pytest.raises(ValueError), force_triton():
        kv_write(k, v, k_cache, v_cache, slots)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_released_shape_and_graph(dtype):
    tokens, kv_heads, head_dim, block_size, num_blocks = 77, 4, 128, 16, 64
    k, v = (t.cuda() for t in _fused_kv(tokens, kv_heads, head_dim, dtype, heads=32))
    slots = _slots(tokens, num_blocks, block_size, skip_every=5).cuda()
    k_ref = torch.zeros(num_blocks, block_size, kv_heads, head_dim, dtype=dtype, device="cuda")
    v_ref = torch.zeros_like(k_ref)
    kv_write_ref(k, v, k_ref, v_ref, slots)
    k_cache, v_cache = torch.zeros_like(k_ref), torch.zeros_like(v_ref)
    kv_write(k, v, k_cache, v_cache, slots)  # warm-up compiles outside the capture
    k_cache.zero_()
    v_cache.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kv_write(k, v, k_cache, v_cache, slots)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
