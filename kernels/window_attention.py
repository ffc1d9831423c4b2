"""Sliding-window attention over a rolling key/value window, with the rotary embedding and the window update
fused in: one launch per Code2Wav pre-transformer layer instead of ~19 ATen ops (rotate q and k: 10, cat the
history: 2, build the mask: 6, attention: 1).

Semantics (transformers' ``Qwen3OmniMoeCode2WavAttention`` with a causal sliding window, streamed):

    q, k  = rope(q), rope(k)                    # rotate_half form, each product rounded to the model dtype
    keys  = cat(past_k, k)    values = cat(past_v, v)        # (B, kv_heads, P + n, D), P = window - 1
    key slot j sits at position pos - P + j, query i at pos + i; query i attends to slot j iff
          0 <= kpos(j) <= qpos(i)  and  qpos(i) - kpos(j) < window          (slots before the stream: zeros)
    o     = softmax(q·keysᵀ·scale + mask) · values      (GQA: head h reads kv head h // (heads / kv_heads))
    new_k, new_v = keys[:, :, n:], values[:, :, n:]      # the last P rotated keys / values

Shapes: q (B, n, H, D), k/v (B, n, KV, D) (e.g. views of one fused projection; last dim contiguous), cos/sin
(B, n, D) in the model dtype, past_k/past_v/new_k/new_v (B, KV, P, D) any strides (views of the packed
streaming state; new_* must not overlap past_*), pos (B,) int64. Returns o (B, n, H, D) contiguous.

Kernel: one program per (query block, head, stream). Query block [a, a + BLOCK_Q) needs key slots
[a, a + BLOCK_Q + P), read in BLOCK_K-row pieces from the history for slots < P and from the (rotated on the
fly) new keys for the rest, with an online softmax in fp32. Programs of query block 0 and
the first head of each kv group write that group's new window. Static shapes, no host syncs: graph-safe.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import KernelSpec, use_triton

__all__ = ["window_attention", "window_attention_ref", "COMPILE_SPECS"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _rope_tile(x_ptr, cs_ptr, sn_ptr, rows, rmask, offs_d, D, sxr, scr, HALF: tl.constexpr):
    """(rows x BLOCK_D) tile of rope(x) = x·cos + rotate_half(x)·sin, each product and the sum rounded to the
    model dtype as the reference's separate ops; x rows at x_ptr + rows·sxr, cos/sin rows at + rows·scr."""
    dmask = offs_d < D
    m = rmask[:, None] & dmask[None, :]
    x = tl.load(x_ptr + rows[:, None] * sxr + offs_d[None, :], mask=m, other=0.0)
    # rotate_half(x)[d] = -x[d + D/2] for d < D/2, x[d - D/2] otherwise
    partner = tl.where(offs_d < HALF, offs_d + HALF, offs_d - HALF)
    xr = tl.load(x_ptr + rows[:, None] * sxr + partner[None, :], mask=m, other=0.0)
    xr = tl.where((offs_d < HALF)[None, :], -xr, xr)
    c = tl.load(cs_ptr + rows[:, None] * scr + offs_d[None, :], mask=m, other=0.0)
    s = tl.load(sn_ptr + rows[:, None] * scr + offs_d[None, :], mask=m, other=0.0)
    a = (x.to(tl.float32) * c.to(tl.float32)).to(x.dtype)
    b = (xr.to(tl.float32) * s.to(tl.float32)).to(x.dtype)
    return (a.to(tl.float32) + b.to(tl.float32)).to(x.dtype)


