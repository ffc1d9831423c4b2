"""Causal varlen prefill attention that also reads earlier context from the paged KV cache (chunked prefill).

Sequence ``b`` brings ``n_b = cu_seqlens_q[b+1] - cu_seqlens_q[b]`` new tokens that sit at the END of its
context: ``context_lens[b]`` counts them, so the query at row ``i`` has absolute position
``p = context_lens[b] - n_b + i`` and attends to positions ``0..p``. Positions before the chunk (earlier
chunks, a shared prefix) are read from the pages through ``block_tables``; the chunk's own K/V are read from
the ``k``/``v`` tensors (the same values the caller already wrote into the pages with ``kv_write``, but read
contiguously and without the table gather).

Grid: ``(cdiv(max_seqlen_q, BLOCK_M), batch, num_heads)``; prefill runs eagerly, so the host-side
``max_seqlen_q`` may size the grid. Online softmax in fp32, ``tl.dot`` operands in the input dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import KernelSpec, use_triton
from ._online_softmax import online_softmax_step
from .paged_attention import _check_paged, _check_triton_strides, _vec, attention_ref, gather_pages

__all__ = ["prefill_attention", "prefill_attention_triton", "prefill_attention_ref", "COMPILE_SPECS"]

_LOG2E = 1.4426950408889634


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, cu_seqlens_ptr,
    k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, out_ptr,
    qk_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    stride_bt, stride_ot, stride_oh,
    group, block_size,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, VEC: tl.constexpr,
):
    mblk = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    kvh = h // group
    q_start = tl.load(cu_seqlens_ptr + b)
    qlen = tl.load(cu_seqlens_ptr + b + 1) - q_start
    if mblk * BLOCK_M < qlen:
        prefix = tl.load(context_lens_ptr + b) - qlen
        offs_m = mblk * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        mask_m = offs_m < qlen
        mask_d = offs_d < HEAD_DIM
        rows = (q_start + offs_m).to(tl.int64)
        q_row = rows * stride_qt
        o_row = rows * stride_ot
        q_head = q_ptr + h * stride_qh
        o_head = out_ptr + h * stride_oh
        kc_head = k_cache_ptr + kvh * stride_kch
        vc_head = v_cache_ptr + kvh * stride_vch
        k_head = k_ptr + kvh * stride_kh
        v_head = v_ptr + kvh * stride_vh
        if VEC > 1:
            # The launcher checked 16-byte alignment of every base pointer and row stride (see _vec).
            q_row = tl.multiple_of(q_row, VEC)
            o_row = tl.multiple_of(o_row, VEC)
            q_head = tl.multiple_of(q_head, 16)
            o_head = tl.multiple_of(o_head, 16)
            kc_head = tl.multiple_of(kc_head, 16)
            vc_head = tl.multiple_of(vc_head, 16)
            k_head = tl.multiple_of(k_head, 16)
            v_head = tl.multiple_of(v_head, 16)
        q = tl.load(q_head + q_row[:, None] + offs_d[None, :],
                    mask=mask_m[:, None] & mask_d[None, :], other=0.0)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

        # Earlier context from the pages: every query of the chunk sees all of it, no causal mask.
        bt_row = block_tables_ptr + b.to(tl.int64) * stride_bt
        for start in range(0, prefix, BLOCK_N):
            pos = start + offs_n
            mask_n = pos < prefix
            page = tl.load(bt_row + pos // block_size, mask=mask_n, other=0).to(tl.int64)
            row = pos % block_size
            k_tok = page * stride_kcb + row * stride_kcs
            v_tok = page * stride_vcb + row * stride_vcs
            if VEC > 1:
                k_tok = tl.multiple_of(k_tok, VEC)
                v_tok = tl.multiple_of(v_tok, VEC)
            k = tl.load(kc_head + k_tok[None, :] + offs_d[:, None],
                        mask=mask_n[None, :] & mask_d[:, None], other=0.0)
            s = tl.dot(q, k, input_precision=PRECISION) * qk_scale
            s = tl.where(mask_n[None, :], s, float("-inf"))
            # The first tile's key 0 is visible to every row, so m_new is finite from the first iteration.
            p, alpha, m_i, l_i = online_softmax_step(s, m_i, l_i)
            v = tl.load(vc_head + v_tok[:, None] + offs_d[None, :],
                        mask=mask_n[:, None] & mask_d[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)

        # The chunk itself, causal; tiles past this block's last query are fully masked, so stop there.
        hi = tl.minimum(qlen, (mblk + 1) * BLOCK_M)
        for start in range(0, hi, BLOCK_N):
            n = start + offs_n
            mask_n = n < qlen
            kv_rows = (q_start + n).to(tl.int64)
            k_tok = kv_rows * stride_kt
            v_tok = kv_rows * stride_vt
            if VEC > 1:
                k_tok = tl.multiple_of(k_tok, VEC)
                v_tok = tl.multiple_of(v_tok, VEC)
            k = tl.load(k_head + k_tok[None, :] + offs_d[:, None],
                        mask=mask_n[None, :] & mask_d[:, None], other=0.0)
            s = tl.dot(q, k, input_precision=PRECISION) * qk_scale
            visible = mask_n[None, :] & (n[None, :] <= offs_m[:, None])
            s = tl.where(visible, s, float("-inf"))
            # Key n=0 of the first chunk tile is visible to every row, so no row's max stays -inf.
            p, alpha, m_i, l_i = online_softmax_step(s, m_i, l_i)
            v = tl.load(v_head + v_tok[:, None] + offs_d[None, :],
                        mask=mask_n[:, None] & mask_d[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)

        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(o_head + o_row[:, None] + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


def _launch_config(dtype: torch.dtype) -> dict:
    """Tile sizes per input dtype: fp32 tiles take twice the registers/shared memory, so they are halved."""
    if dtype == torch.float32:
        return {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
    return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2}


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs must not silently drop to TF32; for fp16/bf16 operands the setting is moot.
    return "ieee" if dtype == torch.float32 else "tf32"


def _check(q, k, v, cu_seqlens_q, k_cache, v_cache, block_tables, context_lens):
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"q must be (tokens, num_heads, head_dim), k and v (tokens, num_kv_heads, head_dim); got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(f"k {tuple(k.shape)} does not match q {tuple(q.shape)} in tokens/head_dim")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"num_heads {q.shape[1]} must be a multiple of num_kv_heads {k.shape[1]}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"dtype mismatch: q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if cu_seqlens_q.dim() != 1 or cu_seqlens_q.shape[0] < 1 or cu_seqlens_q.dtype != torch.int32:
        raise ValueError(f"cu_seqlens_q must be (batch + 1,) int32, got {tuple(cu_seqlens_q.shape)} {cu_seqlens_q.dtype}")
    batch = cu_seqlens_q.shape[0] - 1
    cache_args = (k_cache, v_cache, block_tables, context_lens)
    if all(a is None for a in cache_args):
        return batch
    if any(a is None for a in cache_args):
        raise ValueError("k_cache, v_cache, block_tables and context_lens must be given together (or none)")
    _check_paged(q.shape[1], q.shape[2], k_cache, v_cache, block_tables, context_lens, batch, q.dtype)
    if k_cache.shape[2] != k.shape[1]:
        raise ValueError(f"cache num_kv_heads {k_cache.shape[2]} != k's {k.shape[1]}")
    return batch


def prefill_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                             k_cache: torch.Tensor | None = None, v_cache: torch.Tensor | None = None,
                             block_tables: torch.Tensor | None = None, context_lens: torch.Tensor | None = None,
                             scale: float | None = None, max_seqlen_q: int | None = None) -> torch.Tensor:
    """Triton launcher for :func:`prefill_attention` (same arguments)."""
    batch = _check(q, k, v, cu_seqlens_q, k_cache, v_cache, block_tables, context_lens)
    _check_triton_strides(q=q, k=k, v=v)
    if not cu_seqlens_q.is_contiguous():
        raise ValueError("cu_seqlens_q must be contiguous")
    tokens, num_heads, head_dim = q.shape
    # Rows past cu_seqlens_q[-1] (bucket padding) are never written by the kernel: keep them defined.
    out = torch.zeros_like(q)
    if batch == 0 or tokens == 0 or num_heads == 0:
        return out
    if k_cache is None:
        # Plain causal varlen attention: context = the chunk, and the page loop runs zero times.
        context_lens = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).to(torch.int32)
        k_cache, v_cache = k.unsqueeze(1), v.unsqueeze(1)
        block_tables = torch.zeros((batch, 1), dtype=torch.int32, device=q.device)
    else:
        _check_triton_strides(k_cache=k_cache, v_cache=v_cache, block_tables=block_tables)
        if not context_lens.is_contiguous():
            raise ValueError("context_lens must be contiguous")
    if max_seqlen_q is None:
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())  # host sync: prefill is eager
    if max_seqlen_q <= 0:
        return out
    group = num_heads // k.shape[1]
    scale = head_dim ** -0.5 if scale is None else float(scale)
    cfg = _launch_config(q.dtype)
    vec = _vec(q.dtype, (q, k, v, k_cache, v_cache, out),
               q.stride()[:2] + k.stride()[:2] + v.stride()[:2] + k_cache.stride()[:3] + v_cache.stride()[:3]
               + out.stride()[:2])
    grid = (triton.cdiv(max_seqlen_q, cfg["BLOCK_M"]), batch, num_heads)
    _prefill_kernel[grid](
        q, k, v, cu_seqlens_q, k_cache, v_cache, block_tables, context_lens, out,
        scale * _LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        group, k_cache.shape[1],
        HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), PRECISION=_precision(q.dtype), VEC=vec, **cfg,
    )
    return out


def _sequences(batch, k, v, cu_seqlens_q, k_cache, v_cache, block_tables, context_lens):
    """Per non-empty sequence of the torch paths: (lo, hi, prefix, keys, values) with the earlier context
    gathered from the pages ahead of the chunk's own k/v (keys/values: (prefix + hi - lo, kv_heads, d))."""
    cu = cu_seqlens_q.tolist()
    for b in range(batch):
        lo, hi = cu[b], cu[b + 1]
        if hi <= lo:
            continue
        prefix = 0 if k_cache is None else int(context_lens[b]) - (hi - lo)
        if prefix < 0:
            raise ValueError(f"context_lens[{b}] = {prefix + hi - lo} is shorter than its {hi - lo} new tokens")
        keys, values = k[lo:hi], v[lo:hi]
        if prefix > 0:
            keys = torch.cat([gather_pages(k_cache, block_tables[b], prefix), keys])
            values = torch.cat([gather_pages(v_cache, block_tables[b], prefix), values])
        yield lo, hi, prefix, keys, values


