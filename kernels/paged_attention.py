"""Paged decode attention: one new query token per sequence against its paged K/V.

Layout (shared with the KV-cache pool): ``k_cache, v_cache: (num_blocks, block_size, kv_heads, head_dim)``;
``block_tables: (batch, max_blocks_per_seq)`` int32 (entries past a sequence's blocks are padding, e.g. -1);
``context_lens: (batch,)`` int32 on the device, counting the current token (its K/V are already written).

Graph safety: the grid is ``(batch, kv_heads, num_partitions)`` with ``num_partitions`` fixed from the shapes
only, and each program loops over its share of the sequence up to the length it reads from ``context_lens``
on the device, so one captured graph serves every context length. With more than one partition (split-K, to
fill the GPU when batch * kv_heads is small) each program writes an unnormalised partial (acc, running max,
running sum) and a second kernel merges them; no float atomics, so results are deterministic.

One program serves all ``num_heads // num_kv_heads`` query heads of one kv head, so each K/V tile is read once
per sequence; the query group is padded to 16 rows because ``tl.dot`` needs M >= 16.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import KernelSpec, graph_safe_enabled, use_triton
from ._online_softmax import online_softmax_step

__all__ = ["paged_decode_attention", "paged_decode_attention_triton", "paged_decode_attention_ref",
           "paged_decode_attention_static",
           "gather_pages", "attention_ref", "COMPILE_SPECS"]

_LOG2E = 1.4426950408889634


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr,
    out_ptr, part_acc_ptr, part_ml_ptr,
    qk_scale,
    stride_qb, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_bt,
    stride_ob, stride_oh,
    group, block_size,
    HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SPLIT: tl.constexpr, PRECISION: tl.constexpr, VEC: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    part = tl.program_id(2)
    num_parts = tl.num_programs(2)
    num_heads = tl.num_programs(1) * group

    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_g = offs_g < group
    mask_d = offs_d < HEAD_DIM
    heads = kvh * group + offs_g

    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=mask_g[:, None] & mask_d[None, :], other=0.0)

    ctx = tl.load(context_lens_ptr + b)
    num_tiles = tl.cdiv(ctx, BLOCK_N)
    tiles_per_part = tl.cdiv(num_tiles, num_parts)
    lo = part * tiles_per_part
    hi = tl.minimum(lo + tiles_per_part, num_tiles)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    bt_row = block_tables_ptr + b.to(tl.int64) * stride_bt
    k_head = k_cache_ptr + kvh * stride_kh
    v_head = v_cache_ptr + kvh * stride_vh
    if VEC > 1:
        k_head = tl.multiple_of(k_head, 16)
        v_head = tl.multiple_of(v_head, 16)
    for tile in range(lo, hi):
        pos = tile * BLOCK_N + offs_n
        mask_n = pos < ctx
        # Table entries past the sequence are padding (-1): only read the ones in range.
        page = tl.load(bt_row + pos // block_size, mask=mask_n, other=0).to(tl.int64)
        row = pos % block_size
        k_tok = page * stride_kb + row * stride_ks
        v_tok = page * stride_vb + row * stride_vs
        if VEC > 1:
            k_tok = tl.multiple_of(k_tok, VEC)
            v_tok = tl.multiple_of(v_tok, VEC)
        k = tl.load(k_head + k_tok[None, :] + offs_d[:, None],
                    mask=mask_n[None, :] & mask_d[:, None], other=0.0)
        s = tl.dot(q, k, input_precision=PRECISION) * qk_scale
        s = tl.where(mask_n[None, :], s, float("-inf"))
        # Every tile in [lo, hi) holds at least one valid key, so m_new is finite and exp2 never sees inf - inf.
        p, alpha, m_i, l_i = online_softmax_step(s, m_i, l_i)
        v = tl.load(v_head + v_tok[:, None] + offs_d[None, :],
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)

    if SPLIT:
        # Partials: acc (batch, heads, parts, head_dim) and (m, l) (batch, heads, parts, 2), fp32. Empty
        # partitions write nothing: the reduce kernel recomputes which partitions are active.
        if lo < hi:
            idx = (b * num_heads + heads) * num_parts + part
            tl.store(part_acc_ptr + idx[:, None] * HEAD_DIM + offs_d[None, :], acc,
                     mask=mask_g[:, None] & mask_d[None, :])
            tl.store(part_ml_ptr + idx * 2, m_i, mask=mask_g)
            tl.store(part_ml_ptr + idx * 2 + 1, l_i, mask=mask_g)
    else:
        # context_lens == 0 leaves l_i == 0: write zeros rather than NaN.
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=mask_g[:, None] & mask_d[None, :])


@triton.jit
def _paged_decode_reduce_kernel(
    part_acc_ptr, part_ml_ptr, context_lens_ptr, out_ptr,
    stride_ob, stride_oh,
    num_parts,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    num_heads = tl.num_programs(1)
    offs_p = tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM

    # Same partitioning as the attention kernel: only partitions that got at least one tile wrote partials.
    ctx = tl.load(context_lens_ptr + b)
    num_tiles = tl.cdiv(ctx, BLOCK_N)
    tiles_per_part = tl.cdiv(num_tiles, num_parts)
    active = tl.cdiv(num_tiles, tl.maximum(tiles_per_part, 1))
    mask_p = offs_p < active

    idx = (b * num_heads + h) * num_parts + offs_p
    m = tl.load(part_ml_ptr + idx * 2, mask=mask_p, other=float("-inf"))
    l = tl.load(part_ml_ptr + idx * 2 + 1, mask=mask_p, other=0.0)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_max)
    l_tot = tl.sum(w * l, 0)
    acc = tl.load(part_acc_ptr + idx[:, None] * HEAD_DIM + offs_d[None, :],
                  mask=mask_p[:, None] & mask_d[None, :], other=0.0)
    out = tl.sum(w[:, None] * acc, 0) / tl.where(l_tot > 0, l_tot, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty), mask=mask_d)


# Launch configuration shared by the launcher and COMPILE_SPECS.
_BLOCK_N = 64
_NUM_WARPS = 4
_NUM_STAGES = 2
_MAX_PARTITIONS = 32
_TARGET_PROGRAMS = 256  # about two waves of programs on a 132-SM H100


def _block_g(group: int) -> int:
    return max(16, triton.next_power_of_2(group))


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs must not silently drop to TF32; for fp16/bf16 operands the setting is moot.
    return "ieee" if dtype == torch.float32 else "tf32"


def _vec(dtype: torch.dtype, tensors, strides) -> int:
    """Elements per 16-byte vector when every base pointer and row stride allows 16-byte loads, else 1.

    The kernels turn this into ``tl.multiple_of`` hints on the gathered page rows: the JIT cannot infer the
    alignment of a row found through the block table, and without it each element is a scalar load.
    """
    vec = 16 // dtype.itemsize
    if all(t.data_ptr() % 16 == 0 for t in tensors) and all(s % vec == 0 for s in strides):
        return vec
    return 1


def default_num_partitions(batch: int, num_kv_heads: int) -> int:
    """Split-K factor from the static shapes only (graph-safe): enough programs to fill the GPU."""
    want = triton.cdiv(_TARGET_PROGRAMS, max(1, batch * num_kv_heads))
    return min(_MAX_PARTITIONS, triton.next_power_of_2(want))


def _check_paged(q_heads: int, head_dim: int, k_cache, v_cache, block_tables, context_lens, batch: int,
                 dtype: torch.dtype) -> None:
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError("k_cache, v_cache must both be (num_blocks, block_size, kv_heads, head_dim), got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"cache head_dim {k_cache.shape[3]} != query head_dim {head_dim}")
    if q_heads % kv_heads != 0:
        raise ValueError(f"num_heads {q_heads} must be a multiple of num_kv_heads {kv_heads}")
    if k_cache.dtype != dtype or v_cache.dtype != dtype:
        raise ValueError(f"dtype mismatch: q {dtype}, k_cache {k_cache.dtype}, v_cache {v_cache.dtype}")
    if block_tables.dim() != 2 or block_tables.shape[0] != batch or block_tables.dtype != torch.int32:
        raise ValueError(f"block_tables must be ({batch}, max_blocks_per_seq) int32, got "
                         f"{tuple(block_tables.shape)} {block_tables.dtype}")
    if context_lens.shape != (batch,) or context_lens.dtype != torch.int32:
        raise ValueError(f"context_lens must be ({batch},) int32, got {tuple(context_lens.shape)} {context_lens.dtype}")


def _check_triton_strides(**tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim (stride(-1) == 1), got strides {t.stride()}")


def paged_decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                  block_tables: torch.Tensor, context_lens: torch.Tensor,
                                  scale: float | None = None, num_partitions: int | None = None,
                                  out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton launcher for :func:`paged_decode_attention`; ``num_partitions`` overrides the split-K factor."""
    if q.dim() != 3:
        raise ValueError(f"q must be (batch, num_heads, head_dim), got {tuple(q.shape)}")
    batch, num_heads, head_dim = q.shape
    _check_paged(num_heads, head_dim, k_cache, v_cache, block_tables, context_lens, batch, q.dtype)
    _check_triton_strides(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables)
    if not context_lens.is_contiguous():
        raise ValueError("context_lens must be contiguous")
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} with stride(-1) == 1")
    if batch == 0 or num_heads == 0:
        return out
    kv_heads = k_cache.shape[2]
    group = num_heads // kv_heads
    scale = head_dim ** -0.5 if scale is None else float(scale)
    parts = default_num_partitions(batch, kv_heads) if num_partitions is None else int(num_partitions)
    if parts < 1:
        raise ValueError(f"num_partitions must be >= 1, got {parts}")
    split = parts > 1
    if split:
        part_acc = torch.empty((batch, num_heads, parts, head_dim), dtype=torch.float32, device=q.device)
        part_ml = torch.empty((batch, num_heads, parts, 2), dtype=torch.float32, device=q.device)
    else:
        part_acc = part_ml = out  # unused when SPLIT is False
    block_d = _block_d(head_dim)
    vec = _vec(q.dtype, (k_cache, v_cache), k_cache.stride()[:3] + v_cache.stride()[:3])
    _paged_decode_kernel[(batch, kv_heads, parts)](
        q, k_cache, v_cache, block_tables, context_lens, out, part_acc, part_ml,
        scale * _LOG2E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        group, k_cache.shape[1],
        HEAD_DIM=head_dim, BLOCK_G=_block_g(group), BLOCK_N=_BLOCK_N, BLOCK_D=block_d, SPLIT=split,
        PRECISION=_precision(q.dtype), VEC=vec, num_warps=_NUM_WARPS, num_stages=_NUM_STAGES,
    )
    if split:
        _paged_decode_reduce_kernel[(batch, num_heads)](
            part_acc, part_ml, context_lens, out, out.stride(0), out.stride(1), parts,
            HEAD_DIM=head_dim, BLOCK_N=_BLOCK_N, BLOCK_P=triton.next_power_of_2(parts), BLOCK_D=block_d, num_warps=_NUM_WARPS,
        )
    return out


