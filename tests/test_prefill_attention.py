"""prefill_attention: the Triton kernel (interpreter on CPU) against the reference, and the reference against
dense causal SDPA over each whole sequence; chunked prefill (a second chunk reading the first chunk's pages)
must equal one-shot prefill of the concatenation.

Earlier context lives in shuffled pages whose unused rows are NaN; q/k/v are strided views of a fused qkv
buffer, as the model's projection produces them.
"""
import pytest
import torch
import torch.nn.functional as F
import triton

from _tolerances import assert_close
from omni_rt.kernels import force_triton
from omni_rt.kernels.kv_write import kv_write_ref
from omni_rt.kernels.prefill_attention import prefill_attention, prefill_attention_ref, prefill_attention_triton


def fused_qkv(tokens, heads, kv_heads, head_dim, dtype, device="cpu"):
    """q (tokens, heads, d), k, v (tokens, kv_heads, d) as strided views of one fused qkv buffer."""
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim + 8).to(device=device, dtype=dtype)
    q = qkv[:, :heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    v = qkv[:, (heads + kv_heads) * head_dim:(heads + 2 * kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    return q, k, v


class Pages:
    """A NaN-filled paged cache with shuffled, -1-padded block tables sized for ``total_lens``."""

    def __init__(self, total_lens, block_size, kv_heads, head_dim, dtype, device="cpu"):
        self.block_size = block_size
        blocks = [triton.cdiv(n, block_size) for n in total_lens]
        num_blocks = sum(blocks) + 2
        shape = (num_blocks, block_size, kv_heads, head_dim)
        self.k_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
        self.v_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
        self.block_tables = torch.full((len(total_lens), max(blocks) + 1), -1, dtype=torch.int32)
        perm, used = torch.randperm(num_blocks), 0
        for b, n in enumerate(blocks):
            self.block_tables[b, :n] = perm[used:used + n].int()
            used += n
        self.block_tables = self.block_tables.to(device)

    def write(self, k, v, starts, lens):
        """Write a packed chunk: sequence b's tokens go to positions starts[b] .. starts[b] + lens[b] - 1."""
        slots = []
        for b, (s, n) in enumerate(zip(starts, lens)):
            pos = torch.arange(s, s + n, device=k.device)
            slots.append(self.block_tables[b, pos // self.block_size].long() * self.block_size + pos % self.block_size)
        kv_write_ref(k, v, self.k_cache, self.v_cache, torch.cat(slots))


def cu_seqlens(lens, device="cpu"):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)


def run_chunk(pages, prev, new, heads, kv_heads, head_dim, dtype, triton_path, scale=None):
    """Write a chunk of ``new`` tokens after ``prev`` cached ones, then attend; returns (q, k, v, out)."""
    q, k, v = fused_qkv(sum(new), heads, kv_heads, head_dim, dtype)
    pages.write(k, v, prev, new)
    cl = torch.tensor([p + n for p, n in zip(prev, new)], dtype=torch.int32)
    args = (q, k, v, cu_seqlens(new), pages.k_cache, pages.v_cache, pages.block_tables, cl, scale)
    if triton_path:
        with force_triton():
            return q, k, v, prefill_attention_triton(*args, max_seqlen_q=max(new))
    return q, k, v, prefill_attention_ref(*args)


def test_ref_matches_dense_causal_sdpa():
    # Reference chunk output == the last rows of dense causal attention over the whole (cached + new) sequence.
    prev, new, heads, kv_heads, d = [0, 10, 40, 3], [5, 17, 33, 1], 4, 2, 16
    pages = Pages([p + n for p, n in zip(prev, new)], 16, kv_heads, d, torch.float32)
    old_k, old_v = [], []
    for b, p in enumerate(prev):
        k, v = torch.randn(p, kv_heads, d), torch.randn(p, kv_heads, d)
        pages.write(k, v, [0] * len(prev), [p if i == b else 0 for i in range(len(prev))])
        old_k.append(k)
        old_v.append(v)
    q, k, v, out = run_chunk(pages, prev, new, heads, kv_heads, d, torch.float32, triton_path=False)
    cu = cu_seqlens(new).tolist()
    for b, p in enumerate(prev):
        lo, hi = cu[b], cu[b + 1]
        keys = torch.cat([old_k[b], k[lo:hi]]).transpose(0, 1)
        values = torch.cat([old_v[b], v[lo:hi]]).transpose(0, 1)
        mask = torch.ones(p + new[b], p + new[b], dtype=torch.bool).tril()[p:]
        expect = F.scaled_dot_product_attention(q[lo:hi].transpose(0, 1), keys, values, attn_mask=mask,
                                                enable_gqa=True).transpose(0, 1)
        assert_close(out[lo:hi], expect, name=f"seq {b}")


# (heads, kv_heads, head_dim): GQA ratios 1 / 2 / 4, head dims 16 / 64 / 128 and the tiny code predictor's 8.
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(2, 2, 16), (4, 2, 16), (4, 1, 64), (2, 1, 128), (4, 2, 8)])
def test_triton_matches_ref_fp32(heads, kv_heads, head_dim):
    # Block 16 with lengths that don't divide it; a context-length-1 sequence; a chunk crossing BLOCK_M.
    prev, new = ([0, 10, 0, 3], [5, 17, 1, 40]) if head_dim <= 16 else ([0, 21], [9, 5])
    pages = Pages([p + n for p, n in zip(prev, new)], 16, kv_heads, head_dim, torch.float32)
    for b, p in enumerate(prev):
        pages.write(torch.randn(p, kv_heads, head_dim), torch.randn(p, kv_heads, head_dim),
                    [0] * len(prev), [p if i == b else 0 for i in range(len(prev))])
    state = torch.get_rng_state()
    *_, ref = run_chunk(pages, prev, new, heads, kv_heads, head_dim, torch.float32, False, scale=0.2)
    torch.set_rng_state(state)
    *_, out = run_chunk(pages, prev, new, heads, kv_heads, head_dim, torch.float32, True, scale=0.2)
    assert_close(out, ref)


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 16), (4, 1, 128)])
def test_chunked_prefill_equals_one_shot(heads, kv_heads, head_dim):
    # Two sequences prefilled in chunks (second chunk reads the first chunk's pages), vs one shot.
    total, first = [37, 20], [16, 3]
    second = [t - f for t, f in zip(total, first)]
    q, k, v = fused_qkv(sum(total), heads, kv_heads, head_dim, torch.float32)
    cu = cu_seqlens(total).tolist()

    def rows(sel):
        idx = torch.cat([torch.arange(cu[b] + a, cu[b] + z) for b, (a, z) in enumerate(sel)])
        return q[idx], k[idx], v[idx]

    one_shot = Pages(total, 8, kv_heads, head_dim, torch.float32)
    with force_triton():
        one_shot.write(k, v, [0, 0], total)
        full = prefill_attention(q, k, v, cu_seqlens(total), one_shot.k_cache, one_shot.v_cache,
                                 one_shot.block_tables, torch.tensor(total, dtype=torch.int32))
        chunked = Pages(total, 8, kv_heads, head_dim, torch.float32)
        outs = []
        for start, lens in (([0, 0], first), (first, second)):
            cq, ck, cv = rows([(s, s + n) for s, n in zip(start, lens)])
            chunked.write(ck, cv, start, lens)
            cl = torch.tensor([s + n for s, n in zip(start, lens)], dtype=torch.int32)
            outs.append(prefill_attention(cq, ck, cv, cu_seqlens(lens), chunked.k_cache, chunked.v_cache,
                                          chunked.block_tables, cl))
    c1, c2 = cu_seqlens(first).tolist(), cu_seqlens(second).tolist()
    for b in range(2):
        got = torch.cat([outs[0][c1[b]:c1[b + 1]], outs[1][c2[b]:c2[b + 1]]])
        assert_close(got, full[cu[b]:cu[b + 1]], name=f"seq {b}")


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 16), (8, 2, 128)])
def test_triton_fp16_error_budget(heads, kv_heads, head_dim):
    # Kernel error vs the fp32 reference must stay within twice what plain fp16 torch makes (plus atol).
    prev, new = [0, 20], [33, 7]
    pages = Pages([p + n for p, n in zip(prev, new)], 16, kv_heads, head_dim, torch.float16)
    pages.write(torch.randn(20, kv_heads, head_dim).half(), torch.randn(20, kv_heads, head_dim).half(), [0, 0], [0, 20])
    q, k, v = fused_qkv(sum(new), heads, kv_heads, head_dim, torch.float16)
    pages.write(k, v, prev, new)
    args = (q, k, v, cu_seqlens(new), pages.k_cache, pages.v_cache, pages.block_tables,
            torch.tensor([p + n for p, n in zip(prev, new)], dtype=torch.int32))
    exact = prefill_attention_ref(*args).float()
    torch_half = prefill_attention_ref(*args, upcast=False).float()
    with force_triton():
        out = prefill_attention(*args)
    assert out.dtype == torch.float16
    err_kernel = (out.float() - exact).abs().max().item()
    err_torch = (torch_half - exact).abs().max().item()
    print(f"fp16 max err: kernel {err_kernel:.3g}, torch fp16 {err_torch:.3g}")
    assert err_kernel <= 2 * err_torch + 1e-3