def prefill_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                          k_cache: torch.Tensor | None = None, v_cache: torch.Tensor | None = None,
                          block_tables: torch.Tensor | None = None, context_lens: torch.Tensor | None = None,
                          scale: float | None = None, max_seqlen_q: int | None = None,
                          upcast: bool = True) -> torch.Tensor:
    """Plain-PyTorch :func:`prefill_attention`: per sequence, earlier context gathered from the pages plus the
    chunk's own k/v, causal. ``upcast=False`` computes in the input dtype (same-dtype baseline)."""
    batch = _check(q, k, v, cu_seqlens_q, k_cache, v_cache, block_tables, context_lens)
    head_dim = q.shape[2]
    scale = head_dim ** -0.5 if scale is None else float(scale)
    out = torch.zeros_like(q)
    for lo, hi, prefix, keys, values in _sequences(batch, k, v, cu_seqlens_q, k_cache, v_cache, block_tables,
                                                   context_lens):
        q_pos = prefix + torch.arange(hi - lo, device=q.device)
        out[lo:hi] = attention_ref(q[lo:hi], keys, values, q_pos, scale, upcast)
    return out


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                      k_cache: torch.Tensor | None = None, v_cache: torch.Tensor | None = None,
                      block_tables: torch.Tensor | None = None, context_lens: torch.Tensor | None = None,
                      scale: float | None = None, max_seqlen_q: int | None = None) -> torch.Tensor:
    """Causal attention for a packed batch of new-token chunks, each at the end of its (paged) context.

    q: (tokens, num_heads, head_dim); k, v: (tokens, num_kv_heads, head_dim), the chunk's own K/V (already
    written to the pages); all three may be strided slices of a fused qkv tensor with contiguous head_dim.
    cu_seqlens_q: (batch + 1,) int32 token offsets; k_cache, v_cache: (num_blocks, block_size, num_kv_heads,
    head_dim); block_tables: (batch, max_blocks_per_seq) int32; context_lens: (batch,) int32 counting earlier
    context plus the chunk. Without the cache arguments it is plain causal varlen attention over each chunk.
    max_seqlen_q: host-side max chunk length (sizes the grid; computed with a host sync if omitted).
    Returns (tokens, num_heads, head_dim) in q's dtype; rows past cu_seqlens_q[-1] are zero.
    """
    if use_triton(q, k, v, cu_seqlens_q):
        return prefill_attention_triton(q, k, v, cu_seqlens_q, k_cache, v_cache, block_tables, context_lens,
                                        scale, max_seqlen_q)
    return prefill_attention_sdpa(q, k, v, cu_seqlens_q, k_cache, v_cache, block_tables, context_lens, scale)


