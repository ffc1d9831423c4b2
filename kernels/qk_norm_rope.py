"""The attention front in one launch: per-head RMSNorm of q and k, rotary embedding of both, and the new K/V
rows written into the paged KV cache — instead of two norms (7 ATen ops each unfused), ten rotary ops and the
cache scatter.

    q' = rope(rmsnorm(q) · w_q),  k' = rope(rmsnorm(k) · w_k),  cache[slot] = (k', v)
    rope(x) = x · cos + rotate_half(x) · sin,   rotate_half([x1, x2]) = [-x2, x1]

cos/sin are the decoder's rotary tables ``(tokens, head_dim)`` (``models.layers.Rotary``: 1-D or interleaved
M-RoPE from float positions, computed once per forward and shared by every layer). Rounding follows the
reference op by op: the norm's normalised value and product, then each rotary product and the sum, in the
activation dtype. One program per token (a static grid); a negative slot skips the cache write (graph padding).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import KernelSpec, graph_safe_enabled, use_triton
from .kv_write import kv_write_ref, kv_write_static
from .rms_norm import rms_norm_ref

__all__ = ["qk_norm_rope", "qk_norm_rope_triton", "qk_norm_rope_ref", "COMPILE_SPECS"]


@triton.jit
def _norm_rope(x_ptr, stride_h, w_ptr, c1, c2, s1, s2, offs_h, offs_d, mask, HALF: tl.constexpr, eps):
    """Rows (heads) of one token: RMSNorm over the full head_dim then rotary; halves [x1 | x2] kept apart."""
    p = x_ptr + offs_h[:, None] * stride_h + offs_d[None, :]
    x1 = tl.load(p, mask=mask, other=0.0)
    x2 = tl.load(p + HALF, mask=mask, other=0.0)
    dt = x1.dtype
    h1 = x1.to(tl.float32)
    h2 = x2.to(tl.float32)
    var = (tl.sum(h1 * h1, axis=1) + tl.sum(h2 * h2, axis=1)) / (2 * HALF)
    rstd = tl.math.rsqrt(var + eps)[:, None]
    dmask = offs_d < HALF
    w1 = tl.load(w_ptr + offs_d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    w2 = tl.load(w_ptr + HALF + offs_d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    y1 = (w1 * (h1 * rstd).to(dt).to(tl.float32)).to(dt).to(tl.float32)
    y2 = (w2 * (h2 * rstd).to(dt).to(tl.float32)).to(dt).to(tl.float32)
    o1 = ((y1 * c1).to(dt).to(tl.float32) + (-y2 * s1).to(dt).to(tl.float32)).to(dt)
    o2 = ((y2 * c2).to(dt).to(tl.float32) + (y1 * s2).to(dt).to(tl.float32)).to(dt)
    return o1, o2


@triton.jit
def _qk_norm_rope_kernel(
    q_ptr, k_ptr, v_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr,
    k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ct, stride_st,
    stride_qot, stride_qoh, stride_kot, stride_koh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    n_q_heads, n_kv_heads, block_size, cos_rows, eps,
    HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr,
    WRITE_KV: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    ct = t % cos_rows   # token rows may repeat a shorter table (batch-major rows at the same positions)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HALF
    c1 = tl.load(cos_ptr + ct * stride_ct + offs_d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(cos_ptr + ct * stride_ct + HALF + offs_d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(sin_ptr + ct * stride_st + offs_d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(sin_ptr + ct * stride_st + HALF + offs_d, mask=dmask, other=0.0).to(tl.float32)[None, :]

    offs_q = tl.arange(0, BLOCK_HQ)
    qmask = (offs_q[:, None] < n_q_heads) & dmask[None, :]
    o1, o2 = _norm_rope(q_ptr + t * stride_qt, stride_qh, qw_ptr, c1, c2, s1, s2, offs_q, offs_d, qmask, HALF, eps)
    qo = q_out_ptr + t * stride_qot + offs_q[:, None] * stride_qoh + offs_d[None, :]
    tl.store(qo, o1, mask=qmask)
    tl.store(qo + HALF, o2, mask=qmask)

    offs_k = tl.arange(0, BLOCK_HK)
    kmask = (offs_k[:, None] < n_kv_heads) & dmask[None, :]
    k1, k2 = _norm_rope(k_ptr + t * stride_kt, stride_kh, kw_ptr, c1, c2, s1, s2, offs_k, offs_d, kmask, HALF, eps)
    ko = k_out_ptr + t * stride_kot + offs_k[:, None] * stride_koh + offs_d[None, :]
    tl.store(ko, k1, mask=kmask)
    tl.store(ko + HALF, k2, mask=kmask)
    if WRITE_KV:
        slot = tl.load(slot_ptr + t).to(tl.int64)
        page = slot // block_size
        row = slot % block_size
        heads = tl.where(slot >= 0, n_kv_heads, 0)   # a skipped token: an empty head range
        wmask = (offs_k[:, None] < heads) & dmask[None, :]
        vp = v_ptr + t * stride_vt + offs_k[:, None] * stride_vh + offs_d[None, :]
        v1 = tl.load(vp, mask=wmask)
        v2 = tl.load(vp + HALF, mask=wmask)
        kc = k_cache_ptr + page * stride_kcb + row * stride_kcs + offs_k[:, None] * stride_kch + offs_d[None, :]
        vc = v_cache_ptr + page * stride_vcb + row * stride_vcs + offs_k[:, None] * stride_vch + offs_d[None, :]
        tl.store(kc, k1, mask=wmask)
        tl.store(kc + HALF, k2, mask=wmask)
        tl.store(vc, v1, mask=wmask)
        tl.store(vc + HALF, v2, mask=wmask)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _check(q, k, v, q_weight, k_weight, cos, sin, kv_cache, slot_mapping):
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"q must be (tokens, heads, head_dim) and k, v (tokens, kv_heads, head_dim), got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    t, _, d = q.shape
    if k.shape[0] != t or k.shape[2] != d or d % 2:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} need equal tokens and an even head_dim")
    if q_weight.shape != (d,) or k_weight.shape != (d,):
        raise ValueError(f"q_weight/k_weight must be ({d},), got {tuple(q_weight.shape)}, {tuple(k_weight.shape)}")
    if cos.dim() != 2 or cos.shape != sin.shape or cos.shape[1] != d or not (
            cos.shape[0] == t or (cos.shape[0] > 0 and t % cos.shape[0] == 0)):
        raise ValueError(f"cos/sin must be (tokens={t} or a divisor of it, head_dim={d}), got {tuple(cos.shape)}, "
                         f"{tuple(sin.shape)}")
    if (kv_cache is None) != (slot_mapping is None):
        raise ValueError("kv_cache and slot_mapping go together")


def qk_norm_rope_ref(q, k, v, q_weight, k_weight, eps, cos, sin, kv_cache=None, slot_mapping=None):
    """The unfused ops (the CPU path and the tests' truth): returns (q', k'); writes (k', v) to the cache."""
    _check(q, k, v, q_weight, k_weight, cos, sin, kv_cache, slot_mapping)
    q = rms_norm_ref(q, q_weight, eps)
    k = rms_norm_ref(k, k_weight, eps)
    if cos.shape[0] != q.shape[0]:   # a table for one sequence, repeated over batch-major rows
        reps = q.shape[0] // cos.shape[0]
        cos, sin = cos.repeat(reps, 1), sin.repeat(reps, 1)
    c, s = cos[:, None], sin[:, None]
    q = q * c + _rotate_half(q) * s
    k = k * c + _rotate_half(k) * s
    if kv_cache is not None:
        (kv_write_static if graph_safe_enabled() else kv_write_ref)(k, v, kv_cache[0], kv_cache[1], slot_mapping)
    return q, k


def qk_norm_rope_triton(q, k, v, q_weight, k_weight, eps, cos, sin, kv_cache=None, slot_mapping=None):
    """Triton launcher for :func:`qk_norm_rope` (same arguments and results)."""
    _check(q, k, v, q_weight, k_weight, cos, sin, kv_cache, slot_mapping)
    tokens, heads, d = q.shape
    kv_heads = k.shape[1]
    for name, x in (("q", q), ("k", k), ("v", v), ("cos", cos), ("sin", sin)):
        if x.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension, got strides {x.stride()}")
    q_out = torch.empty((tokens, heads, d), dtype=q.dtype, device=q.device)
    k_out = torch.empty((tokens, kv_heads, d), dtype=k.dtype, device=k.device)
    if tokens == 0:
        return q_out, k_out
    write = kv_cache is not None
    if write:
        k_cache, v_cache = kv_cache
        if k_cache.shape[2:] != (kv_heads, d) or v_cache.shape != k_cache.shape or k_cache.dtype != k.dtype:
            raise ValueError(f"caches must be (blocks, block_size, {kv_heads}, {d}) {k.dtype}, got "
                             f"{tuple(k_cache.shape)} {k_cache.dtype}")
        if slot_mapping.shape != (tokens,) or not slot_mapping.is_contiguous():
            raise ValueError(f"slot_mapping must be contiguous ({tokens},), got {tuple(slot_mapping.shape)}")
    else:
        k_cache = v_cache = k_out
        slot_mapping = torch.empty(1, dtype=torch.int64, device=q.device)
    kcs = k_cache.stride() if write else (0, 0, 0, 1)
    vcs = v_cache.stride() if write else (0, 0, 0, 1)
    half = d // 2
    _qk_norm_rope_kernel[(tokens,)](
        q, k, v, q_weight, k_weight, cos, sin, q_out, k_out, k_cache, v_cache, slot_mapping,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0), sin.stride(0),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
        kcs[0], kcs[1], kcs[2], vcs[0], vcs[1], vcs[2],
        heads, kv_heads, k_cache.shape[1] if write else 1, cos.shape[0], float(eps),
        HALF=half, BLOCK_HQ=triton.next_power_of_2(heads), BLOCK_HK=triton.next_power_of_2(kv_heads),
        BLOCK_D=triton.next_power_of_2(half), WRITE_KV=write, num_warps=_num_warps(heads * d))
    return q_out, k_out


def _num_warps(elems: int) -> int:
    return 4 if elems >= 2048 else (2 if elems >= 512 else 1)


def qk_norm_rope(q, k, v, q_weight, k_weight, eps, cos, sin, kv_cache=None, slot_mapping=None):
    """Per-head RMSNorm + rotary of q and k, and (with ``kv_cache``) the paged K/V write, in one op.

    q: (tokens, heads, head_dim); k, v: (tokens, kv_heads, head_dim) — contiguous head_dim, any token/head
    strides (views of a fused qkv projection); q_weight, k_weight: (head_dim,); cos, sin: (tokens, head_dim) in
    the activation dtype (or (T, head_dim) with tokens = B·T batch-major rows: row r uses table row r % T);
    kv_cache: (k_cache, v_cache) pages (blocks, block_size, kv_heads, head_dim) and
    slot_mapping (tokens,) int64 (negative = skip). Returns (q', k') contiguous.
    """
    tensors = (q, k, v, q_weight, k_weight, cos, sin)
    if use_triton(*tensors):
        return qk_norm_rope_triton(q, k, v, q_weight, k_weight, eps, cos, sin, kv_cache, slot_mapping)
    return qk_norm_rope_ref(q, k, v, q_weight, k_weight, eps, cos, sin, kv_cache, slot_mapping)


def _spec(dtype: str, heads: int, kv_heads: int, head_dim: int, write: bool) -> KernelSpec:
    sig = {n: f"*{dtype}" for n in ("q_ptr", "k_ptr", "v_ptr", "qw_ptr", "kw_ptr", "cos_ptr", "sin_ptr",
                                    "q_out_ptr", "k_out_ptr", "k_cache_ptr", "v_cache_ptr")}
    sig["slot_ptr"] = "*i64"
    sig["eps"] = "fp32"
    for n in ("stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh", "stride_ct",
              "stride_st", "stride_qot", "stride_qoh", "stride_kot", "stride_koh", "stride_kcb", "stride_kcs",
              "stride_kch", "stride_vcb", "stride_vcs", "stride_vch", "n_q_heads", "n_kv_heads", "block_size",
              "cos_rows"):
        sig[n] = "i32"
    half = head_dim // 2
    return KernelSpec(name=f"qk_norm_rope_{dtype}_h{heads}_kv{kv_heads}_d{head_dim}{'_kv' if write else ''}",
                      fn=_qk_norm_rope_kernel, signature=sig,
                      constexprs={"HALF": half, "BLOCK_HQ": triton.next_power_of_2(heads),
                                  "BLOCK_HK": triton.next_power_of_2(kv_heads),
                                  "BLOCK_D": triton.next_power_of_2(half), "WRITE_KV": write},
                      num_warps=_num_warps(heads * head_dim), num_stages=1)


# Thinker 32 q / 4 kv heads, talker 16 / 2, code predictor 16 / 8, all head_dim 128 (bf16, fp16); the fp32 test
# models (tiny 4 / 2 x 16, small 8 / 2 x 64).
COMPILE_SPECS = [
    _spec("bf16", 32, 4, 128, True), _spec("bf16", 16, 2, 128, True), _spec("bf16", 16, 8, 128, True),
    _spec("bf16", 16, 8, 128, False), _spec("fp16", 32, 4, 128, True), _spec("fp32", 4, 2, 16, True),
    _spec("fp32", 8, 2, 64, True),
]
