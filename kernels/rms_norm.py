"""RMSNorm over the last dimension, optionally fused with the residual add before it: one launch instead of
seven ATen ops (the norm) plus one (the add).

    s = x + residual            (rounded to x's dtype, as the reference's ``x = x + attn(x)``)   [residual given]
    s = residual + scale · x    (one rounding, as ``torch.addcmul``: Code2Wav's layer-scaled residual)  [and scale]
    y = weight · (s / sqrt(mean(s²) + eps))   statistics in fp32, normalised value rounded to the input dtype
                                              before the weight multiply (transformers' Qwen3 RMSNorm)

Rows are everything but the last dimension, so the same op is the decoder's input/post-attention norms
(``(tokens, hidden)``) and the per-head q/k norms (``(tokens, heads, head_dim)``). One program per row: the
grid is the row count, static for a static batch, so the op is CUDA-graph safe.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import KernelSpec, use_triton

__all__ = ["rms_norm", "rms_norm_triton", "rms_norm_ref", "COMPILE_SPECS"]


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, y_ptr, res_out_ptr, scale_ptr,
    n_cols, inner, stride_xo, stride_xi, stride_ro, stride_ri, stride_yr, stride_sr,
    eps,
    BLOCK: tl.constexpr, HAS_RES: tl.constexpr, HAS_SCALE: tl.constexpr,
):
    # Row r of the flattened (rows, n_cols) view: x may be a strided (outer, inner, n_cols) tensor, e.g. the q
    # heads sliced out of a fused qkv projection, so the row address is outer * stride_xo + inner * stride_xi.
    row = tl.program_id(0).to(tl.int64)
    o = row // inner
    i = row % inner
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    x = tl.load(x_ptr + o * stride_xo + i * stride_xi + offs, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(res_ptr + o * stride_ro + i * stride_ri + offs, mask=mask, other=0.0)
        if HAS_SCALE:  # residual + scale·x, rounded once (addcmul)
            sc = tl.load(scale_ptr + offs, mask=mask, other=0.0)
            s = (r.to(tl.float32) + sc.to(tl.float32) * x.to(tl.float32)).to(x.dtype)
        else:
            s = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)   # the residual stream, in the model dtype
        tl.store(res_out_ptr + row * stride_sr + offs, s, mask=mask)
        x = s
    h = x.to(tl.float32)
    var = tl.sum(h * h, axis=0) / n_cols
    normed = (h * tl.math.rsqrt(var + eps)).to(x.dtype)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    y = (w.to(tl.float32) * normed.to(tl.float32)).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + row * stride_yr + offs, y, mask=mask)


def _rows_view(t: torch.Tensor, name: str) -> tuple[int, int, int]:
    """(outer stride, inner stride, inner count) addressing t's rows as (outer, inner) over its leading dims."""
    if t.stride(-1) != 1 and t.shape[-1] > 1:
        raise ValueError(f"{name} must be contiguous in its last dimension, got strides {t.stride()}")
    lead = t.shape[:-1]
    if len(lead) == 0:
        return 0, 0, 1
    if len(lead) == 1:
        return t.stride(0), 0, 1
    # Collapse the leading dims into (outer, inner): all but the last leading dim must nest densely.
    inner = lead[-1]
    for d in range(len(lead) - 2):
        if t.stride(d) != t.stride(d + 1) * t.shape[d + 1]:
            raise ValueError(f"{name}: leading dimensions {tuple(lead)} with strides {t.stride()[:-1]} "
                             f"cannot be addressed as rows")
    return t.stride(len(lead) - 2), t.stride(len(lead) - 1), inner