def prefill_attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                           k_cache: torch.Tensor | None = None, v_cache: torch.Tensor | None = None,
                           block_tables: torch.Tensor | None = None, context_lens: torch.Tensor | None = None,
                           scale: float | None = None, block_q: int = 512) -> torch.Tensor:
    """The torch path of :func:`prefill_attention` (same arguments): per sequence, torch SDPA over blocks of
    ``block_q`` queries, so a 30k-token audio prompt never materialises a (queries × keys) score matrix of
    gigabytes the way the reference does. Softmax in fp32 for fp32 inputs (SDPA's own precision otherwise)."""
    batch = _check(q, k, v, cu_seqlens_q, k_cache, v_cache, block_tables, context_lens)
    head_dim = q.shape[2]
    scale = head_dim ** -0.5 if scale is None else float(scale)
    group = q.shape[1] // k.shape[1]
    out = torch.zeros_like(q)
    for lo, hi, prefix, keys, values in _sequences(batch, k, v, cu_seqlens_q, k_cache, v_cache, block_tables,
                                                   context_lens):
        # (heads, n, d) layouts; GQA by repeating K/V heads (enable_gqa is not on every torch we support)
        kh = keys.transpose(0, 1).repeat_interleave(group, dim=0)
        vh = values.transpose(0, 1).repeat_interleave(group, dim=0)
        key_pos = torch.arange(keys.shape[0], device=q.device)
        for start in range(lo, hi, block_q):
            end = min(start + block_q, hi)
            q_pos = prefix + torch.arange(start - lo, end - lo, device=q.device)
            visible = key_pos[None, :] <= q_pos[:, None]
            out[start:end] = torch.nn.functional.scaled_dot_product_attention(
                q[start:end].transpose(0, 1), kh, vh, attn_mask=visible, scale=scale).transpose(0, 1)
    return out


