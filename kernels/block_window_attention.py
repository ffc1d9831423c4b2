"""Block-window attention for the AuT audio encoder: bidirectional attention inside packed windows.

The audio tower packs every window of every clip into one token axis and attends only within a window
(``cu_seqlens`` marks the boundaries; the released config has windows of 104 tokens, 20 heads x 64).
transformers' eager path loops over windows in Python (one SDPA per window); here one launch covers all
windows: program (window, query block, head) runs an online softmax over that window's key blocks.

Shapes:
    q, k, v: (tokens, heads, head_dim), unit stride on head_dim; may be strided views of a fused qkv buffer
    cu_seqlens: (num_windows + 1,) int32, cu_seqlens[0] == 0, non-decreasing, cu_seqlens[-1] == tokens
    out: (tokens, heads, head_dim), contiguous, dtype of q
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import KernelSpec, use_triton

__all__ = ["block_window_attention", "block_window_attention_ref", "COMPILE_SPECS"]

_LOG2E = 1.4426950408889634
_MAX_HEAD_DIM = 128
_TRITON_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@triton.jit
def _block_window_attn_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, cu_seqlens_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    qk_scale, head_dim,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, FP32_DOT: tl.constexpr,
):
    window = tl.program_id(0)
    m_block = tl.program_id(1)
    head = tl.program_id(2)

    start = tl.load(cu_seqlens_ptr + window)
    seqlen = tl.load(cu_seqlens_ptr + window + 1) - start
    # The grid is sized by the longest window; shorter windows have nothing to do in their tail blocks.
    if m_block * BLOCK_M >= seqlen:
        return

    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask_m = offs_m < seqlen
    # Head dims that are not a power of two (80) are padded to HEAD_DIM_PAD; padded lanes load 0, so they
    # add nothing to q.k and are never stored.
    mask_d = offs_d < head_dim

    # Window and head offsets go into scalar base pointers in int64 (token * stride can pass 2**31 on long
    # packed inputs); the per-tile offsets stay int32 so the pointer tiles cost no 64-bit math per element.
    q_base = q_ptr + start.to(tl.int64) * stride_qt + head.to(tl.int64) * stride_qh
    k_base = k_ptr + start.to(tl.int64) * stride_kt + head.to(tl.int64) * stride_kh
    v_base = v_ptr + start.to(tl.int64) * stride_vt + head.to(tl.int64) * stride_vh
    o_base = o_ptr + start.to(tl.int64) * stride_ot + head.to(tl.int64) * stride_oh

    q_ptrs = q_base + offs_m[:, None] * stride_qt + offs_d[None, :]
    q = tl.load(q_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)

    for start_n in range(0, seqlen, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < seqlen
        # K is loaded already transposed (head_dim, BLOCK_N) so the dot needs no tl.trans.
        kt_ptrs = k_base + cols[None, :] * stride_kt + offs_d[:, None]
        kt = tl.load(kt_ptrs, mask=mask_d[:, None] & mask_n[None, :], other=0.0)
        if FP32_DOT:
            qk = tl.dot(q, kt, input_precision="ieee")
        else:
            qk = tl.dot(q, kt)
        # qk_scale folds log2(e) in so the exponentials are exp2.
        qk = tl.where(mask_n[None, :], qk * qk_scale, float("-inf"))

        # Every window has >= 1 key, and the first block always holds one, so m_new is finite from the
        # first iteration on and alpha never evaluates exp2(-inf - -inf).
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)

        v_ptrs = v_base + cols[:, None] * stride_vt + offs_d[None, :]
        v = tl.load(v_ptrs, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        acc = acc * alpha[:, None]
        if FP32_DOT:
            acc += tl.dot(p, v, input_precision="ieee")
        else:
            # Probabilities go through the tensor cores in the input dtype, accumulation stays fp32.
            acc += tl.dot(p.to(v.dtype), v)
        m_i = m_new

    acc = acc / l_i[:, None]
    o_ptrs = o_base + offs_m[:, None] * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, acc.to(o_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


def _launch_config(head_dim_pad: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for a padded head dim and dtype.

    64x64 tiles cover a 104-token window in 2x2 blocks. fp32 dots run on FMA units with operands held in
    registers, which spill at 64x64 (ptxas, checked by tests/test_kernel_compile.py), so fp32 uses 32-row
    tiles and, at head_dim 128, 16-wide key blocks.
    """
    if dtype == torch.float32:
        return (32, 32, 4, 2) if head_dim_pad <= 64 else (32, 16, 4, 2)
    return 64, 64, 4, 2


def _validate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise ValueError(f"{name} must be (tokens, heads, head_dim), got shape {tuple(t.shape)}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"q, k, v shapes differ: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device == cu_seqlens.device):
        raise ValueError(f"q, k, v, cu_seqlens must share a device, got {q.device}, {k.device}, {v.device}, "
                         f"{cu_seqlens.device}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be (num_windows + 1,), got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(f"cu_seqlens must be int32, got {cu_seqlens.dtype}")


def _validate_windows(cu_host: torch.Tensor, tokens: int) -> None:
    if cu_host[0].item() != 0 or cu_host[-1].item() != tokens:
        raise ValueError(f"cu_seqlens must start at 0 and end at tokens={tokens}, got "
                         f"{cu_host[0].item()}..{cu_host[-1].item()}")
    if cu_host.numel() > 1 and bool((cu_host[1:] < cu_host[:-1]).any()):
        raise ValueError("cu_seqlens must be non-decreasing")


def block_window_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                               scale: float | None = None, upcast: bool = True) -> torch.Tensor:
    """Reference: plain softmax attention per window, as transformers' eager audio attention loops.

    q, k, v: (tokens, heads, head_dim); cu_seqlens: (num_windows + 1,) int32. Returns (tokens, heads,
    head_dim) in q's dtype. ``upcast`` computes in fp32 (the tests' truth); ``upcast=False`` keeps the input
    dtype (the same-dtype PyTorch error the kernel is measured against).
    """
    _validate(q, k, v, cu_seqlens)
    cu_host = cu_seqlens.cpu()
    _validate_windows(cu_host, q.shape[0])
    if scale is None:
        scale = q.shape[-1] ** -0.5
    compute_dtype = torch.float32 if upcast else q.dtype
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    bounds = cu_host.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e == s:
            continue
        # (heads, window, head_dim)
        qw, kw, vw = (t[s:e].transpose(0, 1).to(compute_dtype) for t in (q, k, v))
        scores = torch.matmul(qw, kw.transpose(-1, -2)) * scale
        probs = torch.softmax(scores, dim=-1)
        out[s:e] = torch.matmul(probs, vw).transpose(0, 1).to(q.dtype)
    return out


