"""Dense block-FP8 linear layer: ``y = x @ dequant(W_q, scale).T`` with 128×128 weight blocks.

Weights are ``float8_e4m3fn (N, K)`` codes with an fp32 scale grid ``(ceil(N/128), ceil(K/128))`` (format in
``omni_rt.quant``). A fused weight (q/k/v or gate/up: ``parts`` row counts, up to 3) keeps each part's own grid,
quantized before fusion: its grid is the parts' grids stacked, ``(Σ ceil(part/128), ceil(K/128))``, and row ``n``
of part ``p`` (starting at row ``r_p``) reads scale row ``s_p + (n - r_p) // 128`` (``s_p``: the scale rows of the
parts before it). Parts whose widths are not multiples of 128 (the tiny fixtures) then need no padding: the
kernel maps rows to scale rows. Two paths share one GEMM kernel:

- weight-only (decode, and the default): activations stay bf16/fp16/fp32; each weight tile is dequantized
  inside the K loop (``code · scale`` rounded to the activation dtype, which is exactly what the reference's
  dequantize-then-matmul computes) and fed to a 16-bit (or fp32) tensor-core dot. Decode is bandwidth-bound,
  so reading 1 byte per weight instead of 2 is what matters.
- w8a8 (optional, prefill on sm_89/sm_90): activations are quantized per token and 128-column group
  (``per_token_group_quant``: dynamic scale = group amax / 448), both operands go to the FP8 tensor cores,
  and each K tile's fp32 partial product is scaled by ``act_scale[m] · w_scale[n]`` before accumulation.

BLOCK_K divides 128, so a K tile never straddles a scale column. Under ``TRITON_INTERPRET=1`` the FP8 loads
run as on the GPU but the dot is done in fp32/fp16 (``NATIVE_FP8_DOT=False``): the products of two e4m3
values are exact in fp32, so only the summation order differs from the FP8 tensor-core dot.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from . import KernelSpec, use_triton

__all__ = ["fp8_linear", "fp8_linear_ref", "per_token_group_quant", "per_token_group_quant_ref", "get_config",
           "scale_rows", "COMPILE_SPECS", "SCALE_BLOCK"]

SCALE_BLOCK = 128
FP8_MAX = 448.0
_ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# --------------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------------

@triton.jit
def _fp8_linear_kernel(
    x_ptr,            # (M, K) activations (bf16/fp16/fp32), or FP8 codes when ACT_FP8
    xs_ptr,           # (M, ceil(K/128)) fp32 activation scales (ACT_FP8 only; else any pointer)
    w_ptr,            # (N, K) float8_e4m3fn weight codes
    ws_ptr,           # (ceil(N/128), ceil(K/128)) fp32 weight scales
    out_ptr,          # (M, N)
    M, N, K,
    part1, part2,     # row where part 2 / part 3 of a fused weight starts (N when there is no such part)
    srow1, srow2,     # their first scale rows
    stride_xm, stride_xk, stride_xsm, stride_xsk,
    stride_wn, stride_wk, stride_wsn, stride_wsk,
    stride_om, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SCALE_BN: tl.constexpr, SCALE_BK: tl.constexpr,
    ACT_FP8: tl.constexpr, NATIVE_FP8_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # Grouped ordering: consecutive programs share a weight column block (kept in L2).
    group = GROUP_M * num_pid_n
    first_m = (pid // group) * GROUP_M
    size_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    # Each part of a fused weight is on its own 128-row grid (see the module docstring).
    srow = tl.where(offs_n < part1, offs_n // SCALE_BN,
                    tl.where(offs_n < part2, srow1 + (offs_n - part1) // SCALE_BN, srow2 + (offs_n - part2) // SCALE_BN))
    ws_rows = ws_ptr + srow * stride_wsn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k0 = k * BLOCK_K
        if EVEN_K:
            a = tl.load(x_rows + (k0 + offs_k)[None, :] * stride_xk, mask=m_mask[:, None], other=0.0)
            w = tl.load(w_rows + (k0 + offs_k)[None, :] * stride_wk, mask=n_mask[:, None], other=0.0)
        else:
            k_mask = offs_k < K - k0
            a = tl.load(x_rows + (k0 + offs_k)[None, :] * stride_xk, mask=m_mask[:, None] & k_mask[None, :],
                        other=0.0)
            w = tl.load(w_rows + (k0 + offs_k)[None, :] * stride_wk, mask=n_mask[:, None] & k_mask[None, :],
                        other=0.0)
        # BLOCK_K divides SCALE_BK: one scale column per K tile.
        ws = tl.load(ws_rows + (k0 // SCALE_BK) * stride_wsk, mask=n_mask, other=0.0)
        if ACT_FP8:
            xs = tl.load(xs_ptr + offs_m * stride_xsm + (k0 // SCALE_BK) * stride_xsk, mask=m_mask, other=0.0)
            if NATIVE_FP8_DOT:
                part = tl.dot(a, tl.trans(w))
            else:
                part = tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
            acc += part * xs[:, None] * ws[None, :]
        else:
            # Dequantize the tile to the activation dtype: the same rounding as dequantize-then-matmul.
            w_deq = (w.to(tl.float32) * ws[:, None]).to(a.dtype)
            acc = tl.dot(a, tl.trans(w_deq), acc, input_precision=DOT_PRECISION)
    out = acc.to(out_ptr.dtype.element_ty)
    o_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(o_ptrs, out, mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _round_e4m3(v):
    """Round fp32 ``v`` (|v| <= 448) to the nearest e4m3 value, ties to even, in fp32 arithmetic.

    The cast to float8 is then exact. Why: Triton's interpreter (numpy) loses the carry when rounding
    overflows the mantissa (124.3 -> 64 instead of 128); on the GPU the cvt instruction already rounds right.
    """
    a = tl.abs(v)
    e = tl.floor(tl.log2(tl.maximum(a, 0.015625)))   # normals from 2**-6; subnormal step is 2**-9
    step = tl.exp2(e - 3.0)
    t = v / step                                      # exact: step is a power of two
    r = (t + 12582912.0) - 12582912.0                 # 1.5 * 2**23: fp32 addition rounds to nearest even
    return r * step


@triton.jit
def _act_quant_kernel(
    x_ptr, q_ptr, s_ptr,  # (M, K) in, (M, K) FP8 codes out, (M, ceil(K/GROUP)) fp32 scales out
    K, stride_xm, stride_xk, stride_qm, stride_sm,
    GROUP: tl.constexpr, FP8MAX: tl.constexpr,
):
    row = tl.program_id(0)
    g = tl.program_id(1)
    offs = g * GROUP + tl.arange(0, GROUP)
    mask = offs < K
    x = tl.load(x_ptr + row.to(tl.int64) * stride_xm + offs * stride_xk, mask=mask, other=0.0).to(tl.float32)
    scale = tl.max(tl.abs(x), axis=0) / FP8MAX
    inv = tl.where(scale > 0, 1.0 / tl.where(scale > 0, scale, 1.0), 0.0)
    q = _round_e4m3(tl.minimum(tl.maximum(x * inv, -FP8MAX), FP8MAX))
    tl.store(q_ptr + row.to(tl.int64) * stride_qm + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row * stride_sm + g, scale)


# --------------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------------

def get_config(m: int, dtype: torch.dtype, act_fp8: bool = False) -> dict:
    """Launch config by token count: small M (decode) splits N finely; prefill uses larger tiles.

    Chosen spill-free for sm_90 under triton 3.6 and 3.9 (tests/test_kernel_compile.py): bigger w8a8 tiles
    (128×128×128) spill hundreds of bytes under triton 3.9, so w8a8 keeps 64×64×128 tiles. Weight-only tiles
    dequantize the (BLOCK_N × BLOCK_K) FP8 tile in fp32 registers before the dot, so their N×K stays at 32×64
    (64×128 spilled 48-280 bytes under 3.6); BLOCK_N 32 also doubles the programs a decode step launches.
    """
    if act_fp8:
        cfg = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 4, "num_stages": 3}
    elif m <= 16:
        cfg = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 1, "num_warps": 4, "num_stages": 4}
    elif m <= 64:
        cfg = {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 4, "num_warps": 8, "num_stages": 3}
    else:
        cfg = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}
    if dtype == torch.float32 and not act_fp8:
        # fp32 FMA dots: bound the register tile (as fused_moe.fit_config).
        cfg.update(BLOCK_K=32, BLOCK_N=min(cfg["BLOCK_N"], 32), BLOCK_M=min(cfg["BLOCK_M"], 16), num_stages=2)
    return cfg


@functools.lru_cache(maxsize=None)
def _has_fp8_dot(index: int) -> bool:
    """sm_89+ has FP8 tensor cores (queried on first launch, never at import)."""
    return torch.cuda.get_device_capability(index) >= (8, 9)


def scale_rows(n: int, parts: tuple[int, ...] | None = None) -> int:
    """Rows of the scale grid of an (n, K) weight, fused from ``parts`` (row counts summing to n) or not."""
    return math.ceil(n / SCALE_BLOCK) if parts is None else sum(math.ceil(p / SCALE_BLOCK) for p in parts)


def _part_bounds(n: int, parts: tuple[int, ...] | None) -> tuple[int, int, int, int]:
    """(part1, part2, srow1, srow2): where parts 2 and 3 start, in rows and in scale rows (n when absent)."""
    parts = tuple(parts or (n,))
    starts, srows = [0], [0]
    for p in parts:
        starts.append(starts[-1] + p)
        srows.append(srows[-1] + math.ceil(p / SCALE_BLOCK))
    starts, srows = starts[1:-1], srows[1:-1]
    starts += [n] * (2 - len(starts))
    srows += [srows[-1] if srows else 0] * (2 - len(srows))
    return starts[0], starts[1], srows[0], srows[1]


def _check(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, parts: tuple[int, ...] | None = None) -> None:
    if x.dtype not in _ACT_DTYPES:
        raise ValueError(f"x must be one of {_ACT_DTYPES}, got {x.dtype}")
    if weight.dim() != 2 or weight.dtype != torch.float8_e4m3fn:
        raise ValueError(f"weight must be a 2-D float8_e4m3fn (N, K) tensor, got {weight.dtype} "
                         f"{tuple(weight.shape)}")
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x's last dim {x.shape[-1]} != weight's K {k}")
    if parts is not None and (not 1 <= len(parts) <= 3 or sum(parts) != n or min(parts) < 1):
        raise ValueError(f"parts must be 1 to 3 positive row counts summing to N={n}, got {parts}")
    want = (scale_rows(n, parts), math.ceil(k / SCALE_BLOCK))
    if tuple(scale.shape) != want or scale.dtype != torch.float32:
        grid = "(ceil(N/128), ceil(K/128))" if parts is None else "(Σ ceil(part/128), ceil(K/128))"
        raise ValueError(f"scale must be float32 {want} {grid}, got {scale.dtype} {tuple(scale.shape)}")
    devices = {t.device for t in (x, weight, scale)}
    if len(devices) != 1:
        raise ValueError(f"x, weight and scale must be on one device, got {sorted(map(str, devices))}")


def per_token_group_quant(x: torch.Tensor, group: int = SCALE_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) → (codes (M, K) float8_e4m3fn, scales (M, ceil(K/group)) fp32), scale = group amax / 448."""
    if x.dim() != 2:
        raise ValueError(f"x must be (M, K), got {tuple(x.shape)}")
    m, k = x.shape
    if not use_triton(x):
        return per_token_group_quant_ref(x, group)
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty((m, math.ceil(k / group)), dtype=torch.float32, device=x.device)
    if m and k:
        _act_quant_kernel[(m, s.shape[1])](x, q, s, k, x.stride(0), x.stride(1), q.stride(0), s.stride(0),
                                           GROUP=group, FP8MAX=FP8_MAX)
    return q, s


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
               act_fp8: bool = False, config: dict | None = None,
               parts: tuple[int, ...] | None = None) -> torch.Tensor:
    """y = x @ (weight · scale).T (+ bias).

    x: (..., K) bf16/fp16/fp32 (any strides); weight: (N, K) float8_e4m3fn; scale: (ceil(N/128), ceil(K/128))
    fp32, or for a weight fused from ``parts`` (row counts, up to 3, summing to N) each part's grid stacked:
    (Σ ceil(part/128), ceil(K/128)). ``act_fp8``: quantize x per (token, 128 columns) and use the FP8 tensor
    cores (sm_89+ only; the interpreter emulates it). Returns (..., N) in x's dtype. On CPU without forced
    Triton: the reference.
    """
    _check(x, weight, scale, parts)
    if not use_triton(x, weight, scale):
        return fp8_linear_ref(x, weight, scale, bias, act_fp8, parts)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    m, k = x2.shape
    n = weight.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m and n:
        cfg = dict(config or get_config(m, x.dtype, act_fp8))
        if SCALE_BLOCK % cfg["BLOCK_K"]:
            raise ValueError(f"BLOCK_K must divide {SCALE_BLOCK}, got {cfg['BLOCK_K']}")
        native = x.is_cuda and _has_fp8_dot(x.device.index or 0)
        if act_fp8:
            a, a_scale = per_token_group_quant(x2)
        else:
            a, a_scale = x2, scale  # xs_ptr unused
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
        _fp8_linear_kernel[grid](
            a, a_scale, weight, scale, out, m, n, k, *_part_bounds(n, parts),
            a.stride(0), a.stride(1), a_scale.stride(0), a_scale.stride(1),
            weight.stride(0), weight.stride(1), scale.stride(0), scale.stride(1),
            out.stride(0), out.stride(1),
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
            SCALE_BN=SCALE_BLOCK, SCALE_BK=SCALE_BLOCK, ACT_FP8=act_fp8, NATIVE_FP8_DOT=native,
            DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", EVEN_K=k % cfg["BLOCK_K"] == 0,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if bias is not None:
        out = out + bias
    return out.view(*lead, n)


# --------------------------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------------------------

def _dequant(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype,
             parts: tuple[int, ...] | None = None) -> torch.Tensor:
    n, k = weight.shape
    rows = torch.cat([base + torch.arange(p, device=weight.device) // SCALE_BLOCK
                      for p, base in zip(parts or (n,), _scale_bases(parts or (n,)))])
    cols = torch.arange(k, device=weight.device) // SCALE_BLOCK
    return (weight.float() * scale[rows][:, cols]).to(dtype)


def _scale_bases(parts: tuple[int, ...]) -> list[int]:
    """First scale row of each part."""
    bases, s = [], 0
    for p in parts:
        bases.append(s)
        s += math.ceil(p / SCALE_BLOCK)
    return bases


def per_token_group_quant_ref(x: torch.Tensor, group: int = SCALE_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    m, k = x.shape
    g = math.ceil(k / group)
    xf = torch.nn.functional.pad(x.float(), (0, g * group - k)).view(m, g, group)
    s = xf.abs().amax(-1) / FP8_MAX
    inv = torch.where(s > 0, 1.0 / torch.where(s > 0, s, 1.0), 0.0)
    q = (xf * inv[..., None]).clamp(-FP8_MAX, FP8_MAX).view(m, g * group)[:, :k]
    return q.to(torch.float8_e4m3fn), s


def fp8_linear_ref(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                   act_fp8: bool = False, parts: tuple[int, ...] | None = None) -> torch.Tensor:
    """Weight-only: ``F.linear(x, dequant(weight).to(x.dtype))``. w8a8: quantize x per token group first and
    compute in fp32 on both dequantized operands. Shapes as ``fp8_linear``."""
    if act_fp8:
        lead = x.shape[:-1]
        q, s = per_token_group_quant_ref(x.reshape(-1, x.shape[-1]))
        xd = (q.float() * s.repeat_interleave(SCALE_BLOCK, dim=1)[:, : q.shape[1]])
        y = (xd @ _dequant(weight, scale, torch.float32, parts).t()).to(x.dtype).view(*lead, -1)
    else:
        y = torch.nn.functional.linear(x, _dequant(weight, scale, x.dtype, parts))
    return y if bias is None else y + bias


# --------------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (sm_89+: FP8 conversion and FP8 dots need it; sm_80 dequantizes at load)
# --------------------------------------------------------------------------------------------------------

def _compile_specs() -> list[KernelSpec]:
    specs = []
    ints = ("M", "N", "K", "part1", "part2", "srow1", "srow2", "stride_xm", "stride_xsm", "stride_wn", "stride_wsn", "stride_om")
    units = {"stride_xk": 1, "stride_xsk": 1, "stride_wk": 1, "stride_wsk": 1, "stride_on": 1}
    for m, act_fp8 in ((1, False), (64, False), (4096, False), (4096, True)):
        cfg = get_config(m, torch.bfloat16, act_fp8)
        x_t = "fp8e4nv" if act_fp8 else "bf16"
        sig = {"x_ptr": f"*{x_t}", "xs_ptr": "*fp32", "w_ptr": "*fp8e4nv", "ws_ptr": "*fp32", "out_ptr": "*bf16",
               **{n: "i32" for n in ints}}
        consts = {"BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"], "BLOCK_K": cfg["BLOCK_K"],
                  "GROUP_M": cfg["GROUP_M"], "SCALE_BN": SCALE_BLOCK, "SCALE_BK": SCALE_BLOCK, "ACT_FP8": act_fp8,
                  "NATIVE_FP8_DOT": True, "DOT_PRECISION": "tf32", "EVEN_K": True, **units}
        tag = f"{'w8a8' if act_fp8 else 'w8a16'}_m{cfg['BLOCK_M']}n{cfg['BLOCK_N']}k{cfg['BLOCK_K']}"
        specs.append(KernelSpec(name=f"fp8_linear_{tag}", fn=_fp8_linear_kernel, signature=sig, constexprs=consts,
                                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], archs=("sm_90",)))
    specs.append(KernelSpec(
        name="fp8_act_quant_bf16", fn=_act_quant_kernel,
        signature={"x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "K": "i32", "stride_xm": "i32",
                   "stride_qm": "i32", "stride_sm": "i32"},
        constexprs={"stride_xk": 1, "GROUP": SCALE_BLOCK, "FP8MAX": FP8_MAX}, num_warps=1, num_stages=1,
        archs=("sm_90",)))
    return specs


COMPILE_SPECS: list[KernelSpec] = _compile_specs()
