"""Write new K/V rows into the paged KV cache through a slot mapping.

Page layout (shared with the KV-cache pool): ``k_cache, v_cache: (num_blocks, block_size, kv_heads, head_dim)``;
token ``t`` goes to page ``slot // block_size``, row ``slot % block_size`` with ``slot = slot_mapping[t]``;
a negative slot skips the token (padding in a CUDA-graph batch bucket).

The kernel is graph-safe: one program per token (a static grid), the skip decision is read on the device.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import KernelSpec, graph_safe_enabled, use_triton

__all__ = ["kv_write", "kv_write_triton", "kv_write_ref", "kv_write_static", "COMPILE_SPECS"]


@triton.jit
def _kv_write_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch,
    stride_vcb, stride_vcs, stride_vch,
    num_kv_heads, block_size,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    # Split the slot instead of indexing with slot * stride_s: the page tensors may be strided views of a
    # bigger pool, so the block stride need not equal block_size * row stride.
    page = slot // block_size
    row = slot % block_size
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    # A skipped token (negative slot) gets an empty head range rather than a scalar term in the mask.
    heads = tl.where(slot >= 0, num_kv_heads, 0)
    mask = (offs_h[:, None] < heads) & (offs_d[None, :] < HEAD_DIM)
    t64 = t.to(tl.int64)
    k = tl.load(k_ptr + t64 * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(v_ptr + t64 * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    kc = k_cache_ptr + page * stride_kcb + row * stride_kcs
    vc = v_cache_ptr + page * stride_vcb + row * stride_vcs
    tl.store(kc + offs_h[:, None] * stride_kch + offs_d[None, :], k, mask=mask)
    tl.store(vc + offs_h[:, None] * stride_vch + offs_d[None, :], v, mask=mask)


def _check(k, v, k_cache, v_cache, slot_mapping):
    if k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"k, v must both be (tokens, kv_heads, head_dim), got {tuple(k.shape)} and {tuple(v.shape)}")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError("k_cache, v_cache must both be (num_blocks, block_size, kv_heads, head_dim), got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if k_cache.shape[2:] != k.shape[1:]:
        raise ValueError(f"cache (kv_heads, head_dim) {tuple(k_cache.shape[2:])} != k's {tuple(k.shape[1:])}")
    if slot_mapping.shape != (k.shape[0],) or slot_mapping.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"slot_mapping must be ({k.shape[0]},) int64/int32, got {tuple(slot_mapping.shape)} "
                         f"{slot_mapping.dtype}")
    if not (k.dtype == v.dtype == k_cache.dtype == v_cache.dtype):
        raise ValueError(f"dtype mismatch: k {k.dtype}, v {v.dtype}, k_cache {k_cache.dtype}, v_cache {v_cache.dtype}")


def kv_write_triton(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor) -> None:
    """Triton launcher for :func:`kv_write` (same arguments); writes the caches in place."""
    _check(k, v, k_cache, v_cache, slot_mapping)
    for name, t in (("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in head_dim (stride(-1) == 1), got strides {t.stride()}")
    if not slot_mapping.is_contiguous():
        raise ValueError("slot_mapping must be contiguous")
    tokens, kv_heads, head_dim = k.shape
    if tokens == 0:
        return
    _kv_write_kernel[(tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        kv_heads, k_cache.shape[1],
        HEAD_DIM=head_dim, BLOCK_H=triton.next_power_of_2(kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=_num_warps(kv_heads * head_dim),
    )


def _num_warps(elems: int) -> int:
    return 4 if elems >= 1024 else (2 if elems >= 256 else 1)


def kv_write_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    """Plain-PyTorch :func:`kv_write`: ``cache[slot // block_size, slot % block_size] = k[t]`` for slot >= 0."""
    _check(k, v, k_cache, v_cache, slot_mapping)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    block_size = k_cache.shape[1]
    pages, rows = slots // block_size, slots % block_size
    k_cache[pages, rows] = k[keep]
    v_cache[pages, rows] = v[keep]


def kv_write_static(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor) -> None:
    """Static-shape :func:`kv_write` (traces with ``fullgraph=True``, no boolean indexing): same result as the
    reference. Every token scatters; a skipped token (negative slot) is redirected to the first kept token's
    slot with that token's values (or, with no kept token, to slot 0 with its current values), so positions
    written twice always receive identical values and the scatter stays deterministic."""
    _check(k, v, k_cache, v_cache, slot_mapping)
    if k.shape[0] == 0:
        return
    block_size = k_cache.shape[1]
    slots = slot_mapping.long()
    keep = slots >= 0
    # The first kept token, as a (1,) index (argmax returns the first maximum; a 0-d index would be a host read).
    first = keep.to(torch.int32).argmax(dim=0, keepdim=True)
    any_kept = keep.any()
    target = torch.where(any_kept, slots.index_select(0, first), torch.zeros_like(first))
    slots = torch.where(keep, slots, target)
    pages, rows = slots // block_size, slots % block_size
    for src, cache in ((k, k_cache), (v, v_cache)):
        fill = torch.where(any_kept, src.index_select(0, first), cache[:1, 0])
        vals = torch.where(keep[:, None, None], src, fill)
        cache.index_put_((pages, rows), vals)


def kv_write(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Scatter new K/V rows into the page tensors, in place.

    k, v: (tokens, kv_heads, head_dim), any token/head strides with a contiguous head_dim (e.g. slices of a
    fused qkv projection output); k_cache, v_cache: (num_blocks, block_size, kv_heads, head_dim), same dtype;
    slot_mapping: (tokens,) int64 with slot = block * block_size + offset, negative = skip the token.
    """
    if use_triton(k, v, k_cache, v_cache, slot_mapping):
        kv_write_triton(k, v, k_cache, v_cache, slot_mapping)
    elif graph_safe_enabled():
        kv_write_static(k, v, k_cache, v_cache, slot_mapping)
    else:
        kv_write_ref(k, v, k_cache, v_cache, slot_mapping)


_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _spec(dtype: str, kv_heads: int, head_dim: int) -> KernelSpec:
    sig = {"k_ptr": f"*{dtype}", "v_ptr": f"*{dtype}", "k_cache_ptr": f"*{dtype}", "v_cache_ptr": f"*{dtype}",
           "slot_ptr": "*i64"}
    for name in ("stride_kt", "stride_kh", "stride_vt", "stride_vh", "stride_kcb", "stride_kcs", "stride_kch",
                 "stride_vcb", "stride_vcs", "stride_vch", "num_kv_heads", "block_size"):
        sig[name] = "i32"
    return KernelSpec(name=f"kv_write_{dtype}_h{kv_heads}_d{head_dim}", fn=_kv_write_kernel, signature=sig,
                      constexprs={"HEAD_DIM": head_dim, "BLOCK_H": triton.next_power_of_2(kv_heads),
                                  "BLOCK_D": triton.next_power_of_2(head_dim)},
                      num_warps=_num_warps(kv_heads * head_dim), num_stages=1)


# Thinker (4 kv heads), talker (2) and code predictor (8) at head_dim 128 in bf16/fp16, the small test model
# (2 x 64) and the tiny one (2 x 16) in fp32.
COMPILE_SPECS = [
    _spec("bf16", 4, 128), _spec("fp16", 4, 128), _spec("bf16", 2, 128), _spec("bf16", 8, 128),
    _spec("fp32", 2, 64), _spec("fp32", 2, 16),
]