def gather_pages(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` rows of one sequence's pages: cache (num_blocks, block_size, kv_heads, head_dim),
    block_table (max_blocks_per_seq,) -> (length, kv_heads, head_dim)."""
    block_size = cache.shape[1]
    pages = block_table[: triton.cdiv(length, block_size)].long()
    return cache[pages].reshape(-1, *cache.shape[2:])[:length]


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, scale: float,
                  upcast: bool = True) -> torch.Tensor:
    """Masked GQA attention of one sequence: q (m, heads, d) at absolute positions q_pos (m,) against
    k, v (n, kv_heads, d) at positions 0..n-1; a query at position p sees keys 0..p. Returns (m, heads, d)."""
    dtype = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    s = torch.einsum("mhd,nhd->hmn", q, k) * scale
    allowed = torch.arange(k.shape[0], device=q.device)[None, :] <= q_pos[:, None]
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s.float(), dim=-1).to(s.dtype)
    p = torch.nan_to_num(p, nan=0.0)  # a query with no visible key (empty context) outputs zeros
    return torch.einsum("hmn,nhd->mhd", p, v).to(dtype)


def paged_decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, context_lens: torch.Tensor,
                               scale: float | None = None, upcast: bool = True) -> torch.Tensor:
    """Plain-PyTorch :func:`paged_decode_attention`: gather each sequence's pages, attend, loop over the batch.
    ``upcast=False`` computes in the input dtype (the same-dtype torch baseline for error budgets)."""
    if q.dim() != 3:
        raise ValueError(f"q must be (batch, num_heads, head_dim), got {tuple(q.shape)}")
    batch, num_heads, head_dim = q.shape
    _check_paged(num_heads, head_dim, k_cache, v_cache, block_tables, context_lens, batch, q.dtype)
    scale = head_dim ** -0.5 if scale is None else float(scale)
    out = torch.empty_like(q)
    for b in range(batch):
        ctx = int(context_lens[b])
        k = gather_pages(k_cache, block_tables[b], ctx)
        v = gather_pages(v_cache, block_tables[b], ctx)
        q_pos = torch.full((1,), ctx - 1, device=q.device)
        out[b] = attention_ref(q[b:b + 1], k, v, q_pos, scale, upcast)[0]
    return out


def paged_decode_attention_static(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                  block_tables: torch.Tensor, context_lens: torch.Tensor,
                                  scale: float | None = None) -> torch.Tensor:
    """Static-shape :func:`paged_decode_attention` in torch (traces with ``fullgraph=True``): gathers every
    page of the (static-width) block table, masks positions >= context_len, attends in fp32.

    Shapes as :func:`paged_decode_attention`. Padding table entries (-1) read page 0 and are masked; a row
    with context_len 0 (batch padding) outputs zeros, as the reference does.
    """
    if q.dim() != 3:
        raise ValueError(f"q must be (batch, num_heads, head_dim), got {tuple(q.shape)}")
    batch, num_heads, head_dim = q.shape
    _check_paged(num_heads, head_dim, k_cache, v_cache, block_tables, context_lens, batch, q.dtype)
    scale = head_dim ** -0.5 if scale is None else float(scale)
    kv_heads = k_cache.shape[2]
    group = num_heads // kv_heads
    pages = block_tables.long().clamp(min=0)
    width = pages.shape[1] * k_cache.shape[1]
    k = k_cache[pages].reshape(batch, width, kv_heads, head_dim).float()
    v = v_cache[pages].reshape(batch, width, kv_heads, head_dim).float()
    valid = torch.arange(width, device=q.device)[None, :] < context_lens.long()[:, None]  # (batch, width)
    # Masked rows may hold anything (other sequences' pages, never-written slots): zero V so 0 * inf cannot
    # leak a NaN into the output.
    v = v.masked_fill(~valid[:, :, None, None], 0.0)
    qg = q.float().view(batch, kv_heads, group, head_dim)
    s = torch.einsum("bkgd,bnkd->bkgn", qg, k) * scale
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    p = torch.nan_to_num(torch.softmax(s, dim=-1), nan=0.0)  # empty context: zeros, as the reference
    out = torch.einsum("bkgn,bnkd->bkgd", p, v)
    return out.reshape(batch, num_heads, head_dim).to(q.dtype)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor,
                           scale: float | None = None, out: torch.Tensor | None = None,
                           num_partitions: int | None = None) -> torch.Tensor:
    """Single-token attention over paged K/V (the decode step).

    q: (batch, num_heads, head_dim), head_dim contiguous (may be a slice of a fused qkv tensor);
    k_cache, v_cache: (num_blocks, block_size, num_kv_heads, head_dim), num_heads % num_kv_heads == 0;
    block_tables: (batch, max_blocks_per_seq) int32; context_lens: (batch,) int32 on the device, counting the
    current token whose K/V are already in the pages; scale defaults to head_dim ** -0.5;
    out: optional (batch, num_heads, head_dim) buffer (e.g. a CUDA-graph static output); num_partitions:
    the Triton path's split-K factor (default from the shapes; 1 = one launch, for contexts of a tile or two).
    Returns (batch, num_heads, head_dim) in q's dtype. No host sync on the Triton path.
    """
    if use_triton(q, k_cache, v_cache, block_tables, context_lens):
        return paged_decode_attention_triton(q, k_cache, v_cache, block_tables, context_lens, scale,
                                             num_partitions, out=out)
    # The torch path is the vectorised gather-and-mask form: graph-safe, and ~4x faster on CPU than the
    # per-sequence loop of paged_decode_attention_ref, which stays the tests' truth.
    result = paged_decode_attention_static(q, k_cache, v_cache, block_tables, context_lens, scale)
    if out is None:
        return result
    out.copy_(result)
    return out


_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _decode_spec(dtype: torch.dtype, head_dim: int, split: bool) -> KernelSpec:
    t = _TRITON_DTYPE[dtype]
    sig = {"q_ptr": f"*{t}", "k_cache_ptr": f"*{t}", "v_cache_ptr": f"*{t}", "block_tables_ptr": "*i32",
           "context_lens_ptr": "*i32", "out_ptr": f"*{t}",
           "part_acc_ptr": "*fp32" if split else f"*{t}", "part_ml_ptr": "*fp32" if split else f"*{t}",
           "qk_scale": "fp32"}
    for name in ("stride_qb", "stride_qh", "stride_kb", "stride_ks", "stride_kh", "stride_vb", "stride_vs",
                 "stride_vh", "stride_bt", "stride_ob", "stride_oh", "group", "block_size"):
        sig[name] = "i32"
    return KernelSpec(
        name=f"paged_decode_{t}_d{head_dim}_{'split' if split else 'single'}", fn=_paged_decode_kernel,
        signature=sig,
        constexprs={"HEAD_DIM": head_dim, "BLOCK_G": 16, "BLOCK_N": _BLOCK_N, "BLOCK_D": _block_d(head_dim), "SPLIT": split,
                    "PRECISION": _precision(dtype), "VEC": 16 // dtype.itemsize},
        num_warps=_NUM_WARPS, num_stages=_NUM_STAGES)


def _reduce_spec(dtype: torch.dtype, head_dim: int, parts: int) -> KernelSpec:
    t = _TRITON_DTYPE[dtype]
    sig = {"part_acc_ptr": "*fp32", "part_ml_ptr": "*fp32", "context_lens_ptr": "*i32", "out_ptr": f"*{t}",
           "stride_ob": "i32", "stride_oh": "i32", "num_parts": "i32"}
    return KernelSpec(name=f"paged_decode_reduce_{t}_d{head_dim}_p{parts}", fn=_paged_decode_reduce_kernel,
                      signature=sig,
                      constexprs={"HEAD_DIM": head_dim, "BLOCK_N": _BLOCK_N, "BLOCK_P": parts, "BLOCK_D": _block_d(head_dim)},
                      num_warps=_NUM_WARPS, num_stages=1)


# GPU configs: the released model runs bf16 at head_dim 128 (groups 8 / 8 / 2 for thinker / talker / code
# predictor all pad to BLOCK_G 16), fp16 as the alternative half type, fp32 for the small (64) and tiny (16)
# test models. Split-K runs for small batches (32 partitions at batch 1), single-pass for large ones.
COMPILE_SPECS = [
    _decode_spec(torch.bfloat16, 128, True), _decode_spec(torch.bfloat16, 128, False),
    _decode_spec(torch.float16, 128, True), _decode_spec(torch.float32, 64, True),
    _decode_spec(torch.float32, 16, False),
    _reduce_spec(torch.bfloat16, 128, 32), _reduce_spec(torch.bfloat16, 128, 8),
    _reduce_spec(torch.float16, 128, 32), _reduce_spec(torch.float32, 64, 32),
]