def test_no_cache_empty_sequence_and_padding_rows():
    # Plain causal varlen (no pages), a zero-length sequence in the batch, and two padding rows past
    # cu_seqlens[-1] that must come back as zeros.
    heads, kv_heads, d, lens = 4, 2, 16, [7, 0, 19]
    q, k, v = fused_qkv(sum(lens) + 2, heads, kv_heads, d, torch.float32)
    cu = cu_seqlens(lens)
    ref = prefill_attention_ref(q, k, v, cu)
    with force_triton():
        out = prefill_attention(q, k, v, cu)
    assert_close(out, ref)
    assert torch.equal(out[-2:], torch.zeros_like(out[-2:]))
    dense = F.scaled_dot_product_attention(q[7:26].transpose(0, 1), k[7:26].transpose(0, 1),
                                           v[7:26].transpose(0, 1), is_causal=True, enable_gqa=True)
    assert_close(ref[7:26], dense.transpose(0, 1))


@pytest.mark.parametrize("bad", ["gqa", "dtype", "cu_dtype", "partial_cache", "short_context"])
def test_validation(bad):
    q, k, v = fused_qkv(5, 4, 2, 16, torch.float32)
    pages = Pages([5], 4, 2, 16, torch.float32)
    cu, cl = cu_seqlens([5]), torch.tensor([5], dtype=torch.int32)
    cache = [pages.k_cache, pages.v_cache, pages.block_tables, cl]
    if bad == "gqa":
        q = torch.randn(5, 3, 16)
    elif bad == "dtype":
        k = k.half()
    elif bad == "cu_dtype":
        cu = cu.long()
    elif bad == "partial_cache":
        cache[2] = None
    with pytest.raises(ValueError):
        if bad == "short_context":
            # Only the reference can check lengths without a host sync.
            prefill_attention_ref(q, k, v, cu, *cache[:3], torch.tensor([4], dtype=torch.int32))
        else:
            with force_triton():
                prefill_attention(q, k, v, cu, *cache)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads,kv_heads", [(32, 4), (16, 2)])
