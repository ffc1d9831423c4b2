"""Counter-based uniform noise for the sampler, in one launch: U(0, 1) of shape (batch, n) as a pure function of
(seed, step, column) — the same integer hash as the PyTorch reference (murmur3's 32-bit finaliser in int64
arithmetic), so both paths give bit-identical values; the reference takes about seventeen ATen ops.

    h = mix(mix(col · 0x9E3779B1 + mix(step · 0x632BE5AB + mix(seed))) + (seed >> 32)),   u = (h + 0.5) / 2³²

``mix`` keeps the low 32 bits after each multiply (int64 products wrap modulo 2⁶⁴ on both paths, and the low
32 bits of a wrapped product are exact). u is returned in float64, where (h + 0.5) / 2³² is exact.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import KernelSpec, use_triton

__all__ = ["counter_uniform", "counter_uniform_ref", "COMPILE_SPECS"]

_MASK32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _MASK32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _MASK32
    return x ^ (x >> 16)


def counter_uniform_ref(seeds: torch.Tensor, steps: torch.Tensor, n: int) -> torch.Tensor:
    """PyTorch reference. seeds, steps: (batch,) int64 → (batch, n) float64 in (0, 1)."""
    cols = torch.arange(n, device=seeds.device, dtype=torch.int64)
    h = _hash32(cols[None, :] * 0x9E3779B1 + _hash32(steps[:, None] * 0x632BE5AB + _hash32(seeds[:, None])))
    h = _hash32(h + (seeds[:, None] >> 32))
    return (h.double() + 0.5) / 4294967296.0


@triton.jit
def _mix(x):
    x = x & 0xFFFFFFFF
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & 0xFFFFFFFF
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & 0xFFFFFFFF
    return x ^ (x >> 16)


@triton.jit
def _counter_uniform_kernel(seeds_ptr, steps_ptr, out_ptr, n, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    seed = tl.load(seeds_ptr + row).to(tl.int64)
    step = tl.load(steps_ptr + row).to(tl.int64)
    base = _mix(step * 0x632BE5AB + _mix(seed))
    h = _mix(offs.to(tl.int64) * 0x9E3779B1 + base)
    h = _mix(h + (seed >> 32))
    u = (h.to(tl.float64) + 0.5) / 4294967296.0
    tl.store(out_ptr + row.to(tl.int64) * stride_o + offs, u, mask=offs < n)


_BLOCK = 1024


def counter_uniform(seeds: torch.Tensor, steps: torch.Tensor, n: int) -> torch.Tensor:
    """U(0, 1) noise (batch, n) float64, a pure function of (seed, step, column). seeds/steps: (batch,) int64."""
    if seeds.dim() != 1 or steps.shape != seeds.shape:
        raise ValueError(f"seeds and steps must both be (batch,), got {tuple(seeds.shape)}, {tuple(steps.shape)}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not use_triton(seeds, steps):
        return counter_uniform_ref(seeds, steps, n)
    out = torch.empty((seeds.shape[0], n), dtype=torch.float64, device=seeds.device)
    if out.numel() == 0:
        return out
    seeds = seeds.to(torch.int64).contiguous()
    steps = steps.to(torch.int64).contiguous()
    _counter_uniform_kernel[(seeds.shape[0], triton.cdiv(n, _BLOCK))](seeds, steps, out, n, out.stride(0),
                                                                     BLOCK=_BLOCK, num_warps=4)
    return out


COMPILE_SPECS = [KernelSpec(name="counter_uniform_b1024", fn=_counter_uniform_kernel,
                            signature={"seeds_ptr": "*i64", "steps_ptr": "*i64", "out_ptr": "*fp64", "n": "i32",
                                       "stride_o": "i32"},
                            constexprs={"BLOCK": _BLOCK}, num_warps=4, num_stages=1)]