def _block_window_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                                   scale: float | None, max_seqlen: int | None = None) -> torch.Tensor:
    _validate(q, k, v, cu_seqlens)
    if q.dtype not in _TRITON_DTYPES:
        raise ValueError(f"block_window_attention supports fp16/bf16/fp32, got {q.dtype}")
    tokens, heads, head_dim = q.shape
    if head_dim > _MAX_HEAD_DIM or head_dim < 1:
        raise ValueError(f"head_dim must be in 1..{_MAX_HEAD_DIM}, got {head_dim}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1 and heads * head_dim > 0:
            raise ValueError(f"{name} must have unit stride on head_dim, got strides {t.stride()}")
    out = torch.empty((tokens, heads, head_dim), dtype=q.dtype, device=q.device)
    num_windows = cu_seqlens.numel() - 1
    if max_seqlen is None:
        # The audio encoder runs eagerly, so one host sync for the longest window (the grid size) is fine;
        # it also lets the window bounds be checked.
        cu_host = cu_seqlens.cpu()
        _validate_windows(cu_host, tokens)
        max_seqlen = int((cu_host[1:] - cu_host[:-1]).max().item()) if num_windows > 0 else 0
    elif max_seqlen < 0:
        raise ValueError(f"max_seqlen must be >= 0, got {max_seqlen}")
    if tokens == 0 or heads == 0 or num_windows == 0 or max_seqlen == 0:
        return out
    if scale is None:
        scale = head_dim ** -0.5

    head_dim_pad = max(16, triton.next_power_of_2(head_dim))
    block_m, block_n, num_warps, num_stages = _launch_config(head_dim_pad, q.dtype)
    grid = (num_windows, triton.cdiv(max_seqlen, block_m), heads)
    _block_window_attn_kernel[grid](
        q, k, v, out, cu_seqlens,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        float(scale) * _LOG2E, head_dim,
        BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM_PAD=head_dim_pad, FP32_DOT=q.dtype == torch.float32,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


def block_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                           scale: float | None = None, max_seqlen: int | None = None) -> torch.Tensor:
    """Bidirectional attention within the windows ``cu_seqlens`` marks on packed tokens.

    q, k, v: (tokens, heads, head_dim), head_dim <= 128, unit stride on head_dim (views of a fused qkv
    buffer are fine); cu_seqlens: (num_windows + 1,) int32; scale defaults to head_dim ** -0.5.
    Returns out: (tokens, heads, head_dim), contiguous, q's dtype.

    The Triton path copies cu_seqlens to the host once per call (validation + longest window, the grid
    size). A caller that already knows the longest window (the encoder, once for all its layers) passes
    ``max_seqlen`` to skip that sync; cu_seqlens is then trusted, and a max_seqlen smaller than the
    longest window leaves that window's tail rows unwritten.
    """
    if use_triton(q, k, v, cu_seqlens):
        return _block_window_attention_triton(q, k, v, cu_seqlens, scale, max_seqlen)
    return block_window_attention_ref(q, k, v, cu_seqlens, scale)


def _spec(dtype: torch.dtype, head_dim_pad: int) -> KernelSpec:
    block_m, block_n, num_warps, num_stages = _launch_config(head_dim_pad, dtype)
    ptr = "*" + _TRITON_DTYPES[dtype]
    signature = {"q_ptr": ptr, "k_ptr": ptr, "v_ptr": ptr, "o_ptr": ptr, "cu_seqlens_ptr": "*i32"}
    for name in ("stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh",
                 "stride_ot", "stride_oh"):
        signature[name] = "i32"
    signature.update({"qk_scale": "fp32", "head_dim": "i32"})
    return KernelSpec(
        name=f"block_window_attn_{_TRITON_DTYPES[dtype]}_d{head_dim_pad}_m{block_m}_n{block_n}",
        fn=_block_window_attn_kernel,
        signature=signature,
        constexprs={"BLOCK_M": block_m, "BLOCK_N": block_n, "HEAD_DIM_PAD": head_dim_pad,
                    "FP32_DOT": dtype == torch.float32},
        num_warps=num_warps,
        num_stages=num_stages,
    )


# Released AuT: head_dim 64 (1280 / 20 heads) in bf16/fp16, fp32 for parity runs; head_dim 128 covers
# 80-128 (padded) for other audio towers.
COMPILE_SPECS = [
    _spec(torch.bfloat16, 64),
    _spec(torch.float16, 64),
    _spec(torch.float32, 64),
    _spec(torch.bfloat16, 128),
    _spec(torch.float16, 128),
    _spec(torch.float32, 128),
]