def test_gpu_released_shapes(dtype, heads, kv_heads):
    prev, new = [0, 300, 1000], [517, 64, 1]
    pages = Pages([p + n for p, n in zip(prev, new)], 16, kv_heads, 128, dtype, device="cuda")
    for b, p in enumerate(prev):
        k_old = torch.randn(p, kv_heads, 128, device="cuda", dtype=dtype)
        pages.write(k_old, torch.randn_like(k_old), [0, 0, 0], [p if i == b else 0 for i in range(3)])
    q, k, v = fused_qkv(sum(new), heads, kv_heads, 128, dtype, device="cuda")
    pages.write(k, v, prev, new)
    args = (q, k, v, cu_seqlens(new, "cuda"), pages.k_cache, pages.v_cache, pages.block_tables,
            torch.tensor([p + n for p, n in zip(prev, new)], dtype=torch.int32, device="cuda"))
    exact = prefill_attention_ref(*args).float()
    torch_lp = prefill_attention_ref(*args, upcast=False).float()
    out = prefill_attention(*args)
    assert (out.float() - exact).abs().max().item() <= 2 * (torch_lp - exact).abs().max().item() + 2e-3


@pytest.mark.parametrize("heads, kv_heads", [(4, 2), (4, 1)])
def test_cpu_sdpa_path_matches_ref_with_pages_and_query_blocks(heads, kv_heads):
    """The CPU path (SDPA over query blocks) equals the reference on a chunk after paged context, with
    query blocks that split the chunks unevenly."""
    from omni_rt.kernels.prefill_attention import prefill_attention_sdpa

    prev, new = [19, 0, 5], [23, 9, 1]
    pages = Pages([p + n for p, n in zip(prev, new)], 7, kv_heads, 16, torch.float32)
    q, k, v, ref = run_chunk(pages, prev, new, heads, kv_heads, 16, torch.float32, triton_path=False)
    cl = torch.tensor([p + n for p, n in zip(prev, new)], dtype=torch.int32)
    out = prefill_attention_sdpa(q, k, v, cu_seqlens(new), pages.k_cache, pages.v_cache, pages.block_tables, cl,
                                 block_q=5)
    assert_close(out, ref, atol=1e-5, rtol=1e-5, name="sdpa path vs ref")
    with force_triton(False):
        assert_close(prefill_attention(q, k, v, cu_seqlens(new), pages.k_cache, pages.v_cache,
                                       pages.block_tables, cl), ref, atol=1e-5, rtol=1e-5, name="dispatch")
