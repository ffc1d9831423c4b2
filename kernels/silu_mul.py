"""SwiGLU activation of a fused gate/up projection: ``y = silu(gate) * up`` in one launch instead of two ATen ops.

The dense MLPs compute gate and up with one GEMM (``gate_up_proj``: (2I, H), gate rows first), so their output
row is ``[gate (I) | up (I)]``; this op reads both halves and writes ``(rows, I)``. Rounding follows the
unfused reference ``F.silu(gate) * up`` in the activation dtype: silu in fp32, rounded to the dtype, then the
product in fp32, rounded again (exactly what the two ATen ops do). Grid: (rows, column blocks), static for a
static batch, so the op is CUDA-graph safe.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import KernelSpec, use_triton

__all__ = ["silu_mul", "silu_mul_triton", "silu_mul_ref", "COMPILE_SPECS"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _silu_mul_kernel(
    x_ptr, y_ptr,          # x: (rows, 2I) [gate | up], unit column stride; y: (rows, I) contiguous
    inter, stride_xr, stride_yr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inter
    x_row = x_ptr + row * stride_xr
    g = tl.load(x_row + offs, mask=mask, other=0.0)
    u = tl.load(x_row + inter + offs, mask=mask, other=0.0)
    g32 = g.to(tl.float32)
    s = (g32 / (1.0 + tl.exp(-g32))).to(g.dtype)        # F.silu rounds to the dtype
    y = (s.to(tl.float32) * u.to(tl.float32)).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + row * stride_yr + offs, y, mask=mask)


def _check(x: torch.Tensor) -> None:
    if x.dim() < 1 or x.shape[-1] % 2:
        raise ValueError(f"x must be (..., 2I) with gate then up halves, got {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"x must be one of {_DTYPES}, got {x.dtype}")


def silu_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """x: (..., 2I) [gate | up] → (..., I) = F.silu(gate) * up (the model's CPU path, as transformers)."""
    _check(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def _block(inter: int) -> int:
    return min(triton.next_power_of_2(max(inter, 1)), 1024)


def _num_warps(block: int) -> int:
    return 4 if block >= 1024 else (2 if block >= 256 else 1)


def silu_mul_triton(x: torch.Tensor) -> torch.Tensor:
    """Triton launcher for :func:`silu_mul` (same arguments and result)."""
    _check(x)
    inter = x.shape[-1] // 2
    lead = x.shape[:-1]
    if x.stride(-1) != 1 and x.shape[-1] > 1:
        x = x.contiguous()
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x   # a view when the leading dims nest (they do)
    rows = x2.shape[0]
    y = torch.empty((rows, inter), dtype=x.dtype, device=x.device)
    if rows and inter:
        block = _block(inter)
        _silu_mul_kernel[(rows, triton.cdiv(inter, block))](x2, y, inter, x2.stride(0), y.stride(0), BLOCK=block,
                                                           num_warps=_num_warps(block))
    return y.view(*lead, inter)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of a fused gate/up projection output.

    x: (..., 2I) in fp16/bf16/fp32, gate in the first I columns, up in the last I; unit column stride (rows may
    be strided). Returns (..., I) contiguous in x's dtype. Triton on CUDA (or when forced), else the reference.
    """
    if use_triton(x):
        return silu_mul_triton(x)
    return silu_mul_ref(x)


def _spec(dtype: str, inter: int) -> KernelSpec:
    block = _block(inter)
    return KernelSpec(name=f"silu_mul_{dtype}_i{inter}", fn=_silu_mul_kernel,
                      signature={"x_ptr": f"*{dtype}", "y_ptr": f"*{dtype}", "inter": "i32", "stride_xr": "i32",
                                 "stride_yr": "i32"},
                      constexprs={"BLOCK": block}, num_warps=_num_warps(block), num_stages=1)


# Released dense MLPs: code predictor and Code2Wav pre-transformer 3072, talker shared expert 768 (bf16, fp16);
# the fp32 test models (tiny 96 / 24, small 768).
COMPILE_SPECS = [_spec("bf16", 3072), _spec("bf16", 768), _spec("fp16", 3072), _spec("fp32", 96), _spec("fp32", 24),
                 _spec("fp32", 768)]