def _check(x, weight, residual, residual_scale=None):
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight must be ({x.shape[-1]},), got {tuple(weight.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"residual must match x {tuple(x.shape)} {x.dtype}, got {tuple(residual.shape)} "
                         f"{residual.dtype}")
    if residual_scale is not None:
        if residual is None:
            raise ValueError("residual_scale needs a residual (it scales x before the residual add)")
        if residual_scale.dim() != 1 or residual_scale.shape[0] != x.shape[-1]:
            raise ValueError(f"residual_scale must be ({x.shape[-1]},), got {tuple(residual_scale.shape)}")


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                 residual_scale: torch.Tensor | None = None):
    """PyTorch reference (the model's CPU path, op for op as transformers): returns y, or (y, x + residual), or
    with residual_scale (y, addcmul(residual, residual_scale, x))."""
    _check(x, weight, residual, residual_scale)
    if residual_scale is not None:
        x = torch.addcmul(residual, residual_scale, x)
    elif residual is not None:
        x = x + residual
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    y = weight * h.to(dtype)
    return y if residual is None else (y, x)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                    residual_scale: torch.Tensor | None = None):
    """Triton launcher for :func:`rms_norm` (same arguments and results)."""
    _check(x, weight, residual, residual_scale)
    n = x.shape[-1]
    if not weight.is_contiguous():
        raise ValueError("weight must be contiguous")
    try:
        so, si, inner = _rows_view(x, "x")
    except ValueError:
        if x.stride(-1) != 1 and x.shape[-1] > 1:
            raise
        x = x.contiguous()   # leading dims that do not nest (rare): one copy
        so, si, inner = _rows_view(x, "x")
    if residual is not None and not residual.is_contiguous():
        residual = residual.contiguous()
    if residual_scale is not None and not residual_scale.is_contiguous():
        residual_scale = residual_scale.contiguous()
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    rows = x.numel() // n if n else 0
    res_out = torch.empty_like(x, memory_format=torch.contiguous_format) if residual is not None else None
    if rows == 0:
        return y if residual is None else (y, res_out)
    ro, ri, _ = _rows_view(residual, "residual") if residual is not None else (0, 0, 1)
    block = triton.next_power_of_2(n)
    _rms_norm_kernel[(rows,)](
        x, residual if residual is not None else x, weight, y, res_out if res_out is not None else y,
        residual_scale if residual_scale is not None else weight,
        n, inner, so, si, ro, ri, n, n, float(eps),
        BLOCK=block, HAS_RES=residual is not None, HAS_SCALE=residual_scale is not None,
        num_warps=_num_warps(block))
    return y if residual is None else (y, res_out)


def _num_warps(block: int) -> int:
    return 8 if block >= 4096 else (4 if block >= 1024 else (2 if block >= 256 else 1))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             residual_scale: torch.Tensor | None = None):
    """RMSNorm of x over its last dimension (weight: (n,)); with ``residual`` (x's shape and dtype) the norm is
    of ``x + residual`` and the sum is returned too: ``(y, x + residual)`` — the next layer's residual stream.
    With ``residual_scale`` (n,) the sum is ``residual + residual_scale · x`` (Code2Wav's layer scale).

    x: (..., n), contiguous last dimension; leading dims may be strided (e.g. heads sliced from a fused
    projection). y has ``promote(weight.dtype, x.dtype)`` dtype, like ``weight * normed``.
    """
    if use_triton(x, weight):
        return rms_norm_triton(x, weight, eps, residual, residual_scale)
    return rms_norm_ref(x, weight, eps, residual, residual_scale)


_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _spec(dtype: str, n: int, has_res: bool, has_scale: bool = False) -> KernelSpec:
    sig = {"x_ptr": f"*{dtype}", "res_ptr": f"*{dtype}", "w_ptr": f"*{dtype}", "y_ptr": f"*{dtype}",
           "res_out_ptr": f"*{dtype}", "scale_ptr": f"*{dtype}", "eps": "fp32"}
    for name in ("n_cols", "inner", "stride_xo", "stride_xi", "stride_ro", "stride_ri", "stride_yr", "stride_sr"):
        sig[name] = "i32"
    block = triton.next_power_of_2(n)
    return KernelSpec(name=f"rms_norm_{dtype}_n{n}{'_res' if has_res else ''}{'_scaled' if has_scale else ''}",
                      fn=_rms_norm_kernel, signature=sig,
                      constexprs={"BLOCK": block, "HAS_RES": has_res, "HAS_SCALE": has_scale},
                      num_warps=_num_warps(block), num_stages=1)


# Released widths: thinker hidden 2048, talker / code predictor hidden 1024, q/k heads 128; code2wav 1024;
# the fp32 test models (tiny 48 / 16 / 8, small 256 / 64); Code2Wav's layer-scaled residual (1024).
COMPILE_SPECS = [
    _spec("bf16", 2048, True), _spec("bf16", 2048, False), _spec("bf16", 1024, True), _spec("bf16", 1024, False),
    _spec("bf16", 128, False), _spec("fp16", 2048, True), _spec("fp32", 48, True), _spec("fp32", 16, False),
    _spec("fp32", 256, True), _spec("fp32", 64, False), _spec("bf16", 1024, True, True),
    _spec("fp16", 1024, True, True), _spec("fp32", 1024, True, True),
]