@triton.jit
def _window_attention_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pk_ptr, pv_ptr, pos_ptr, o_ptr, nk_ptr, nv_ptr,
    n, P, D, window, scale,
    sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, scb, scn,
    spkb, spkh, spks, spvb, spvh, spvs, sob, son, soh, snkb, snkh, snks, snvb, snvh, snvs,
    REP: tl.constexpr, HALF: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr,
):
    pid_q = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    g = h // REP
    a = pid_q * BLOCK_Q
    pos = tl.load(pos_ptr + b)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D

    # queries [a, a + BLOCK_Q), rotated
    qi = a + tl.arange(0, BLOCK_Q)
    qmask = qi < n
    q = _rope_tile(q_ptr + b * sqb + h * sqh, cos_ptr + b * scb, sin_ptr + b * scb, qi, qmask, offs_d, D,
                   sqn, scn, HALF)

    # key slots [a, a + BLOCK_Q + P) in BLOCK_K-row pieces with an online softmax: history below P, new
    # (rotated on the fly) keys from P on; small pieces keep the rotary temporaries in registers
    qpos = pos + qi
    m_i = tl.full([BLOCK_Q], -1.0e30, dtype=tl.float32)  # finite: a fully masked piece gives exp(-inf) = 0
    l_i = tl.zeros([BLOCK_Q], dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)
    for kb in range(a, tl.minimum(a + BLOCK_Q + P, P + n), BLOCK_K):
        j = kb + tl.arange(0, BLOCK_K)
        jmask = j < P + n
        old = j < P
        t = tl.where(old, 0, j - P)  # index into the new keys
        km_old = (jmask & old)[:, None] & dmask[None, :]
        k_old = tl.load(pk_ptr + b * spkb + g * spkh + j[:, None] * spks + offs_d[None, :], mask=km_old,
                        other=0.0)
        k_new = _rope_tile(k_ptr + b * skb + g * skh, cos_ptr + b * scb, sin_ptr + b * scb, t, jmask & ~old,
                           offs_d, D, skn, scn, HALF)
        keys = tl.where(old[:, None], k_old, k_new)
        if q_ptr.dtype.element_ty == tl.float32:
            s = tl.dot(q, tl.trans(keys), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(keys))
        kpos = pos - P + j
        valid = (jmask[None, :] & (kpos[None, :] >= 0) & (kpos[None, :] <= qpos[:, None])
                 & (qpos[:, None] - kpos[None, :] < window))
        s = tl.where(valid, s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vm_new = (jmask & ~old)[:, None] & dmask[None, :]
        v_old = tl.load(pv_ptr + b * spvb + g * spvh + j[:, None] * spvs + offs_d[None, :], mask=km_old,
                        other=0.0)
        v_new = tl.load(v_ptr + b * svb + t[:, None] * svn + g * svh + offs_d[None, :], mask=vm_new, other=0.0)
        values = tl.where(old[:, None], v_old, v_new)
        acc = acc * alpha[:, None]
        if q_ptr.dtype.element_ty == tl.float32:
            acc = tl.dot(p, values, acc, input_precision="ieee")
        else:
            acc = tl.dot(p.to(values.dtype), values, acc)
        m_i = m_new
    l_i = tl.where(l_i > 0, l_i, 1.0)  # padded query rows saw no key
    o = acc / l_i[:, None]
    tl.store(o_ptr + b * sob + qi[:, None] * son + h * soh + offs_d[None, :], o.to(o_ptr.dtype.element_ty),
             mask=qmask[:, None] & dmask[None, :])

    # the new window: slot w holds old slot w + n of cat(history, new keys)
    if (pid_q == 0) & (h % REP == 0):
        for w0 in range(0, P, BLOCK_W):
            w = w0 + tl.arange(0, BLOCK_W)
            wmask = w < P
            src = w + n
            from_old = src < P
            tw = tl.where(from_old, 0, src - P)
            mo = (wmask & from_old)[:, None] & dmask[None, :]
            mn = (wmask & ~from_old)[:, None] & dmask[None, :]
            ko = tl.load(pk_ptr + b * spkb + g * spkh + src[:, None] * spks + offs_d[None, :], mask=mo, other=0.0)
            kn = _rope_tile(k_ptr + b * skb + g * skh, cos_ptr + b * scb, sin_ptr + b * scb, tw,
                            wmask & ~from_old, offs_d, D, skn, scn, HALF)
            vo = tl.load(pv_ptr + b * spvb + g * spvh + src[:, None] * spvs + offs_d[None, :], mask=mo, other=0.0)
            vn = tl.load(v_ptr + b * svb + tw[:, None] * svn + g * svh + offs_d[None, :], mask=mn, other=0.0)
            wm = wmask[:, None] & dmask[None, :]
            tl.store(nk_ptr + b * snkb + g * snkh + w[:, None] * snks + offs_d[None, :],
                     tl.where(from_old[:, None], ko, kn), mask=wm)
            tl.store(nv_ptr + b * snvb + g * snvh + w[:, None] * snvs + offs_d[None, :],
                     tl.where(from_old[:, None], vo, vn), mask=wm)


# ----------------------------------------------------------------------------------------------- launch
_BLOCK_Q = 16
_BLOCK_W = 16


def _config(P: int, D: int) -> tuple[int, int, int, int]:
    """(BLOCK_Q, BLOCK_K, BLOCK_D, num_warps): 16-row key pieces (a query block's window is BLOCK_Q + P slots)."""
    bd = max(16, triton.next_power_of_2(D))
    return _BLOCK_Q, 16, bd, 4


def _check(q, k, v, cos, sin, past_k, past_v, pos, window, new_k, new_v):
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"window_attention: q must be (B, n, H, D), k/v (B, n, KV, D); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, n, H, D = q.shape
    KV = k.shape[2]
    if k.shape[:2] != (B, n) or k.shape[3] != D or H % KV or D % 2:
        raise ValueError(f"window_attention: k {tuple(k.shape)} does not fit q {tuple(q.shape)}")
    if cos.shape != (B, n, D) or sin.shape != (B, n, D):
        raise ValueError(f"window_attention: cos/sin must be {(B, n, D)}; got {tuple(cos.shape)}, {tuple(sin.shape)}")
    P = past_k.shape[2]
    for name, t in (("past_k", past_k), ("past_v", past_v), ("new_k", new_k), ("new_v", new_v)):
        if t is not None and (tuple(t.shape) != (B, KV, P, D) or t.dtype != q.dtype):
            raise ValueError(f"window_attention: {name} must be {(B, KV, P, D)} {q.dtype}; got {tuple(t.shape)} "
                             f"{t.dtype}")
    if P != window - 1:
        raise ValueError(f"window_attention: the history holds window - 1 = {window - 1} slots; got {P}")
    if pos.shape != (B,) or pos.dtype != torch.int64:
        raise ValueError(f"window_attention: pos must be ({B},) int64; got {tuple(pos.shape)} {pos.dtype}")
    for name, t in (("q", q), ("k", k), ("v", v), ("cos", cos), ("sin", sin), ("past_k", past_k),
                    ("past_v", past_v), ("new_k", new_k), ("new_v", new_v)):
        if t is not None and t.stride(-1) != 1 and t.shape[-1] > 1:
            raise ValueError(f"window_attention: {name} must be contiguous in its last dim; strides {t.stride()}")
        if t is not None and t.dtype != q.dtype:
            raise ValueError(f"window_attention: {name} must be {q.dtype}; got {t.dtype}")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def window_attention_ref(q, k, v, cos, sin, past_k, past_v, pos, window: int, scale: float,
                         block: int = 256):
    """The PyTorch reference (the Code2Wav attention's own ops). Returns (o (B, n, H, D), new_k, new_v).

    ``block`` query rows per attention call: the score tensor stays (block x (block + P)), not (n x n)."""
    B, n, H, D = q.shape
    P = past_k.shape[2]
    cos, sin = cos[:, None], sin[:, None]
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    keys, values = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
    new_k, new_v = keys[:, :, n:], values[:, :, n:]
    rep = H // k.shape[1]
    if rep > 1:
        keys, values = keys.repeat_interleave(rep, dim=1), values.repeat_interleave(rep, dim=1)
    qpos = pos[:, None] + torch.arange(n, device=pos.device)
    kpos = pos[:, None] - P + torch.arange(P + n, device=pos.device)
    outs = []
    for a in range(0, n, block):
        e = min(n, a + block)
        kp, qp = kpos[:, None, a:e + P], qpos[:, a:e, None]
        mask = ((kp >= 0) & (kp <= qp) & (qp - kp < window))[:, None]
        outs.append(F.scaled_dot_product_attention(q[:, :, a:e], keys[:, :, a:e + P], values[:, :, a:e + P],
                                                   attn_mask=mask, scale=scale))
    o = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return o.transpose(1, 2), new_k, new_v


def window_attention_triton(q, k, v, cos, sin, past_k, past_v, pos, window: int, scale: float,
                            new_k: torch.Tensor | None = None, new_v: torch.Tensor | None = None):
    B, n, H, D = q.shape
    KV, P = k.shape[2], past_k.shape[2]
    if new_k is None:
        new_k = torch.empty_like(past_k)
    if new_v is None:
        new_v = torch.empty_like(past_v)
    o = torch.empty((B, n, H, D), device=q.device, dtype=q.dtype)
    if B == 0:
        return o, new_k, new_v
    bq, bk, bd, warps = _config(P, D)
    grid = (max(triton.cdiv(n, bq), 1), H, B)
    _window_attention_kernel[grid](
        q, k, v, cos, sin, past_k, past_v, pos, o, new_k, new_v,
        n, P, D, window, scale,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), cos.stride(0), cos.stride(1),
        past_k.stride(0), past_k.stride(1), past_k.stride(2), past_v.stride(0), past_v.stride(1), past_v.stride(2),
        o.stride(0), o.stride(1), o.stride(2), new_k.stride(0), new_k.stride(1), new_k.stride(2),
        new_v.stride(0), new_v.stride(1), new_v.stride(2),
        REP=H // KV, HALF=D // 2, BLOCK_Q=bq, BLOCK_K=bk, BLOCK_D=bd, BLOCK_W=_BLOCK_W, num_warps=warps)
    return o, new_k, new_v


def window_attention(q, k, v, cos, sin, past_k, past_v, pos, window: int, scale: float,
                     new_k: torch.Tensor | None = None, new_v: torch.Tensor | None = None):
    """Rotary + sliding-window attention over history + new keys, and the updated window (module docstring).

    Returns (o (B, n, H, D), new_k, new_v); with ``new_k`` / ``new_v`` given the window is written there (e.g.
    views of the next streaming state), otherwise into fresh tensors. ``sin``'s strides must equal ``cos``'s.
    """
    _check(q, k, v, cos, sin, past_k, past_v, pos, window, new_k, new_v)
    if use_triton(q, k, v, past_k):
        if sin.stride() != cos.stride():
            raise ValueError("window_attention: cos and sin must share strides")
        return window_attention_triton(q, k, v, cos, sin, past_k, past_v, pos, window, scale, new_k, new_v)
    o, nk, nv = window_attention_ref(q, k, v, cos, sin, past_k, past_v, pos, window, scale)
    if new_k is not None:
        nk = new_k.copy_(nk)
    if new_v is not None:
        nv = new_v.copy_(nv)
    return o, nk, nv


# -------------------------------------------------------------------------------------- compile specs
def _specs() -> list[KernelSpec]:
    """The released Code2Wav attention (16 heads of 64 over 16 kv heads, window 72) per dtype."""
    tname = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
    specs = []
    for dt in _DTYPES:
        t = tname[dt]
        sig = {n: f"*{t}" for n in ("q_ptr", "k_ptr", "v_ptr", "cos_ptr", "sin_ptr", "pk_ptr", "pv_ptr", "o_ptr",
                                    "nk_ptr", "nv_ptr")}
        sig.update(pos_ptr="*i64", n="i32", P="i32", D="i32", window="i32", scale="fp32")
        sig.update({s: "i32" for s in ("sqb", "sqn", "sqh", "skb", "skn", "skh", "svb", "svn", "svh", "scb", "scn",
                                       "spkb", "spkh", "spks", "spvb", "spvh", "spvs", "sob", "son", "soh",
                                       "snkb", "snkh", "snks", "snvb", "snvh", "snvs")})
        for heads, kv_heads, head_dim, window in ((16, 16, 64, 72),):
            bq, bk, bd, warps = _config(window - 1, head_dim)
            specs.append(KernelSpec(
                name=f"window_attention_h{heads}_kv{kv_heads}_d{head_dim}_w{window}_{t}",
                fn=_window_attention_kernel, signature=sig,
                constexprs=dict(REP=heads // kv_heads, HALF=head_dim // 2, BLOCK_Q=bq, BLOCK_K=bk, BLOCK_D=bd,
                                BLOCK_W=_BLOCK_W),
                num_warps=warps, num_stages=1))
    return specs


COMPILE_SPECS: list[KernelSpec] = _specs()