_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _spec(dtype: torch.dtype, head_dim: int) -> KernelSpec:
    t = _TRITON_DTYPE[dtype]
    sig = {"q_ptr": f"*{t}", "k_ptr": f"*{t}", "v_ptr": f"*{t}", "cu_seqlens_ptr": "*i32",
           "k_cache_ptr": f"*{t}", "v_cache_ptr": f"*{t}", "block_tables_ptr": "*i32", "context_lens_ptr": "*i32",
           "out_ptr": f"*{t}", "qk_scale": "fp32"}
    for name in ("stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh",
                 "stride_kcb", "stride_kcs", "stride_kch", "stride_vcb", "stride_vcs", "stride_vch",
                 "stride_bt", "stride_ot", "stride_oh", "group", "block_size"):
        sig[name] = "i32"
    cfg = _launch_config(dtype)
    return KernelSpec(name=f"prefill_attention_{t}_d{head_dim}", fn=_prefill_kernel, signature=sig,
                      constexprs={"HEAD_DIM": head_dim, "BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"],
                                  "BLOCK_D": _block_d(head_dim), "PRECISION": _precision(dtype),
                                  "VEC": 16 // dtype.itemsize},
                      num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


# bf16 / fp16 at the released head_dim 128; fp32 for the small (64) and tiny (16) test models.
COMPILE_SPECS = [_spec(torch.bfloat16, 128), _spec(torch.float16, 128), _spec(torch.float32, 64),
                 _spec(torch.float32, 16)]
